"""DPO (Rafailov et al. 2023, arXiv 2305.18290) and its loss variants against a frozen reference.

Batch keys (``[B, T]``): ``chosen_tokens``, ``chosen_attention_mask``, ``chosen_loss_mask`` and the
``rejected_*`` twins, plus ``ref_chosen_logps`` / ``ref_rejected_logps`` (``[B]``): the reference model's
summed completion log-probs, computed before the step (once per dataset, or per batch by
:func:`make_reference_fn`) so the reference parameters never enter the train step.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from jrft.losses import dpo_loss
from jrft.train.logprobs import pair_sequence_logps
from jrft.train.objectives.pairs import valid_rows


def make_loss_fn(*, beta: float, loss_type: str = "sigmoid", label_smoothing: float = 0.0):
    def loss_fn(model, batch, norms, key):
        del key
        out = pair_sequence_logps(model, batch)
        losses, chosen_rewards, rejected_rewards = dpo_loss(
            out["chosen_logps"],
            out["rejected_logps"],
            batch["ref_chosen_logps"],
            batch["ref_rejected_logps"],
            beta=beta,
            loss_type=loss_type,
            label_smoothing=label_smoothing,
        )
        valid = valid_rows(batch)

        def mean(x):  # contribution to the mean over the global batch's real pairs
            return jnp.sum(x * valid) / norms["pairs"]

        margins = chosen_rewards - rejected_rewards
        metrics = {
            "rewards/chosen": mean(chosen_rewards),
            "rewards/rejected": mean(rejected_rewards),
            "rewards/margins": mean(margins),
            "rewards/accuracies": mean((margins > 0).astype(jnp.float32)),
            "logps/chosen": mean(out["chosen_logps"]),
            "logps/rejected": mean(out["rejected_logps"]),
        }
        return mean(losses), metrics

    return loss_fn


def make_reference_fn(graphdef: nnx.GraphDef):
    """Jitted ``(ref_params, ref_rest, batch) -> {"ref_chosen_logps", "ref_rejected_logps"}``.

    No gradients flow into the reference.
    """

    @jax.jit
    def reference(params, rest, batch):
        model = nnx.merge(graphdef, params, rest)
        out = pair_sequence_logps(model, batch)
        return {
            "ref_chosen_logps": jax.lax.stop_gradient(out["chosen_logps"]),
            "ref_rejected_logps": jax.lax.stop_gradient(out["rejected_logps"]),
        }

    return reference
