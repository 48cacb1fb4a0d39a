"""GRPO's policy update (DeepSeekMath, arXiv 2402.03300) on a rollout batch, via ``jrft.losses.grpo_loss``.

Batch keys: ``tokens``, ``attention_mask`` (``[N, Tp + Tc]``), ``completion_mask`` (``[N, Tc]``),
``advantages`` (``[N]``), optional ``old_logps`` and ``ref_logps`` (``[N, Tc]``). Without ``old_logps`` the
update is on-policy (``mu = 1``, one mini-batch): the ratio is exactly 1 and only the clipped objective's
gradient remains.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from jrft.losses import grpo_loss
from jrft.train.logprobs import chunked_token_logps, shifted_token_logps


def completion_logps(model, batch, *, temperature: float, chunk_size: int = 0) -> jax.Array:
    """``[N, Tc]`` float32 log-probs of the completion tokens (logits divided by ``temperature``;
    ``chunk_size``: see ``jrft.train.logprobs``)."""
    tc = batch["completion_mask"].shape[1]
    tokens = batch["tokens"]
    if chunk_size > 0:  # the LM head on completion positions only, chunked
        hidden = model.hidden(tokens, batch["attention_mask"])  # [N, T, D]
        return chunked_token_logps(
            model, hidden[:, -tc - 1 : -1], tokens[:, -tc:], chunk_size=chunk_size, temperature=temperature
        )
    logps = shifted_token_logps(model, tokens, batch["attention_mask"], temperature=temperature)
    return logps[:, -tc:]  # target j of the completion sits at shifted position Tp - 1 + j


def normalizers(batch):
    mask = batch["completion_mask"].astype(jnp.float32)
    return {
        "tokens": jnp.maximum(jnp.sum(mask), 1.0),
        "sequences": jnp.maximum(jnp.sum(jnp.any(mask > 0, axis=-1)), 1.0),
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
):
    def loss_fn(model, batch, norms, key):
        del key
        logps = completion_logps(model, batch, temperature=temperature, chunk_size=logits_chunk_size)
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
        )
        share = metrics.pop("num_tokens") / norms["tokens"]  # token-weighted means add up over micro-batches
        return loss, {k: v * share for k, v in metrics.items()}

    return loss_fn


def make_logps_fn(graphdef: nnx.GraphDef, *, temperature: float, logits_chunk_size: int = 0):
    """Jitted ``(params, rest, batch) -> [N, Tc]`` completion log-probs, no gradients (old / reference)."""

    @jax.jit
    def logps_fn(params, rest, batch):
        model = nnx.merge(graphdef, params, rest)
        logps = completion_logps(model, batch, temperature=temperature, chunk_size=logits_chunk_size)
        return jax.lax.stop_gradient(logps)

    return logps_fn
