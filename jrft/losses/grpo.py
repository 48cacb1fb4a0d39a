"""GRPO and its variants: group-relative advantages and the clipped, KL-regularised policy loss.

Shapes: ``P`` prompts, ``G`` completions per prompt (a group, contiguous in the batch), ``B = P * G``
sequences, ``T`` completion tokens. Variants are named entries of four registries: :data:`BASELINES` and
:data:`ADVANTAGE_SCALES` (advantages), :data:`IMPORTANCE_LEVELS` and :data:`AGGREGATIONS` (loss).

| recipe | baseline | scale | importance_level | aggregation |
|---|---|---|---|---|
| GRPO (DeepSeekMath, arXiv 2402.03300) | group_mean | group | token | grpo |
| Dr. GRPO (arXiv 2503.20783) | group_mean | none | token | dr_grpo |
| DAPO (arXiv 2503.14476; clip_eps_high > clip_eps_low) | group_mean | group | token | dapo |
| GSPO (arXiv 2507.18071) | group_mean | group | sequence | grpo |
| RLOO (Ahmadian et al. 2024, arXiv 2402.14740) | rloo | none | token | grpo |
| REINFORCE++ (Hu 2025, arXiv 2501.03262) | batch_mean | batch | token | dapo |
| REINFORCE++-baseline | group_mean | batch | token | dapo |
| CISPO (MiniMax-M1, arXiv 2506.13585) | group_mean | group | token | cispo |
| SAPO (arXiv 2511.20347) | group_mean | group | token | sapo |
"""

import jax
import jax.numpy as jnp

from jrft.losses._checks import (
    as_float,
    as_mask,
    check_rank,
    check_same_shape,
    lookup,
    per_token,
    replicate_if_explicit,
)
from jrft.losses.common import batch_counts, kl_estimate, masked_mean
from jrft.losses.ppo import clipped_objective

# ---------------------------------------------------------------------------------------------- advantages
# Each baseline / scale maps (rewards [P, G] with NaN replaced by 0, valid [P, G] bool) to a [P, G] array.


def _count(valid, axis):
    return jnp.sum(valid, axis=axis, keepdims=True).astype(jnp.float32)


def _group_mean(rewards, valid):
    """Mean reward of the group (GRPO)."""
    return jnp.broadcast_to(
        jnp.sum(rewards, -1, keepdims=True) / jnp.maximum(_count(valid, -1), 1.0), rewards.shape
    )


def _leave_one_out(rewards, valid):
    """Mean reward of the *other* completions (RLOO); a lone valid completion is its own baseline."""
    count = _count(valid, -1)
    others = (jnp.sum(rewards, -1, keepdims=True) - rewards) / jnp.maximum(count - 1.0, 1.0)
    return jnp.where(count > 1.0, others, rewards)


def _batch_mean(rewards, valid):
    """Mean reward over the whole batch (REINFORCE++'s global baseline)."""
    return jnp.broadcast_to(jnp.sum(rewards) / jnp.maximum(jnp.sum(valid), 1), rewards.shape)


def _no_baseline(rewards, valid):
    """No baseline (plain REINFORCE)."""
    return jnp.zeros_like(rewards)


# Degrees of freedom subtracted from the count in the std's denominator: the population std (n, jrft's
# default: a group's scaled advantages then have unit RMS whatever G) or the sample std (n - 1, TRL's).
STD_KINDS = {"population": 0.0, "sample": 1.0}


def _std(rewards, valid, axis, ddof):
    count = _count(valid, axis)
    mean = jnp.sum(rewards, axis=axis, keepdims=True) / jnp.maximum(count, 1.0)
    squares = jnp.sum(jnp.where(valid, jnp.square(rewards - mean), 0.0), axis=axis, keepdims=True)
    return jnp.sqrt(squares / jnp.maximum(count - ddof, 1.0))


def _group_std(rewards, valid, eps, ddof):
    """Std of the group's rewards, plus eps (GRPO)."""
    return jnp.broadcast_to(_std(rewards, valid, -1, ddof) + eps, rewards.shape)


def _batch_std(rewards, valid, eps, ddof):
    """Std of all rewards of the batch, plus eps (REINFORCE++)."""
    return jnp.broadcast_to(_std(rewards, valid, None, ddof) + eps, rewards.shape)


def _no_scale(rewards, valid, eps, ddof):
    """No division (divisor 1): Dr. GRPO removes the std normalisation as a difficulty bias."""
    return jnp.ones_like(rewards)


BASELINES = {
    "group_mean": _group_mean,
    "rloo": _leave_one_out,
    "batch_mean": _batch_mean,
    "none": _no_baseline,
}
# A scale returns the divisor of the centred rewards, given (rewards, valid, eps, ddof).
ADVANTAGE_SCALES = {"group": _group_std, "batch": _batch_std, "none": _no_scale}


def group_advantages(
    rewards,
    group_size: int,
    *,
    scale: str = "group",
    baseline: str = "group_mean",
    eps=1e-4,
    std: str = "population",
):
    """Group-relative advantages, one per completion: ``A_i = (r_i - b_i) / (s_i + eps)``.

    GRPO's outcome supervision (DeepSeekMath, arXiv 2402.03300, sec. 4.1.2) is ``baseline="group_mean"``,
    ``scale="group"``: ``A_i = (r_i - mean(r_group)) / (std(r_group) + eps)``. ``scale="none"`` divides by
    nothing (Dr. GRPO, arXiv 2503.20783); ``baseline="rloo"`` uses the mean of the other completions (RLOO,
    arXiv 2402.14740); ``baseline="batch_mean"`` with ``scale="batch"`` is REINFORCE++ (arXiv 2501.03262).
    Stds are over the valid rewards: population stds (divide by n) by default, sample stds (n - 1, TRL's
    ``nanstd``) with ``std="sample"``; they differ by ``sqrt(G / (G - 1))`` (1.155 at G = 4). A NaN reward
    (e.g. a failed reward function) is left out of every statistic and gets advantage 0, so a group whose
    rewards are all NaN gets all zeros.

    Args:
      rewards: ``[P * G]`` scalar rewards, the G completions of each prompt contiguous.
      group_size: G.
      scale: a key of :data:`ADVANTAGE_SCALES`: "group", "batch" or "none".
      baseline: a key of :data:`BASELINES`: "group_mean", "rloo", "batch_mean" or "none".
      eps: added to the std.
      std: a key of :data:`STD_KINDS`: "population" or "sample".

    Returns:
      ``[P * G]`` float32 advantages.
    """
    scale_fn = lookup(ADVANTAGE_SCALES, scale, "advantage scale")
    baseline_fn = lookup(BASELINES, baseline, "advantage baseline")
    ddof = lookup(STD_KINDS, std, "std")
    rewards = replicate_if_explicit(as_float(rewards))
    check_rank("group_advantages", "rewards", rewards, 1, "[num_prompts * group_size]")
    if group_size < 1 or rewards.shape[0] % group_size:
        raise ValueError(
            f"group_advantages: rewards length {rewards.shape[0]} "
            f"is not a multiple of group_size {group_size}"
        )
    grouped = rewards.reshape(-1, group_size)  # [P, G]
    valid = ~jnp.isnan(grouped)
    grouped = jnp.where(valid, grouped, 0.0)
    advantages = grouped - baseline_fn(grouped, valid)
    divisor = scale_fn(grouped, valid, eps, ddof)
    # eps = 0 with a tied group would give 0 / 0: a group with no spread has no signal, so 0.
    advantages = advantages / jnp.where(divisor > 0, divisor, 1.0)
    return jnp.where(valid, advantages, 0.0).reshape(-1)  # [P * G]


# ---------------------------------------------------------------------------------------- importance ratios
# Each maps (log_ratio [B, T] with masked positions 0, keep [B, T]) to the log ratio used per token.


def _token_ratio(log_ratio, keep):
    """Per-token ratio ``pi(y_t) / pi_old(y_t)`` (PPO, GRPO)."""
    return log_ratio


def _sequence_ratio(log_ratio, keep):
    """GSPO's ratio ``s_i = (pi(y_i) / pi_old(y_i)) ** (1 / |y_i|)`` on every token (arXiv 2507.18071)."""
    return jnp.broadcast_to(masked_mean(log_ratio, keep, axis=-1)[:, None], log_ratio.shape)


def _sequence_token_ratio(log_ratio, keep):
    """GSPO-token (arXiv 2507.18071, eq. 13): value ``s_i`` on each token, gradient through each token's own
    log-prob: ``sg[s_i] * pi(y_t) / sg[pi(y_t)]``; equals GSPO when advantages are per sequence."""
    sequence = jax.lax.stop_gradient(_sequence_ratio(log_ratio, keep))
    return sequence + log_ratio - jax.lax.stop_gradient(log_ratio)


IMPORTANCE_LEVELS = {
    "token": _token_ratio,
    "sequence": _sequence_ratio,
    "sequence_token": _sequence_token_ratio,
}

# ---------------------------------------------------------------------------------------------- aggregations
# Each maps per-token losses [B, T] (0 where masked) to the scalar loss, given the batch normalisers.


def _aggregate_grpo(losses, keep, *, num_tokens, num_sequences, num_rows, max_completion_length):
    """Mean over each sequence's tokens, then over sequences (DeepSeekMath, arXiv 2402.03300, eq. 3)."""
    per_sequence = jnp.sum(losses, -1) / jnp.maximum(jnp.sum(keep, -1), 1)
    return jnp.sum(per_sequence) / jnp.maximum(num_sequences, 1.0)


def _aggregate_tokens(losses, keep, *, num_tokens, num_sequences, num_rows, max_completion_length):
    """Sum over all tokens of the batch divided by the number of tokens (DAPO's token-level loss,
    arXiv 2503.14476, eq. 8; "bnpo" is the same normaliser)."""
    return jnp.sum(losses) / jnp.maximum(num_tokens, 1.0)


def _aggregate_dr_grpo(losses, keep, *, num_tokens, num_sequences, num_rows, max_completion_length):
    """Sum over all tokens divided by a constant, ``num_rows * max_completion_length`` (Dr. GRPO,
    arXiv 2503.20783, sec. 3.2): no length bias. Every row counts, a fully masked one too (a constant
    normaliser is the point)."""
    return jnp.sum(losses) / (jnp.maximum(num_rows, 1.0) * max_completion_length)


AGGREGATIONS = {
    "grpo": _aggregate_grpo,
    "bnpo": _aggregate_tokens,
    "dr_grpo": _aggregate_dr_grpo,
    "dapo": _aggregate_tokens,
    "cispo": _aggregate_tokens,  # as TRL: CISPO's token-level mean (MiniMax-M1, arXiv 2506.13585, eq. 4)
    "sapo": _aggregate_grpo,  # as TRL: SAPO's per-sequence mean (arXiv 2511.20347)
}

# ------------------------------------------------------------------------------------------ per-token terms
# Each maps (logps [B, T], log_ratio [B, T], advantages [B, T], keep [B, T]) and its hyperparameters to
# (per-token losses, clipped-low flags, clipped-high flags). The clipped surrogate serves grpo, bnpo,
# dr_grpo and dapo; cispo and sapo replace it.


def _clipped_term(logps, log_ratio, advantages, keep, *, clip_eps_low, clip_eps_high, **_):
    """PPO's clipped surrogate ``-min(rho A, clip(rho, 1 - eps_low, 1 + eps_high) A)``."""
    losses, low, high, _ = clipped_objective(
        log_ratio, advantages, keep, clip_eps_low=clip_eps_low, clip_eps_high=clip_eps_high
    )
    return losses, low, high


def _cispo_term(logps, log_ratio, advantages, keep, *, clip_eps_high, **_):
    """CISPO (MiniMax-M1, arXiv 2506.13585, eq. 4): ``-sg(min(rho, eps_max)) A log pi(y_t)``: the
    importance weight is clipped and detached, every token keeps its REINFORCE gradient. ``eps_max`` is
    ``clip_eps_high`` itself (TRL's and ScaleRL's convention, arXiv 2510.13786, recommended 5.0), not
    ``1 + clip_eps_high``."""
    ratio = jnp.exp(log_ratio)
    weight = jax.lax.stop_gradient(jnp.minimum(ratio, clip_eps_high))
    high = ((ratio > clip_eps_high) & keep).astype(jnp.float32)
    return jnp.where(keep, -weight * advantages * logps, 0.0), jnp.zeros_like(high), high


def _sapo_term(logps, log_ratio, advantages, keep, *, sapo_temperature_pos, sapo_temperature_neg, **_):
    """SAPO (Soft Adaptive Policy Optimization, arXiv 2511.20347): a soft gate instead of the hard clip,
    ``-sigmoid(tau (rho - 1)) * 4 / tau * A`` with ``tau = tau_pos`` where ``A > 0`` else ``tau_neg``; its
    gradient equals the unclipped one at ``rho = 1`` and fades smoothly away from it."""
    tau = jnp.where(advantages > 0, sapo_temperature_pos, sapo_temperature_neg)
    gate = jax.nn.sigmoid(tau * (jnp.exp(log_ratio) - 1.0)) * 4.0 / tau
    none = jnp.zeros(keep.shape, jnp.float32)
    return jnp.where(keep, -gate * advantages, 0.0), none, none


POLICY_TERMS = {"cispo": _cispo_term, "sapo": _sapo_term}  # every other aggregation: _clipped_term


def grpo_loss(
    logps,
    old_logps,
    ref_logps,
    advantages,
    mask,
    *,
    clip_eps_low: float,
    clip_eps_high: float | None = None,
    beta: float,
    kl_estimator: str = "k3",
    aggregation: str = "grpo",
    importance_level: str = "token",
    max_completion_length: int | None = None,
    num_tokens=None,
    num_sequences=None,
    num_rows=None,
    sapo_temperature_pos: float = 1.0,
    sapo_temperature_neg: float = 1.05,
):
    """Clipped, KL-regularised group-relative policy loss (GRPO, DeepSeekMath arXiv 2402.03300, eq. 3).

    Per token: ``l_t = -min(rho_t A, clip(rho_t, 1 - eps_low, 1 + eps_high) A) + beta * KL_t`` with
    ``rho_t = pi(y_t) / pi_old(y_t)`` (``importance_level="token"``) or GSPO's length-normalised sequence
    ratio (``"sequence"``, arXiv 2507.18071), and ``KL_t`` the named estimator of KL(pi || pi_ref) (k3 in the
    paper). ``aggregation`` reduces the ``l_t``: "grpo" (mean per sequence, then over sequences), "bnpo" and
    "dapo" (mean over all tokens, arXiv 2503.14476), "dr_grpo" (sum / (num_rows * max_completion_length),
    arXiv 2503.20783). Two more replace the clipped term too, as TRL's ``loss_type`` does: "cispo"
    (``-sg(min(rho_t, clip_eps_high)) A log pi(y_t)``, token mean; MiniMax-M1, arXiv 2506.13585) and "sapo"
    (``-sigmoid(tau (rho_t - 1)) 4 / tau A``, per-sequence mean; arXiv 2511.20347).

    Micro-batching contract: compute ``num_tokens, num_sequences = batch_counts(full_batch_mask)`` once and
    pass them to each micro-batch's call; the sum of the micro-batch losses (and of their gradients) then
    equals the full-batch loss, for every aggregation. Left as None they are this call's own counts, which
    is right when the call sees the whole batch.

    Args:
      logps: ``[B, T]`` current policy log-probs of the sampled tokens (the only input that gets gradients).
      old_logps: ``[B, T]`` log-probs at sampling time, or None for on-policy (``stop_gradient(logps)``).
      ref_logps: ``[B, T]`` reference log-probs, or None when ``beta == 0``.
      advantages: ``[B]`` per sequence (e.g. :func:`group_advantages`) or ``[B, T]`` per token.
      mask: ``[B, T]`` 0/1 completion mask.
      clip_eps_low: ratios below ``1 - clip_eps_low`` are clipped.
      clip_eps_high: ratios above ``1 + clip_eps_high`` are clipped; None means ``clip_eps_low``.
      beta: KL coefficient.
      kl_estimator: a key of :data:`jrft.losses.KL_ESTIMATORS`.
      aggregation: a key of :data:`AGGREGATIONS`.
      importance_level: a key of :data:`IMPORTANCE_LEVELS`: "token", "sequence" (GSPO), "sequence_token".
      max_completion_length: the constant of "dr_grpo"; None means T.
      num_tokens: global count of unmasked tokens (see the contract above).
      num_sequences: global count of rows with any unmasked token.
      num_rows: global count of rows, fully masked ones included ("dr_grpo"'s constant); None: this call's.
      sapo_temperature_pos: SAPO's tau where the advantage is positive (TRL's default 1.0).
      sapo_temperature_neg: SAPO's tau elsewhere (TRL's default 1.05).

    Returns:
      ``(loss, metrics)``: the scalar float32 loss, and masked means over this call's tokens:
      ``clip_frac_low``, ``clip_frac_high``, ``clip_frac``, ``ratio_mean``, ``kl_mean`` (0 without a
      reference), ``num_tokens`` (this call's count).
    """
    aggregate = lookup(AGGREGATIONS, aggregation, "GRPO aggregation")
    to_ratio = lookup(IMPORTANCE_LEVELS, importance_level, "importance_level")
    check_rank("grpo_loss", "logps", logps, 2, "[batch, seq]")
    check_same_shape("grpo_loss", logps=logps, old_logps=old_logps, ref_logps=ref_logps, mask=mask)
    advantages = per_token(advantages, logps, "grpo_loss")
    if ref_logps is None and not isinstance(beta, jax.Array) and beta != 0:
        raise ValueError(f"grpo_loss: beta={beta} needs ref_logps (pass ref_logps, or beta=0.0)")
    keep = as_mask(mask, logps)
    logps = jnp.where(keep, as_float(logps), 0.0)
    old_logps = (
        jax.lax.stop_gradient(logps) if old_logps is None else jnp.where(keep, as_float(old_logps), 0.0)
    )
    clip_eps_high = clip_eps_low if clip_eps_high is None else clip_eps_high

    log_ratio = to_ratio(logps - old_logps, keep)
    term = POLICY_TERMS.get(aggregation, _clipped_term)
    losses, low, high = term(
        logps,
        log_ratio,
        advantages,
        keep,
        clip_eps_low=clip_eps_low,
        clip_eps_high=clip_eps_high,
        sapo_temperature_pos=sapo_temperature_pos,
        sapo_temperature_neg=sapo_temperature_neg,
    )
    kl = jnp.zeros_like(losses)
    if ref_logps is not None:
        kl = jnp.where(
            keep, kl_estimate(logps, jnp.where(keep, as_float(ref_logps), 0.0), estimator=kl_estimator), 0.0
        )
        losses = losses + beta * kl

    local_tokens, local_sequences = batch_counts(keep)
    loss = aggregate(
        losses,
        keep,
        num_tokens=local_tokens if num_tokens is None else as_float(num_tokens),
        num_sequences=local_sequences if num_sequences is None else as_float(num_sequences),
        num_rows=float(keep.shape[0]) if num_rows is None else as_float(num_rows),
        max_completion_length=keep.shape[1] if max_completion_length is None else max_completion_length,
    )
    metrics = {
        "clip_frac_low": masked_mean(low, keep),
        "clip_frac_high": masked_mean(high, keep),
        "clip_frac": masked_mean(low + high, keep),
        "ratio_mean": masked_mean(jnp.exp(log_ratio), keep),
        "kl_mean": masked_mean(kl, keep),
        "num_tokens": local_tokens,
    }
    return loss, metrics
