"""SFT: masked next-token cross-entropy on completion tokens (``loss_mask``), reduced per token.

Batch keys (``[B, T]``): ``tokens``, ``attention_mask``, ``loss_mask`` (1 on tokens to be learned, aligned
with ``tokens``; position 0 is never a target), optional ``positions`` and ``segment_ids`` (packed rows).
"""

from __future__ import annotations

import jax.numpy as jnp

from jrft.losses import batch_counts, masked_mean, sft_loss
from jrft.train.logprobs import chunked_token_logps


def normalizers(batch):
    mask = batch["loss_mask"][:, 1:].astype(jnp.float32)
    return {"tokens": jnp.maximum(jnp.sum(mask), 1.0)}


def _chunked_loss(model, batch, norms, chunk_size, dropout_key):
    """The same token-mean cross-entropy and accuracy as ``sft_loss``, without the full ``[B, T, V]``
    logits (``jrft.train.logprobs.chunked_token_logps``)."""
    hidden = model.hidden(
        batch["tokens"],
        batch["attention_mask"],
        batch.get("positions"),
        segment_ids=batch.get("segment_ids"),
        dropout_key=dropout_key,
    )  # [B, T, D]
    targets, keep = batch["tokens"][:, 1:], batch["loss_mask"][:, 1:] > 0
    logps, correct = chunked_token_logps(
        model, hidden[:, :-1], targets, chunk_size=chunk_size, with_correct=True
    )
    loss = -jnp.sum(jnp.where(keep, logps, 0.0)) / norms["tokens"]
    num_tokens, _ = batch_counts(keep)
    return loss, {"accuracy": masked_mean(correct.astype(jnp.float32), keep), "num_tokens": num_tokens}


def make_loss_fn(*, reduction: str = "token", logits_chunk_size: int = 0):
    """``reduction="token"`` (mean over all completion tokens of the global batch) is what TRL does.

    ``logits_chunk_size > 0`` computes the LM head and cross-entropy over sequence chunks of that many
    positions (same values; the full float32 logits never exist: ``train.logits_chunk_size``).
    """
    if reduction != "token":
        raise ValueError("jrft's SFT objective normalises by global token count; reduction must be 'token'")
    if logits_chunk_size < 0:
        raise ValueError(f"logits_chunk_size must be >= 0, got {logits_chunk_size}")

    def loss_fn(model, batch, norms, key):
        if logits_chunk_size:
            loss, metrics = _chunked_loss(model, batch, norms, logits_chunk_size, key)
        else:
            logits = model(
                batch["tokens"],
                attention_mask=batch["attention_mask"],
                positions=batch.get("positions"),
                segment_ids=batch.get("segment_ids"),
                dropout_key=key,
            )
            targets, mask = batch["tokens"][:, 1:], batch["loss_mask"][:, 1:]
            loss, metrics = sft_loss(
                logits[:, :-1], targets, mask, reduction="token", num_tokens=norms["tokens"]
            )
        share = metrics["num_tokens"] / norms["tokens"]  # this micro-batch's share of the global tokens
        return loss, {"accuracy": metrics["accuracy"] * share, "tokens": metrics["num_tokens"]}

    return loss_fn
