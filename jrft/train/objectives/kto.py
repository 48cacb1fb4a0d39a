"""KTO (Ethayarajh et al. 2024, arXiv 2402.01306) on unpaired rows, via ``jrft.losses.kto_loss``.

Batches use the pair layout of :mod:`jrft.train.objectives.dpo` (``jrft.data.batching.collate_unpaired``):
``chosen_*`` holds each row's own completion, ``rejected_*`` the same prompt with a mismatched completion
(for the KL reference point), plus ``label`` ``[B]`` (1 = desirable) and the reference's summed log-probs
``ref_chosen_logps`` / ``ref_rejected_logps`` (``[B]``), computed before the step by the same reference
function as DPO's. Both completions are scored in one forward.
"""

from __future__ import annotations

import jax.numpy as jnp

from jrft.losses import kto_kl_estimate, kto_loss
from jrft.train.logprobs import pair_sequence_logps
from jrft.train.objectives import pairs
from jrft.train.objectives.pairs import valid_rows


def normalizers(batch):
    """Global counts of the whole batch: real rows (first: the loss is a mean over them), and the desirable
    and undesirable ones (for their reward means)."""
    valid = valid_rows(batch)
    label = batch["label"].astype(jnp.float32)
    return {
        **pairs.normalizers(batch),
        "desirable": jnp.maximum(jnp.sum(label * valid), 1.0),
        "undesirable": jnp.maximum(jnp.sum((1.0 - label) * valid), 1.0),
    }


# Evaluation averages these metrics weighted by their own normaliser (see jrft.train.evaluation.Objective).
EVAL_WEIGHTS = {"rewards/desirable": "desirable", "rewards/undesirable": "undesirable"}


def make_loss_fn(
    *,
    beta: float,
    desirable_weight: float = 1.0,
    undesirable_weight: float = 1.0,
    logits_chunk_size: int = 0,
):
    """KTO's mean loss over the real rows. The KL reference point is estimated over the rows this call
    sees (the micro-batch under accumulation, as TRL's per-device estimate)."""

    def loss_fn(model, batch, norms, key):
        out = pair_sequence_logps(model, batch, chunk_size=logits_chunk_size, dropout_key=key)
        valid = valid_rows(batch)
        label = batch["label"].astype(jnp.float32)
        kl = kto_kl_estimate(out["rejected_logps"], batch["ref_rejected_logps"], where=valid)
        losses, rewards = kto_loss(
            out["chosen_logps"],
            batch["ref_chosen_logps"],
            label,
            kl,
            beta=beta,
            desirable_weight=desirable_weight,
            undesirable_weight=undesirable_weight,
        )
        share = jnp.sum(valid) / norms["pairs"]  # this call's part of the batch: micro-batch sums add up
        desirable, undesirable = label * valid, (1.0 - label) * valid
        metrics = {
            "kl": kl * share,
            "rewards/desirable": jnp.sum(rewards * desirable) / norms["desirable"],
            "rewards/undesirable": jnp.sum(rewards * undesirable) / norms["undesirable"],
            "logps/completion": jnp.sum(out["chosen_logps"] * valid) / norms["pairs"],
        }
        return jnp.sum(losses * valid) / norms["pairs"], metrics

    return loss_fn
