"""Building blocks shared by every objective: token log-probs, entropy, masked reductions, KL estimators.

Shapes: ``B`` batch, ``T`` sequence length, ``V`` vocabulary. Masks are 0/1 (or bool) arrays of the
values' shape; masked positions contribute nothing to a sum or mean, and an all-masked reduction returns
0 with finite gradients (never NaN). All math runs in float32 whatever the input dtype.
"""

import jax
import jax.numpy as jnp

from jrft.losses._checks import as_float, as_mask, check_same_shape, lookup


def token_logprobs(logits, tokens) -> jnp.ndarray:
    """Log-probability of each given token under the logits at the same position.

    ``logp[b, t] = logits[b, t, tokens[b, t]] - logsumexp_v logits[b, t, v]``. No shift is applied: for a
    causal LM pass ``logits[:, :-1]`` and ``tokens[:, 1:]``.

    Args:
      logits: ``[B, T, V]`` (any leading dims), any float dtype.
      tokens: ``[B, T]`` integer token ids.

    Returns:
      ``[B, T]`` float32 log-probabilities.
    """
    logits = as_float(logits)
    tokens = jnp.asarray(tokens)
    if logits.shape[:-1] != tokens.shape:
        raise ValueError(
            f"token_logprobs: logits [..., V] must match tokens [...] on the leading dims, "
            f"got logits{list(logits.shape)} and tokens{list(tokens.shape)}"
        )
    picked = jnp.take_along_axis(logits, tokens[..., None].astype(jnp.int32), axis=-1)[..., 0]
    return picked - jax.nn.logsumexp(logits, axis=-1)


def entropy(logits) -> jnp.ndarray:
    """Entropy of the categorical distribution given by the logits at each position.

    ``H[b, t] = -sum_v p_v log p_v = logsumexp(z) - sum_v softmax(z)_v z_v``.

    Args:
      logits: ``[B, T, V]`` (any leading dims).

    Returns:
      ``[B, T]`` float32 entropies in nats.
    """
    logits = as_float(logits)
    lse = jax.nn.logsumexp(logits, axis=-1)
    probs = jnp.exp(logits - lse[..., None])
    return lse - jnp.sum(probs * logits, axis=-1)


def masked_sum(values, mask=None, axis=None) -> jnp.ndarray:
    """Sum of ``values`` over ``axis`` where ``mask`` is nonzero (masked entries are never read).

    Args:
      values: any shape, e.g. ``[B, T]``.
      mask: same shape as ``values`` (0/1 or bool), or None for no mask.
      axis: axis or axes to reduce; None reduces everything.
    """
    values = as_float(values)
    check_same_shape("masked_sum", values=values, mask=mask)
    return jnp.sum(jnp.where(as_mask(mask, values), values, 0.0), axis=axis)


def masked_mean(values, mask=None, axis=None) -> jnp.ndarray:
    """Mean of ``values`` over the unmasked entries along ``axis``; 0 where nothing is unmasked.

    ``sum(values * mask) / max(sum(mask), 1)``, so an all-masked row or batch gives 0 and finite gradients.

    Args:
      values: any shape, e.g. ``[B, T]``.
      mask: same shape as ``values`` (0/1 or bool), or None for no mask.
      axis: axis or axes to reduce (``-1``: per-sequence means ``[B]``); None reduces everything.
    """
    values = as_float(values)
    check_same_shape("masked_mean", values=values, mask=mask)
    keep = as_mask(mask, values)
    count = jnp.sum(keep, axis=axis).astype(values.dtype)
    return jnp.sum(jnp.where(keep, values, 0.0), axis=axis) / jnp.maximum(count, 1.0)


def k1(logps, ref_logps) -> jnp.ndarray:
    """Schulman's k1 estimator of KL(policy || reference), per token: ``log pi - log pi_ref``.

    Unbiased, high variance, can be negative. Samples are drawn from the policy. Reference: J. Schulman,
    "Approximating KL Divergence" (2020), http://joschu.net/blog/kl-approx.html.

    Args:
      logps: ``[B, T]`` policy log-probs of the sampled tokens.
      ref_logps: ``[B, T]`` reference log-probs of the same tokens.

    Returns:
      ``[B, T]`` per-token estimates.
    """
    check_same_shape("k1", logps=logps, ref_logps=ref_logps)
    return as_float(logps) - as_float(ref_logps)


def k2(logps, ref_logps) -> jnp.ndarray:
    """Schulman's k2 estimator, per token: ``0.5 * (log pi - log pi_ref) ** 2`` (biased, low variance, >= 0).

    Shapes: ``logps``, ``ref_logps`` ``[B, T]`` -> ``[B, T]``. Reference: J. Schulman, "Approximating KL
    Divergence" (2020).
    """
    check_same_shape("k2", logps=logps, ref_logps=ref_logps)
    return 0.5 * jnp.square(as_float(logps) - as_float(ref_logps))


def k3(logps, ref_logps) -> jnp.ndarray:
    """Schulman's k3 estimator, per token: ``r - 1 - log r`` with ``r = pi_ref / pi``.

    Unbiased and always >= 0; the KL term of GRPO (DeepSeekMath, arXiv 2402.03300, eq. 4). Shapes:
    ``[B, T]`` -> ``[B, T]``. Reference: J. Schulman, "Approximating KL Divergence" (2020).
    """
    check_same_shape("k3", logps=logps, ref_logps=ref_logps)
    log_ratio = as_float(ref_logps) - as_float(logps)
    return jnp.exp(log_ratio) - 1.0 - log_ratio


KL_ESTIMATORS = {"k1": k1, "k2": k2, "k3": k3}


def kl_estimate(logps, ref_logps, *, estimator: str = "k3") -> jnp.ndarray:
    """Per-token KL(policy || reference) with the estimator named in :data:`KL_ESTIMATORS` (``[B, T]``)."""
    return lookup(KL_ESTIMATORS, estimator, "KL estimator")(logps, ref_logps)


def batch_counts(mask):
    """The normalisers of a batch, ``(num_tokens, num_sequences)``, for losses that take global counts.

    ``num_tokens = sum(mask)``; ``num_sequences`` counts the rows with at least one unmasked token (a fully
    masked row is the same as a row left out). Compute these on the *full* batch and pass them to every
    micro-batch's loss call: the micro-batch losses then sum to the full-batch loss.

    Args:
      mask: ``[B, T]`` 0/1.

    Returns:
      Two float32 scalars.
    """
    keep = as_mask(mask, mask)
    if keep.ndim != 2:
        raise ValueError(f"batch_counts: mask must be [batch, seq], got shape {list(keep.shape)}")
    return jnp.sum(keep).astype(jnp.float32), jnp.sum(jnp.any(keep, axis=-1)).astype(jnp.float32)
