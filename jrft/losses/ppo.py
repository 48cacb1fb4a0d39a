"""PPO for RLHF: GAE, whitening, clipped policy and value losses, KL-penalised per-token rewards.

Shapes: ``B`` sequences, ``T`` completion tokens; every per-token array is ``[B, T]`` with a 0/1 ``mask``
(1 = a generated token that counts). Masked positions are never read: they may hold padding garbage.
References: PPO, Schulman et al. 2017 (arXiv 1707.06347); GAE, Schulman et al. 2015 (arXiv 1506.02438);
RLHF with a per-token KL penalty, Ziegler et al. 2019 (arXiv 1909.08593), Ouyang et al. 2022 (2203.02155).
"""

import jax
import jax.numpy as jnp

from jrft.losses._checks import as_float, as_mask, check_rank, check_same_shape, per_token
from jrft.losses.common import k3, kl_estimate, masked_mean


def gae(rewards, values, mask, *, gamma: float, lam: float, bootstrap_values=None):
    """Generalised advantage estimation over each sequence's unmasked tokens, as a reverse ``lax.scan``.

    ``delta_t = r_t + gamma V_{t+1} - V_t`` and ``A_t = delta_t + gamma lam A_{t+1}`` (GAE, arXiv 1506.02438,
    eq. 16), where ``t + 1`` is the next *unmasked* position; past the last one ``V = bootstrap_values`` (0 by
    default: the completion ended) and ``A = 0``. Returns are ``A_t + V_t``. Masking a token is the same as
    deleting it from the sequence. Treat the outputs as constants (no gradient through them) in the loss.

    Args:
      rewards: ``[B, T]`` per-token rewards (e.g. from :func:`kl_penalty_rewards`).
      values: ``[B, T]`` value estimates of the state before each token.
      mask: ``[B, T]`` 0/1.
      gamma: discount.
      lam: GAE lambda (0: one-step TD, 1: Monte Carlo returns minus values).
      bootstrap_values: ``[B]`` value after the last token for truncated sequences, or None for 0.

    Returns:
      ``(advantages [B, T], returns [B, T])``, float32, 0 at masked positions.
    """
    check_rank("gae", "rewards", rewards, 2, "[batch, seq]")
    check_same_shape("gae", rewards=rewards, values=values, mask=mask)
    keep = as_mask(mask, rewards)
    rewards = jnp.where(keep, as_float(rewards), 0.0)
    values = jnp.where(keep, as_float(values), 0.0)
    if bootstrap_values is None:
        next_value = jnp.zeros_like(rewards[:, 0])  # [B], sharded like the batch
    else:
        check_same_shape("gae", bootstrap_values=bootstrap_values, batch=rewards[:, 0])
        next_value = as_float(bootstrap_values)

    def step(carry, inputs):
        next_value, next_adv = carry
        reward, value, valid = inputs  # each [B]
        delta = reward + gamma * next_value - value
        adv = jnp.where(valid, delta + gamma * lam * next_adv, 0.0)
        carry = (jnp.where(valid, value, next_value), jnp.where(valid, adv, next_adv))
        return carry, adv

    init = (next_value, jnp.zeros_like(next_value))
    _, advantages = jax.lax.scan(step, init, (rewards.T, values.T, keep.T), reverse=True)  # [T, B]
    advantages = advantages.T  # [B, T]
    return advantages, jnp.where(keep, advantages + values, 0.0)


def whiten(values, mask, *, shift_mean: bool = True, eps: float = 1e-8):
    """Masked whitening: ``(x - mean) / sqrt(var + eps)`` over the unmasked entries, 0 at masked ones.

    Mean and (population) variance are taken over every unmasked entry of the batch. With
    ``shift_mean=False`` the mean is added back (only the scale changes), as is usual for PPO rewards.

    Args:
      values: ``[B, T]`` (any shape).
      mask: same shape, 0/1.

    Returns:
      float32 array of ``values``' shape.
    """
    check_same_shape("whiten", values=values, mask=mask)
    keep = as_mask(mask, values)
    values = jnp.where(keep, as_float(values), 0.0)
    mean = masked_mean(values, keep)
    var = masked_mean(jnp.square(values - mean), keep)
    out = (values - mean) * jax.lax.rsqrt(var + eps)
    if not shift_mean:
        out = out + mean
    return jnp.where(keep, out, 0.0)


def clipped_objective(log_ratio, advantages, keep, *, clip_eps_low, clip_eps_high, dual_clip=None):
    """Per-token PPO-clip loss from log importance ratios (used by :func:`clipped_policy_loss` and GRPO).

    ``loss_t = max(-A_t rho_t, -A_t clip(rho_t, 1 - eps_low, 1 + eps_high))``, ``rho_t = exp(log_ratio_t)``
    (PPO, arXiv 1707.06347, eq. 7; asymmetric "clip-higher" bounds from DAPO, arXiv 2503.14476). With
    ``dual_clip = c > 1``, tokens with ``A_t < 0`` are also capped at ``-c A_t`` (Ye et al. 2020,
    arXiv 1912.09729, eq. 5).

    Args:
      log_ratio: ``[B, T]`` log importance ratio ``log pi - log pi_old``.
      advantages: ``[B, T]``.
      keep: ``[B, T]`` bool mask.

    Returns:
      ``(losses, low_clipped, high_clipped, dual_clipped)``, all ``[B, T]``; the three flags are 0/1 float32
      (a clip that is active: the ratio left the trust region in the direction the advantage pushes it).
    """
    log_ratio = jnp.where(keep, log_ratio, 0.0)
    advantages = jnp.where(keep, advantages, 0.0)
    ratio = jnp.exp(log_ratio)
    unclipped = -advantages * ratio
    clipped = -advantages * jnp.clip(ratio, 1.0 - clip_eps_low, 1.0 + clip_eps_high)
    losses = jnp.maximum(unclipped, clipped)
    low = keep & (ratio < 1.0 - clip_eps_low) & (advantages < 0)
    high = keep & (ratio > 1.0 + clip_eps_high) & (advantages > 0)
    dual = jnp.zeros_like(keep)
    if dual_clip is not None:
        cap = -dual_clip * advantages
        dual = keep & (advantages < 0) & (losses > cap)
        losses = jnp.where(advantages < 0, jnp.minimum(losses, cap), losses)
    flags = (low.astype(jnp.float32), high.astype(jnp.float32), dual.astype(jnp.float32))
    return (jnp.where(keep, losses, 0.0), *flags)


def clipped_policy_loss(
    logps,
    old_logps,
    advantages,
    mask,
    *,
    clip_eps_low: float,
    clip_eps_high: float | None = None,
    dual_clip=None,
):
    """PPO clipped surrogate policy loss, per token (see :func:`clipped_objective` for the formula).

    Args:
      logps: ``[B, T]`` current policy log-probs of the sampled tokens.
      old_logps: ``[B, T]`` log-probs under the policy that sampled them.
      advantages: ``[B, T]`` per-token advantages (e.g. whitened :func:`gae` output), or ``[B]`` per sequence.
      mask: ``[B, T]`` 0/1.
      clip_eps_low: lower clip range (ratio >= 1 - eps_low).
      clip_eps_high: upper clip range; None means equal to ``clip_eps_low``.
      dual_clip: the dual-clip constant ``c > 1``, or None.

    Returns:
      ``(losses [B, T], metrics)``: losses 0 at masked tokens (reduce with :func:`masked_mean` or a global
      count); metrics are masked means over this call's tokens: ``clip_frac_low``, ``clip_frac_high``,
      ``clip_frac``, ``dual_clip_frac``, ``ratio_mean``, ``approx_kl`` (k3 estimate of KL(old || new)).
    """
    check_rank("clipped_policy_loss", "logps", logps, 2, "[batch, seq]")
    check_same_shape("clipped_policy_loss", logps=logps, old_logps=old_logps, mask=mask)
    advantages = per_token(advantages, logps, "clipped_policy_loss")
    if dual_clip is not None and not isinstance(dual_clip, jax.Array) and dual_clip <= 1.0:
        raise ValueError(f"clipped_policy_loss: dual_clip must be > 1, got {dual_clip}")
    keep = as_mask(mask, logps)
    clip_eps_high = clip_eps_low if clip_eps_high is None else clip_eps_high
    log_ratio = jnp.where(keep, as_float(logps) - as_float(old_logps), 0.0)
    losses, low, high, dual = clipped_objective(
        log_ratio,
        advantages,
        keep,
        clip_eps_low=clip_eps_low,
        clip_eps_high=clip_eps_high,
        dual_clip=dual_clip,
    )
    metrics = {
        "clip_frac_low": masked_mean(low, keep),
        "clip_frac_high": masked_mean(high, keep),
        "clip_frac": masked_mean(low + high, keep),
        "dual_clip_frac": masked_mean(dual, keep),
        "ratio_mean": masked_mean(jnp.exp(log_ratio), keep),
        "approx_kl": masked_mean(k3(jnp.zeros_like(log_ratio), log_ratio), keep),
    }
    return losses, metrics


def clipped_value_loss(values, old_values, returns, mask, *, clip_eps: float):
    """PPO clipped value loss, per token: ``0.5 max((V - R)^2, (V_old + clip(V - V_old, -eps, eps) - R)^2)``.

    As in the PPO baselines implementation (arXiv 1707.06347; Ziegler et al. 2019).

    Args:
      values: ``[B, T]`` current value predictions.
      old_values: ``[B, T]`` values at sampling time.
      returns: ``[B, T]`` targets (e.g. from :func:`gae`).
      mask: ``[B, T]`` 0/1.
      clip_eps: value clip range.

    Returns:
      ``(losses [B, T], metrics)``: 0 at masked tokens; metrics ``value_clip_frac`` (share of tokens where the
      clipped term is the larger) over this call's tokens.
    """
    check_rank("clipped_value_loss", "values", values, 2, "[batch, seq]")
    check_same_shape("clipped_value_loss", values=values, old_values=old_values, returns=returns, mask=mask)
    keep = as_mask(mask, values)
    values = jnp.where(keep, as_float(values), 0.0)
    old_values = jnp.where(keep, as_float(old_values), 0.0)
    returns = jnp.where(keep, as_float(returns), 0.0)
    clipped_values = old_values + jnp.clip(values - old_values, -clip_eps, clip_eps)
    unclipped_err = jnp.square(values - returns)
    clipped_err = jnp.square(clipped_values - returns)
    losses = 0.5 * jnp.where(keep, jnp.maximum(unclipped_err, clipped_err), 0.0)
    clip_frac = masked_mean((clipped_err > unclipped_err).astype(jnp.float32), keep)
    return losses, {"value_clip_frac": clip_frac}


def kl_penalty_rewards(scores, logps, ref_logps, mask, *, kl_coef: float, kl_estimator: str = "k1"):
    """Per-token RLHF rewards: ``r_t = -kl_coef * KL_t``, plus the sequence score on its last unmasked token.

    Ziegler et al. 2019 (arXiv 1909.08593, eq. 2); Ouyang et al. 2022 (arXiv 2203.02155, eq. 2). A row with no
    unmasked token gets all zeros.

    Args:
      scores: ``[B]`` reward-model (or rule) scores of the completions.
      logps: ``[B, T]`` policy log-probs of the sampled tokens.
      ref_logps: ``[B, T]`` reference log-probs of the same tokens.
      mask: ``[B, T]`` 0/1.
      kl_coef: penalty weight.
      kl_estimator: a key of :data:`jrft.losses.KL_ESTIMATORS` (k1 is the classic choice).

    Returns:
      ``(rewards [B, T], kl [B, T])``, float32, 0 at masked positions.
    """
    check_rank("kl_penalty_rewards", "logps", logps, 2, "[batch, seq]")
    check_same_shape("kl_penalty_rewards", logps=logps, ref_logps=ref_logps, mask=mask)
    check_same_shape("kl_penalty_rewards", scores=scores, batch=jnp.zeros(jnp.shape(logps)[:1]))
    keep = as_mask(mask, logps)
    logps = jnp.where(keep, as_float(logps), 0.0)
    ref_logps = jnp.where(keep, as_float(ref_logps), 0.0)
    kl = jnp.where(keep, kl_estimate(logps, ref_logps, estimator=kl_estimator), 0.0)
    seq_len = keep.shape[1]
    last = seq_len - 1 - jnp.argmax(keep[:, ::-1], axis=-1)  # [B] index of the last unmasked token
    at_last = (jnp.arange(seq_len)[None, :] == last[:, None]) & keep
    rewards = -kl_coef * kl + jnp.where(at_last, as_float(scores)[:, None], 0.0)
    return rewards, kl
