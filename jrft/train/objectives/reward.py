"""Reward model: decoder + scalar head trained with Bradley–Terry on (chosen, rejected) pairs.

The reward of a sequence is the head's output at its last real token. Batch keys as for DPO
(``chosen_tokens``, ``chosen_attention_mask``, ``rejected_*``: ``[B, T]``), optional ``margin`` ``[B]``.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jrft.losses import bradley_terry_loss
from jrft.train.objectives.pairs import valid_rows


def last_token_index(attention_mask: jax.Array) -> jax.Array:
    """Index of the last 1 in each row of ``attention_mask [B, T]`` (works for left and right padding)."""
    t = attention_mask.shape[-1]
    return t - 1 - jnp.argmax(attention_mask[:, ::-1] > 0, axis=-1)


def sequence_rewards(model, tokens: jax.Array, attention_mask: jax.Array) -> jax.Array:
    """``[B]`` float32 rewards: the scalar head at each row's last real token."""
    scores = model.score(tokens, attention_mask=attention_mask)  # [B, T]
    idx = last_token_index(attention_mask)
    return jnp.take_along_axis(scores.astype(jnp.float32), idx[:, None], axis=-1)[:, 0]


def pair_rewards(model, batch) -> tuple[jax.Array, jax.Array]:
    """Chosen and rejected rewards ``([B], [B])`` from one forward pass over both."""
    n = batch["chosen_tokens"].shape[0]
    tokens = jnp.concatenate([batch["chosen_tokens"], batch["rejected_tokens"]], axis=0)
    mask = jnp.concatenate([batch["chosen_attention_mask"], batch["rejected_attention_mask"]], axis=0)
    rewards = sequence_rewards(model, tokens, mask)
    return rewards[:n], rewards[n:]


def make_loss_fn(*, center_coef: float = 0.0):
    def loss_fn(model, batch, norms, key):
        del key
        chosen, rejected = pair_rewards(model, batch)
        losses = bradley_terry_loss(chosen, rejected, margin=batch.get("margin"), center_coef=center_coef)
        valid = valid_rows(batch)

        def mean(x):  # contribution to the mean over the global batch's real pairs
            return jnp.sum(x * valid) / norms["pairs"]

        metrics = {
            "accuracy": mean((chosen > rejected).astype(jnp.float32)),
            "rewards/chosen": mean(chosen),
            "rewards/rejected": mean(rejected),
            "rewards/margins": mean(chosen - rejected),
        }
        return mean(losses), metrics

    return loss_fn
