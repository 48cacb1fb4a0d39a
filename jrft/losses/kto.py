"""KTO: Kahneman-Tversky Optimization (Ethayarajh et al. 2024, arXiv 2402.01306), from unpaired feedback.

Shapes: ``B`` rows, each one completion labelled desirable or undesirable. Inputs are *summed* log-probs of
whole completions (``[B]``). The KL reference point ``z0`` is estimated from mismatched pairs (each prompt
with another row's completion, TRL's shift by one), averaged over the batch, clamped at 0 and detached
(paper sec. 4.1: it controls saturation, it is not optimised).
"""

import jax
import jax.numpy as jnp

from jrft.losses._checks import as_float, check_same_shape


def kto_kl_estimate(policy_kl_logps, ref_kl_logps, where=None):
    """KTO's reference point ``z0 = max(0, mean_i [log pi(y'_i|x_i) - log pi_ref(y'_i|x_i)])`` over the
    mismatched pairs ``(x_i, y'_i)`` of the real rows, without gradient.

    Args:
      policy_kl_logps: ``[B]`` summed policy log-probs of the mismatched completions.
      ref_kl_logps: ``[B]`` same under the reference.
      where: ``[B]`` 0/1 real rows (None: all).

    Returns:
      A float32 scalar >= 0.
    """
    check_same_shape("kto_kl_estimate", policy_kl_logps=policy_kl_logps, ref_kl_logps=ref_kl_logps)
    diff = as_float(policy_kl_logps) - as_float(ref_kl_logps)
    real = jnp.ones_like(diff) if where is None else as_float(where)
    mean = jnp.sum(diff * real) / jnp.maximum(jnp.sum(real), 1.0)
    return jax.lax.stop_gradient(jnp.maximum(mean, 0.0))


def kto_loss(
    policy_logps,
    ref_logps,
    labels,
    kl,
    *,
    beta: float,
    desirable_weight: float = 1.0,
    undesirable_weight: float = 1.0,
):
    """KTO's loss per row (arXiv 2402.01306, eq. 8; TRL's ``kto`` loss type).

    With the implicit reward ``r = log pi(y|x) - log pi_ref(y|x)`` and the reference point ``z0 = kl``
    (:func:`kto_kl_estimate`): ``lambda_D (1 - sigmoid(beta (r - z0)))`` for desirable rows and
    ``lambda_U (1 - sigmoid(beta (z0 - r)))`` for undesirable ones. The paper keeps
    ``lambda_D n_D / (lambda_U n_U)`` in ``[1, 4/3]``.

    Example::

        kl = kto_kl_estimate(policy_kl_logps, ref_kl_logps)  # [B], [B] -> scalar
        losses, rewards = kto_loss(logps, ref_logps, labels, kl, beta=0.1)
        loss = jnp.mean(losses)

    Args:
      policy_logps: ``[B]`` summed policy log-probs of each row's completion.
      ref_logps: ``[B]`` same under the reference (None: reference-free, ``pi_ref = 1``).
      labels: ``[B]`` bool or 0/1: 1 = desirable.
      kl: the scalar reference point ``z0`` (no gradient flows into it).
      beta: inverse temperature of the implicit reward.
      desirable_weight: lambda_D.
      undesirable_weight: lambda_U.

    Returns:
      ``(losses [B], rewards [B])`` float32; rewards are ``beta * r`` without gradient (for logging).
    """
    check_same_shape("kto_loss", policy_logps=policy_logps, ref_logps=ref_logps, labels=labels)
    r = as_float(policy_logps)
    if ref_logps is not None:
        r = r - as_float(ref_logps)
    z0 = jax.lax.stop_gradient(as_float(kl))
    desirable = jnp.asarray(labels) != 0
    losses = jnp.where(
        desirable,
        desirable_weight * (1.0 - jax.nn.sigmoid(beta * (r - z0))),
        undesirable_weight * (1.0 - jax.nn.sigmoid(beta * (z0 - r))),
    )
    return losses, jax.lax.stop_gradient(beta * r)
