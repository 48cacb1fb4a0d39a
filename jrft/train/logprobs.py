"""Log-probabilities of given tokens under a causal LM: the quantity DPO, PPO and GRPO all start from.

Position ``t`` of the model's logits predicts token ``t + 1``, so results are aligned with the *targets*
``tokens[:, 1:]``: ``[B, T - 1]``. Always float32 (DESIGN.md: log-probs in float32 whatever the compute
dtype).
"""

from __future__ import annotations

from collections.abc import Mapping

import jax
import jax.numpy as jnp

from jrft.losses import token_logprobs


def shifted_token_logps(
    model,
    tokens: jax.Array,
    attention_mask: jax.Array,
    *,
    positions: jax.Array | None = None,
    segment_ids: jax.Array | None = None,
    temperature: float = 1.0,
) -> jax.Array:
    """``log p(tokens[:, t+1] | tokens[:, :t+1])`` for every ``t``: ``[B, T - 1]`` float32.

    ``temperature`` divides the logits first (GRPO/PPO score completions under the sampling temperature).
    """
    logits = model(tokens, attention_mask=attention_mask, positions=positions, segment_ids=segment_ids)
    logits = logits[:, :-1].astype(jnp.float32)  # [B, T-1, V]
    if temperature != 1.0:
        logits = logits / temperature
    return token_logprobs(logits, tokens[:, 1:])


def sequence_logps(model, tokens, attention_mask, loss_mask, **kwargs) -> tuple[jax.Array, jax.Array]:
    """Summed log-prob of the tokens where ``loss_mask[:, 1:]`` is 1, and their count: ``([B], [B])``."""
    mask = loss_mask[:, 1:].astype(jnp.float32)
    logps = shifted_token_logps(model, tokens, attention_mask, **kwargs)
    return jnp.sum(logps * mask, axis=-1), jnp.sum(mask, axis=-1)


def pair_sequence_logps(model, batch: Mapping[str, jax.Array]) -> dict[str, jax.Array]:
    """Chosen and rejected completions scored in ONE forward pass (concatenated on the batch axis).

    Expects ``chosen_tokens``, ``chosen_attention_mask``, ``chosen_loss_mask`` and the ``rejected_*``
    twins, each ``[B, T]`` (padded to the same T). Returns ``chosen_logps``, ``rejected_logps``,
    ``chosen_lengths``, ``rejected_lengths``: ``[B]`` each.
    """
    n = batch["chosen_tokens"].shape[0]

    def both(key):
        return jnp.concatenate([batch[f"chosen_{key}"], batch[f"rejected_{key}"]], axis=0)  # [2B, T]

    logps, lengths = sequence_logps(model, both("tokens"), both("attention_mask"), both("loss_mask"))
    return {
        "chosen_logps": logps[:n],
        "rejected_logps": logps[n:],
        "chosen_lengths": lengths[:n],
        "rejected_lengths": lengths[n:],
    }
