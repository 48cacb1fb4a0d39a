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

from jrft.losses import dpo_loss, orpo_odds_ratio_loss, simpo_loss
from jrft.train.logprobs import pair_sequence_logps
from jrft.train.objectives.pairs import valid_rows
from jrft.train.reference import frozen_forward

# Loss variants: (policy log-probs, batch, hyperparameters) -> (losses [B], chosen rewards, rejected rewards).


def _dpo_family(out, batch, hp):
    """A loss of ``jrft.losses.DPO_LOSSES`` against the reference's log-probs."""
    policy = (out["chosen_logps"], out["rejected_logps"])
    reference = (batch["ref_chosen_logps"], batch["ref_rejected_logps"])
    kw = {k: hp[k] for k in ("beta", "loss_type", "label_smoothing", "discopop_tau")}
    return dpo_loss(*policy, *reference, **kw, where=valid_rows(batch))  # sorting losses skip padding


def _simpo(out, batch, hp):
    """SimPO: length-normalised, reference-free, with a target margin ``simpo_gamma``."""
    policy = (out["chosen_logps"], out["rejected_logps"])
    lengths = (out["chosen_lengths"], out["rejected_lengths"])
    return simpo_loss(
        *policy, *lengths, beta=hp["beta"], gamma=hp["simpo_gamma"], label_smoothing=hp["label_smoothing"]
    )


def _orpo(out, batch, hp):
    """ORPO = NLL of the chosen response (per token) + lambda * odds-ratio term; rewards as TRL logs them
    (beta x mean log-prob)."""
    odds, _ = orpo_odds_ratio_loss(
        out["chosen_logps"], out["rejected_logps"], out["chosen_lengths"], out["rejected_lengths"]
    )
    chosen_mean = out["chosen_logps"] / jnp.maximum(out["chosen_lengths"], 1.0)
    rejected_mean = out["rejected_logps"] / jnp.maximum(out["rejected_lengths"], 1.0)
    losses = -chosen_mean + hp["orpo_lambda"] * odds
    beta = hp["beta"]
    return losses, jax.lax.stop_gradient(beta * chosen_mean), jax.lax.stop_gradient(beta * rejected_mean)


# Losses with their own functions (no reference model); every other name is a key of jrft.losses.DPO_LOSSES.
REFERENCE_FREE_LOSSES = {"simpo": _simpo, "orpo": _orpo}


def needs_reference(loss_type: str) -> bool:
    return loss_type not in REFERENCE_FREE_LOSSES


def make_loss_fn(
    *,
    beta: float,
    loss_type: str = "sigmoid",
    label_smoothing: float = 0.0,
    simpo_gamma: float = 0.5,
    orpo_lambda: float = 0.1,
    sft_weight: float = 0.0,
    logits_chunk_size: int = 0,
    discopop_tau: float = 0.05,
):
    """Pairwise preference loss ``loss_type`` (DPO family, ``simpo`` or ``orpo``), plus ``sft_weight`` x the
    chosen responses' per-token NLL (RPO, arXiv 2404.19733)."""
    pair_loss = REFERENCE_FREE_LOSSES.get(loss_type, _dpo_family)
    hyper = dict(
        beta=beta,
        loss_type=loss_type,
        label_smoothing=label_smoothing,
        simpo_gamma=simpo_gamma,
        orpo_lambda=orpo_lambda,
        discopop_tau=discopop_tau,
    )

    def loss_fn(model, batch, norms, key):
        out = pair_sequence_logps(model, batch, chunk_size=logits_chunk_size, dropout_key=key)
        losses, chosen_rewards, rejected_rewards = pair_loss(out, batch, hyper)
        if sft_weight:
            losses = losses - sft_weight * out["chosen_logps"] / jnp.maximum(out["chosen_lengths"], 1.0)
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


def make_reference_fn(graphdef: nnx.GraphDef, *, logits_chunk_size: int = 0):
    """Jitted ``(ref_params, ref_rest, batch) -> {"ref_chosen_logps", "ref_rejected_logps"}``.

    No gradients flow into the reference. ``logits_chunk_size``: see ``jrft.train.logprobs``.
    """

    def reference(model, batch):
        out = pair_sequence_logps(model, batch, chunk_size=logits_chunk_size)
        return {"ref_chosen_logps": out["chosen_logps"], "ref_rejected_logps": out["rejected_logps"]}

    return frozen_forward(graphdef, reference)
