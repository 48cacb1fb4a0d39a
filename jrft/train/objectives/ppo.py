"""PPO for RLHF (Schulman et al. 2017, arXiv 1707.06347; Ouyang et al. 2022, arXiv 2203.02155) on a rollout.

Rows are laid out as in :mod:`jrft.train.rollout`: ``[prompt (left-padded, Tp) | completion (Tc)]``. For
completion token ``j`` both the log-prob and the value come from position ``Tp - 1 + j`` (the state that has
seen the prompt and the completion tokens before ``j``): positions ``[-Tc - 1, -1)`` of the sequence.

Batch keys: ``tokens``, ``attention_mask`` (``[N, Tp + Tc]``), ``completion_mask`` (``[N, Tc]``) and, for the
update, ``old_logps``, ``old_values``, ``advantages``, ``returns`` (``[N, Tc]``, constants computed once per
rollout by ``jrft.train.logprobs.make_completion_forward`` and :func:`make_advantage_fn`).

The loss is built from named terms (:data:`TERMS`): ``policy`` (clipped ratio loss) and ``value`` (``vf_coef``
x clipped value loss). A separate value model trains ``("value",)`` while the policy trains ``("policy",)``;
a value head on the policy trains both in one step. Each term is a token sum divided by the global token
count, so gradient accumulation equals the full mini-batch (:mod:`jrft.train.step`).
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
from flax import nnx

from jrft.losses import (
    clipped_policy_loss,
    clipped_value_loss,
    gae,
    kl_penalty_rewards,
    masked_mean,
    whiten,
)
from jrft.train.logprobs import completion_logps, completion_states, completion_values
from jrft.train.reference import frozen_forward


def normalizers(batch):
    mask = batch["completion_mask"].astype(jnp.float32)
    return {"tokens": jnp.maximum(jnp.sum(mask), 1.0)}


# -- loss terms: (model, states, batch, norms, hyper) -> (loss contribution, metric contributions) ----------
# ``states``: ``jrft.train.logprobs.completion_states`` (the completion positions' hidden states and tokens).


def _policy_term(model, states, batch, norms, hp):
    mask = batch["completion_mask"]
    logps = completion_logps(
        model, batch, temperature=hp["temperature"], chunk_size=hp["logits_chunk_size"], states=states
    )
    losses, m = clipped_policy_loss(
        logps, batch["old_logps"], batch["advantages"], mask, clip_eps_low=hp["cliprange"]
    )
    share = jnp.sum(mask.astype(jnp.float32)) / norms["tokens"]  # this micro-batch's share of the tokens
    loss = jnp.sum(losses) / norms["tokens"]
    metrics = {k: m[k] * share for k in ("clip_frac", "approx_kl", "ratio_mean")}
    return loss, {"policy_loss": loss, **metrics}


def _value_term(model, states, batch, norms, hp):
    mask = batch["completion_mask"]
    values = completion_values(model, states[0], None)
    losses, m = clipped_value_loss(
        values, batch["old_values"], batch["returns"], mask, clip_eps=hp["cliprange_value"]
    )
    share = jnp.sum(mask.astype(jnp.float32)) / norms["tokens"]
    value_loss = jnp.sum(losses) / norms["tokens"]
    metrics = {
        "value_loss": value_loss,
        "value_clip_frac": m["value_clip_frac"] * share,
        "value_mean": jnp.sum(jnp.where(mask > 0, values, 0.0)) / norms["tokens"],
    }
    return hp["vf_coef"] * value_loss, metrics


TERMS: dict[str, Callable] = {"policy": _policy_term, "value": _value_term}
# The ``hp`` keys the terms read, in make_loss_fn's keyword order.
HYPERPARAMETERS = ("temperature", "cliprange", "cliprange_value", "vf_coef", "logits_chunk_size")


def make_loss_fn(
    *,
    terms: tuple[str, ...],
    temperature: float = 1.0,
    cliprange: float = 0.2,
    cliprange_value: float = 0.2,
    vf_coef: float = 0.1,
    logits_chunk_size: int = 0,
):
    """``loss_fn(model, batch, norms, key)`` summing the named :data:`TERMS` over one shared forward pass."""
    unknown = [t for t in terms if t not in TERMS]
    if unknown or not terms:
        raise ValueError(
            f"ppo.make_loss_fn: terms must be a non-empty subset of {sorted(TERMS)}, got {terms}"
        )
    hp = dict(
        zip(
            HYPERPARAMETERS,
            (temperature, cliprange, cliprange_value, vf_coef, logits_chunk_size),
            strict=True,
        )
    )

    def loss_fn(model, batch, norms, key):
        # one trunk forward for both terms (padded or packed rows)
        states = completion_states(model, batch, dropout_key=key)
        loss, metrics = 0.0, {}
        for name in terms:
            term_loss, term_metrics = TERMS[name](model, states, batch, norms, hp)
            loss = loss + term_loss
            metrics.update(term_metrics)
        return loss, metrics

    return loss_fn


def make_score_fn(graphdef: nnx.GraphDef, *, logits_chunk_size: int = 0):
    """Jitted ``(params, rest, batch) -> [N]``: a reward model's score of each row (``tokens``,
    ``attention_mask`` and, for a likelihood-scoring reward model, ``completion_mask``: ``[N, T]``;
    :func:`jrft.train.objectives.reward.sequence_rewards`)."""
    from jrft.train.objectives.reward import sequence_rewards

    def score(model, b):
        return sequence_rewards(
            model,
            b["tokens"],
            b["attention_mask"],
            completion_mask=b.get("completion_mask"),
            logits_chunk_size=logits_chunk_size,
        )

    return frozen_forward(graphdef, score)


def explained_variance(values, returns, mask) -> jax.Array:
    """``1 - Var(R - V) / Var(R)`` over unmasked tokens (1: perfect value function, <= 0: no better than
    the mean)."""
    keep = mask > 0
    var_returns = masked_mean(jnp.square(returns - masked_mean(returns, keep)), keep)
    residual = returns - values
    var_residual = masked_mean(jnp.square(residual - masked_mean(residual, keep)), keep)
    return 1.0 - var_residual / jnp.maximum(var_returns, 1e-8)


def make_advantage_fn(
    *,
    kl_coef: float,
    kl_estimator: str,
    gamma: float,
    lam: float,
    whiten_rewards: bool,
    whiten_advantages: bool,
):
    """Jitted ``batch -> ({"advantages", "returns"}, metrics)`` for one rollout.

    Per-token rewards ``-kl_coef * KL_t`` plus the sequence ``scores [N]`` on the last completion token
    (Ziegler et al. 2019), optionally whitened (scale only); GAE (arXiv 1506.02438) against ``old_values``;
    advantages optionally whitened (masked, over the whole rollout). Without ``ref_logps`` in the batch
    (``kl_coef = 0``) the KL is zero.
    """

    @jax.jit
    def advantages(batch):
        mask = batch["completion_mask"]
        keep = mask > 0
        old_logps, values = batch["old_logps"], batch["old_values"]
        ref_logps = batch.get("ref_logps", old_logps)
        rewards, kl = kl_penalty_rewards(
            batch["scores"], old_logps, ref_logps, mask, kl_coef=kl_coef, kl_estimator=kl_estimator
        )
        if whiten_rewards:
            rewards = whiten(rewards, mask, shift_mean=False)
        adv, returns = gae(rewards, values, mask, gamma=gamma, lam=lam)
        if whiten_advantages:
            adv = whiten(adv, mask)
        kl_sum = jnp.sum(kl, axis=-1)  # [N]
        metrics = {
            "kl_mean": masked_mean(kl, keep),
            "kl_sum": jnp.mean(kl_sum),
            "non_score_reward": -kl_coef * jnp.mean(kl_sum),
            "rlhf_reward": jnp.mean(batch["scores"] - kl_coef * kl_sum),
            "returns_mean": masked_mean(returns, keep),
            "old_value_mean": masked_mean(values, keep),
            "explained_variance": explained_variance(values, returns, mask),
        }
        return {"advantages": adv, "returns": returns}, metrics

    return advantages
