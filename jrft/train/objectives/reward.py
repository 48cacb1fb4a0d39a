"""Reward model: decoder + scalar head trained with Bradley–Terry on (chosen, rejected) pairs, or listwise
(Plackett–Luce) on whole rankings.

The reward of a sequence is the head's output at its last real token; a reward model whose
``ModelConfig.reward_likelihood_coef`` is ``c > 0`` adds ``c x`` the completion's summed log-prob under its
own LM head (:func:`sequence_rewards`), so Bradley-Terry trains the language model's likelihood of the
answer too.

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
from jrft.train.logprobs import hidden_token_logps
from jrft.train.objectives.pairs import valid_rows


def last_token_index(attention_mask: jax.Array) -> jax.Array:
    """Index of the last 1 in each row of ``attention_mask [B, T]`` (works for left and right padding)."""
    t = attention_mask.shape[-1]
    return t - 1 - jnp.argmax(attention_mask[:, ::-1] > 0, axis=-1)


def reward_parts(
    model,
    tokens: jax.Array,
    attention_mask: jax.Array,
    dropout_key: jax.Array | None = None,
    *,
    completion_mask: jax.Array | None = None,
    logits_chunk_size: int = 0,
    with_likelihood: bool = False,
) -> tuple[jax.Array, jax.Array | None]:
    """``(head [B], likelihood [B] or None)`` from one trunk forward: the scalar head at each row's last real
    token, and the summed log-prob of the completion tokens under the model's own LM head (computed when
    ``with_likelihood`` or the model's ``config.reward_likelihood_coef`` is > 0).

    Args:
      model: a ``jrft.models.Decoder`` with a scalar head.
      tokens, attention_mask: ``[B, T]`` prompt + completion rows (left or right padding).
      dropout_key: a training forward's (LoRA dropout).
      completion_mask: ``[B, T]`` 1 on the completion's tokens (each is scored given everything before it);
        required for the likelihood.
      logits_chunk_size: > 0 computes the log-probs that many positions at a time (never all ``[B, T, V]``).
    """
    hidden = model.hidden(tokens, attention_mask, dropout_key=dropout_key)  # [B, T, D]
    scores = model.scalar_head(hidden)  # [B, T]
    idx = last_token_index(attention_mask)
    head = jnp.take_along_axis(scores.astype(jnp.float32), idx[:, None], axis=-1)[:, 0]
    coef = model.config.reward_likelihood_coef
    if not (coef or with_likelihood):
        return head, None
    if completion_mask is None:
        raise ValueError(
            f"reward_parts: the completion's log-prob (reward_likelihood_coef={coef}) needs a "
            "completion_mask [B, T]"
        )
    logps = hidden_token_logps(model, hidden[:, :-1], tokens[:, 1:], chunk_size=logits_chunk_size)
    return head, jnp.sum(logps * completion_mask[:, 1:].astype(jnp.float32), axis=-1)


def sequence_rewards(
    model,
    tokens: jax.Array,
    attention_mask: jax.Array,
    dropout_key: jax.Array | None = None,
    *,
    completion_mask: jax.Array | None = None,
    logits_chunk_size: int = 0,
) -> jax.Array:
    """``[B]`` float32 rewards: the scalar head at each row's last real token, plus, for a model with
    ``config.reward_likelihood_coef = c > 0``, ``c x`` the summed log-prob of the completion tokens under the
    model's own LM head (arguments as :func:`reward_parts`; ``completion_mask`` is needed when ``c > 0``)."""
    head, likelihood = reward_parts(
        model,
        tokens,
        attention_mask,
        dropout_key,
        completion_mask=completion_mask,
        logits_chunk_size=logits_chunk_size,
    )
    return _total(model, head, likelihood)


def _total(model, head: jax.Array, likelihood: jax.Array | None) -> jax.Array:
    """``head + reward_likelihood_coef x likelihood`` (the head alone when the coefficient is 0)."""
    coef = model.config.reward_likelihood_coef
    return head + coef * likelihood if coef else head


def _pair_parts(model, batch, dropout_key, *, logits_chunk_size: int, with_likelihood: bool):
    """``(rewards [2B], likelihood [2B] or None)`` of the chosen rows then the rejected rows, one forward
    (the ``*_loss_mask`` rows mark each completion)."""
    both = {
        key: jnp.concatenate([batch[f"chosen_{key}"], batch[f"rejected_{key}"]], axis=0)
        for key in ("tokens", "attention_mask", "loss_mask")
    }
    head, likelihood = reward_parts(
        model,
        both["tokens"],
        both["attention_mask"],
        dropout_key,
        completion_mask=both["loss_mask"],
        logits_chunk_size=logits_chunk_size,
        with_likelihood=with_likelihood,
    )
    return _total(model, head, likelihood), likelihood


def pair_rewards(
    model, batch, dropout_key: jax.Array | None = None, *, logits_chunk_size: int = 0
) -> tuple[jax.Array, jax.Array]:
    """Chosen and rejected rewards ``([B], [B])`` from one forward pass over both."""
    n = batch["chosen_tokens"].shape[0]
    rewards, _ = _pair_parts(
        model, batch, dropout_key, logits_chunk_size=logits_chunk_size, with_likelihood=False
    )
    return rewards[:n], rewards[n:]


def make_loss_fn(*, center_coef: float = 0.0, sft_coef: float = 0.0, logits_chunk_size: int = 0):
    """Bradley-Terry on (chosen, rejected) rewards (:func:`jrft.losses.bradley_terry_loss`), plus
    ``sft_coef x`` the chosen answer's mean per-token negative log-likelihood under the model's LM head (a
    text-generation regulariser of the reward model, GRM: Yang et al. 2024, arXiv 2406.10216); mean over the
    global batch's real pairs."""

    def loss_fn(model, batch, norms, key):
        n = batch["chosen_tokens"].shape[0]
        rewards, likelihood = _pair_parts(
            model, batch, key, logits_chunk_size=logits_chunk_size, with_likelihood=sft_coef > 0
        )
        chosen, rejected = rewards[:n], rewards[n:]
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
        if sft_coef > 0:  # the chosen answers' mean per-token NLL
            count = jnp.maximum(jnp.sum(batch["chosen_loss_mask"][:, 1:], axis=-1), 1).astype(jnp.float32)
            nll = -likelihood[:n] / count
            metrics["nll_chosen"] = mean(nll)
            losses = losses + sft_coef * nll
        return mean(losses), metrics

    return loss_fn


def ranking_normalizers(batch):
    """Global counts of real rankings and of the ordered pairs (better, worse) they contain."""
    n = jnp.sum(batch["item_mask"] > 0, axis=-1).astype(jnp.float32)  # [B] items per ranking
    return {
        "rankings": jnp.maximum(jnp.sum(n > 0), 1.0),
        "pairs": jnp.maximum(jnp.sum(n * (n - 1) / 2), 1.0),
    }


def ranking_scores(
    model, batch, dropout_key: jax.Array | None = None, *, logits_chunk_size: int = 0
) -> jax.Array:
    """``[B, K]`` rewards of every item of every ranking from ONE forward pass over ``[B * K, T]`` rows."""
    b, k, t = batch["tokens"].shape
    rows = {key: batch[key].reshape(b * k, t) for key in ("tokens", "attention_mask", "loss_mask")}
    # Filler items (all-zero masks) score the head at position T-1 of padding; they are masked out below.
    rewards = sequence_rewards(
        model,
        rows["tokens"],
        rows["attention_mask"],
        dropout_key,
        completion_mask=rows["loss_mask"],
        logits_chunk_size=logits_chunk_size,
    )
    return rewards.reshape(b, k)  # [B, K]


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


def make_listwise_loss_fn(*, center_coef: float = 0.0, logits_chunk_size: int = 0):
    """Plackett–Luce negative log-likelihood of each ranking (Plackett 1975; Zhu et al. 2023, arXiv
    2301.11270), mean over the global batch's rankings; plus ``center_coef x (sum of the ranking's
    rewards)^2`` (for K = 2 exactly Bradley–Terry's centring term).

    Metrics: ``accuracy`` (pairwise, over all ordered pairs of every ranking), ``top1_accuracy``, and the
    mean reward of the best- and worst-ranked items.
    """

    def loss_fn(model, batch, norms, key):
        scores = ranking_scores(model, batch, key, logits_chunk_size=logits_chunk_size)  # [B, K]
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
