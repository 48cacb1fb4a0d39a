"""What the pairwise objectives (reward model, DPO) share: which rows are real, and their global count."""

from __future__ import annotations

import jax
import jax.numpy as jnp


def valid_rows(batch) -> jax.Array:
    """``[B]`` 1.0 for real pairs; evaluation batches are filled up with empty rows (``valid`` = 0)."""
    if "valid" in batch:
        return batch["valid"].astype(jnp.float32)
    return jnp.ones((batch["chosen_tokens"].shape[0],), jnp.float32)


def normalizers(batch):
    """Global count of real pairs in the whole (not yet micro-batched) batch."""
    return {"pairs": jnp.maximum(jnp.sum(valid_rows(batch)), 1.0)}
