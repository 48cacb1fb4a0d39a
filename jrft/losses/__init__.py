"""jrft.losses: pure loss functions for SFT, reward models, DPO, KTO, PPO and GRPO, usable from any JAX code.

Every function takes arrays (any float dtype; math in float32), keyword hyperparameters, and returns
per-example values (plus a mask where that fits) or ``(loss, metrics)``; all are jit-able and hold no state.
Variants are chosen by name from the registries exported here; an unknown name raises a ValueError that
lists the valid ones.
"""

from jrft.losses.common import KL_ESTIMATORS as KL_ESTIMATORS
from jrft.losses.common import batch_counts as batch_counts
from jrft.losses.common import entropy as entropy
from jrft.losses.common import k1 as k1
from jrft.losses.common import k2 as k2
from jrft.losses.common import k3 as k3
from jrft.losses.common import kl_estimate as kl_estimate
from jrft.losses.common import masked_mean as masked_mean
from jrft.losses.common import masked_sum as masked_sum
from jrft.losses.common import token_logprobs as token_logprobs
from jrft.losses.dpo import DPO_LOSSES as DPO_LOSSES
from jrft.losses.dpo import dpo_loss as dpo_loss
from jrft.losses.dpo import orpo_odds_ratio_loss as orpo_odds_ratio_loss
from jrft.losses.dpo import simpo_loss as simpo_loss
from jrft.losses.grpo import ADVANTAGE_SCALES as ADVANTAGE_SCALES
from jrft.losses.grpo import AGGREGATIONS as AGGREGATIONS
from jrft.losses.grpo import BASELINES as BASELINES
from jrft.losses.grpo import IMPORTANCE_LEVELS as IMPORTANCE_LEVELS
from jrft.losses.grpo import group_advantages as group_advantages
from jrft.losses.grpo import grpo_loss as grpo_loss
from jrft.losses.kto import kto_kl_estimate as kto_kl_estimate
from jrft.losses.kto import kto_loss as kto_loss
from jrft.losses.ppo import clipped_objective as clipped_objective
from jrft.losses.ppo import clipped_policy_loss as clipped_policy_loss
from jrft.losses.ppo import clipped_value_loss as clipped_value_loss
from jrft.losses.ppo import gae as gae
from jrft.losses.ppo import kl_penalty_rewards as kl_penalty_rewards
from jrft.losses.ppo import whiten as whiten
from jrft.losses.reward import bradley_terry_loss as bradley_terry_loss
from jrft.losses.reward import plackett_luce_loss as plackett_luce_loss
from jrft.losses.reward import ranking_pairs as ranking_pairs
from jrft.losses.sft import SFT_REDUCTIONS as SFT_REDUCTIONS
from jrft.losses.sft import sequence_nll as sequence_nll
from jrft.losses.sft import sft_loss as sft_loss
from jrft.losses.sft import token_cross_entropy as token_cross_entropy
