"""SFT: masked next-token cross-entropy on completion tokens (``loss_mask``), reduced per token.

Batch keys (``[B, T]``): ``tokens``, ``attention_mask``, ``loss_mask`` (1 on tokens to be learned, aligned
with ``tokens``; position 0 is never a target), optional ``positions`` and ``segment_ids`` (packed rows).
"""

from __future__ import annotations

import jax.numpy as jnp

from jrft.losses import sft_loss


def normalizers(batch):
    mask = batch["loss_mask"][:, 1:].astype(jnp.float32)
    return {"tokens": jnp.maximum(jnp.sum(mask), 1.0)}


def make_loss_fn(*, reduction: str = "token"):
    """``reduction="token"`` (mean over all completion tokens of the global batch) is what TRL does."""
    if reduction != "token":
        raise ValueError("jrft's SFT objective normalises by global token count; reduction must be 'token'")

    def loss_fn(model, batch, norms, key):
        del key
        logits = model(
            batch["tokens"],
            attention_mask=batch["attention_mask"],
            positions=batch.get("positions"),
            segment_ids=batch.get("segment_ids"),
        )
        targets, mask = batch["tokens"][:, 1:], batch["loss_mask"][:, 1:]
        loss, metrics = sft_loss(logits[:, :-1], targets, mask, reduction="token", num_tokens=norms["tokens"])
        share = metrics["num_tokens"] / norms["tokens"]  # this micro-batch's share of the global tokens
        return loss, {"accuracy": metrics["accuracy"] * share, "tokens": metrics["num_tokens"]}

    return loss_fn
