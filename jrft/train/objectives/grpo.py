"""GRPO's policy update (DeepSeekMath, arXiv 2402.03300) on a rollout batch, via ``jrft.losses.grpo_loss``.

Batch keys: ``tokens``, ``attention_mask`` (``[N, Tp + Tc]``), ``completion_mask`` (``[N, Tc]``),
``advantages`` (``[N]``), optional ``old_logps`` and ``ref_logps`` (``[N, Tc]``). Without ``old_logps`` the
update is on-policy (``mu = 1``, one mini-batch): the ratio is exactly 1 and only the clipped objective's
gradient remains.
"""

from __future__ import annotations

import jax.numpy as jnp

from jrft.losses import grpo_loss
from jrft.train.logprobs import completion_logps


def normalizers(batch):
    mask = batch["completion_mask"].astype(jnp.float32)
    return {
        "tokens": jnp.maximum(jnp.sum(mask), 1.0),
        "sequences": jnp.maximum(jnp.sum(jnp.any(mask > 0, axis=-1)), 1.0),
        "rows": jnp.asarray(mask.shape[0], jnp.float32),  # dr_grpo's constant counts every row
    }


def make_loss_fn(
    *,
    temperature: float,
    clip_eps_low: float,
    clip_eps_high: float,
    beta: float,
    kl_estimator: str,
    aggregation: str,
    importance_level: str,
    max_completion_length: int,
    logits_chunk_size: int = 0,
    sapo_temperature_pos: float = 1.0,
    sapo_temperature_neg: float = 1.05,
):
    def loss_fn(model, batch, norms, key):
        kw = dict(temperature=temperature, chunk_size=logits_chunk_size, dropout_key=key)
        logps = completion_logps(model, batch, **kw)
        loss, metrics = grpo_loss(
            logps,
            batch.get("old_logps"),
            batch.get("ref_logps") if beta else None,
            batch["advantages"],
            batch["completion_mask"],
            clip_eps_low=clip_eps_low,
            clip_eps_high=clip_eps_high,
            beta=beta,
            kl_estimator=kl_estimator,
            aggregation=aggregation,
            importance_level=importance_level,
            max_completion_length=max_completion_length,
            num_tokens=norms["tokens"],
            num_sequences=norms["sequences"],
            num_rows=norms["rows"],
            sapo_temperature_pos=sapo_temperature_pos,
            sapo_temperature_neg=sapo_temperature_neg,
        )
        share = metrics.pop("num_tokens") / norms["tokens"]  # token-weighted means add up over micro-batches
        return loss, {k: v * share for k, v in metrics.items()}

    return loss_fn
