"""Reward model: decoder + scalar head trained with Bradley–Terry on (chosen, rejected) pairs, or listwise
(Plackett–Luce) on whole rankings.

The reward of a sequence is the head's output at its last real token.

* Pairs (:func:`make_loss_fn`): batch keys as for DPO (``chosen_tokens``, ``chosen_attention_mask``,
  ``rejected_*``: ``[B, T]``), optional ``margin`` ``[B]``.
* Rankings (:func:`make_listwise_loss_fn`): the ``ranking`` batch kind of :mod:`jrft.data.batching`:
  ``tokens``, ``attention_mask`` ``[B, K, T]`` (K completions of one prompt), ``item_mask`` ``[B, K]``,
  ``ranking`` ``[B, K]`` (item indices, best first; ``item_mask`` also masks ranking positions).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from jrft.losses import bradley_terry_loss, plackett_luce_loss
from jrft.train.objectives.pairs import valid_rows


def last_token_index(attention_mask: jax.Array) -> jax.Array:
    """Index of the last 1 in each row of ``attention_mask [B, T]`` (works for left and right padding)."""
    t = attention_mask.shape[-1]
    return t - 1 - jnp.argmax(attention_mask[:, ::-1] > 0, axis=-1)


def sequence_rewards(
    model, tokens: jax.Array, attention_mask: jax.Array, dropout_key: jax.Array | None = None
) -> jax.Array:
    """``[B]`` float32 rewards: the scalar head at each row's last real token (``dropout_key``: a training
    forward's, for LoRA dropout)."""
    scores = model.score(tokens, attention_mask=attention_mask, dropout_key=dropout_key)  # [B, T]
    idx = last_token_index(attention_mask)
    return jnp.take_along_axis(scores.astype(jnp.float32), idx[:, None], axis=-1)[:, 0]


def pair_rewards(model, batch, dropout_key: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
    """Chosen and rejected rewards ``([B], [B])`` from one forward pass over both."""
    n = batch["chosen_tokens"].shape[0]
    tokens = jnp.concatenate([batch["chosen_tokens"], batch["rejected_tokens"]], axis=0)
    mask = jnp.concatenate([batch["chosen_attention_mask"], batch["rejected_attention_mask"]], axis=0)
    rewards = sequence_rewards(model, tokens, mask, dropout_key)
    return rewards[:n], rewards[n:]


def make_loss_fn(*, center_coef: float = 0.0):
    def loss_fn(model, batch, norms, key):
        chosen, rejected = pair_rewards(model, batch, key)
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


def ranking_normalizers(batch):
    """Global counts of real rankings and of the ordered pairs (better, worse) they contain."""
    n = jnp.sum(batch["item_mask"] > 0, axis=-1).astype(jnp.float32)  # [B] items per ranking
    return {
        "rankings": jnp.maximum(jnp.sum(n > 0), 1.0),
        "pairs": jnp.maximum(jnp.sum(n * (n - 1) / 2), 1.0),
    }


def ranking_scores(model, batch, dropout_key: jax.Array | None = None) -> jax.Array:
    """``[B, K]`` rewards of every item of every ranking from ONE forward pass over ``[B * K, T]`` rows."""
    b, k, t = batch["tokens"].shape
    tokens = batch["tokens"].reshape(b * k, t)  # [B*K, T]
    mask = batch["attention_mask"].reshape(b * k, t)
    # Filler items (all-zero masks) score the head at position T-1 of padding; they are masked out below.
    return sequence_rewards(model, tokens, mask, dropout_key).reshape(b, k)  # [B, K]


def ranking_accuracies(scores: jax.Array, ranking: jax.Array, item_mask: jax.Array):
    """Per ranking: ``(correct ordered pairs, top-1 correct)``, ``([B], [B])`` float32.

    An ordered pair is ranking positions ``i < j`` (both real); it is correct when the item at ``i`` scores
    strictly higher. Top-1 is correct when the best-ranked item has the strictly highest score.
    """
    ordered = jnp.take_along_axis(scores, ranking, axis=-1)  # [B, K] scores, best first
    keep = item_mask > 0
    k = scores.shape[-1]
    upper = np.triu(np.ones((k, k), dtype=bool), k=1)  # upper[i, j]: i ranked above j
    pairs = upper[None] & keep[:, :, None] & keep[:, None, :]  # [B, K, K]
    correct = jnp.sum(jnp.where(pairs, ordered[:, :, None] > ordered[:, None, :], False), axis=(1, 2))
    best_beats_rest = jnp.all(jnp.where(pairs[:, 0, :], ordered[:, :1] > ordered, True), axis=-1)
    top1 = best_beats_rest & jnp.any(keep, axis=-1)
    return correct.astype(jnp.float32), top1.astype(jnp.float32)


def make_listwise_loss_fn(*, center_coef: float = 0.0):
    """Plackett–Luce negative log-likelihood of each ranking (Plackett 1975; Zhu et al. 2023, arXiv
    2301.11270), mean over the global batch's rankings; plus ``center_coef x (sum of the ranking's
    rewards)^2`` (for K = 2 exactly Bradley–Terry's centring term).

    Metrics: ``accuracy`` (pairwise, over all ordered pairs of every ranking), ``top1_accuracy``, and the
    mean reward of the best- and worst-ranked items.
    """

    def loss_fn(model, batch, norms, key):
        scores = ranking_scores(model, batch, key)  # [B, K]
        item_mask = batch["item_mask"]
        ranking = batch["ranking"].astype(jnp.int32)
        losses = plackett_luce_loss(scores, ranking, mask=item_mask)  # [B]
        if center_coef:
            losses = losses + center_coef * jnp.square(jnp.sum(jnp.where(item_mask > 0, scores, 0.0), -1))
        correct, top1 = ranking_accuracies(scores, ranking, item_mask)
        ordered = jnp.take_along_axis(scores, ranking, axis=-1)  # [B, K] best first
        n = jnp.sum(item_mask > 0, axis=-1)  # [B]
        real = (n > 0).astype(jnp.float32)
        worst = jnp.take_along_axis(ordered, jnp.maximum(n - 1, 0)[:, None], axis=-1)[:, 0]

        def mean(x):  # contribution to the mean over the global batch's real rankings
            return jnp.sum(x * real) / norms["rankings"]

        metrics = {
            "accuracy": jnp.sum(correct) / norms["pairs"],
            "top1_accuracy": mean(top1),
            "rewards/best": mean(ordered[:, 0]),
            "rewards/worst": mean(worst),
        }
        return mean(losses), metrics

    return loss_fn
