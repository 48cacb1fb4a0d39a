"""Direct preference optimisation and its relatives: DPO loss types, SimPO, ORPO's odds-ratio term.

Shapes: ``B`` preference pairs. Inputs are *summed* log-probs of each whole response (``[B]``), e.g.
``masked_sum(token_logprobs(logits, tokens), completion_mask, axis=-1)``; SimPO and ORPO also take the
response lengths and normalise by them. Every DPO variant is a small function of the two log-ratios
``c = log pi(y_w|x) - log pi_ref(y_w|x)`` and ``r = log pi(y_l|x) - log pi_ref(y_l|x)``, registered by
name in :data:`DPO_LOSSES`.
"""

import numbers

import jax
import jax.numpy as jnp

from jrft.losses._checks import as_float, check_same_shape, lookup


def _sigmoid(c, r, *, beta, label_smoothing, **_):
    """DPO (Rafailov et al. 2023, arXiv 2305.18290, eq. 7) with conservative label smoothing (cDPO):
    ``-(1 - e) log sigmoid(beta (c - r)) - e log sigmoid(-beta (c - r))``."""
    z = beta * (c - r)
    return -(1.0 - label_smoothing) * jax.nn.log_sigmoid(z) - label_smoothing * jax.nn.log_sigmoid(-z)


def _robust(c, r, *, beta, label_smoothing, **_):
    """Robust DPO for noisy labels (Chowdhury et al. 2024, arXiv 2403.00409, eq. 7):
    ``[-(1 - e) log sigmoid(beta (c - r)) + e log sigmoid(-beta (c - r))] / (1 - 2e)``."""
    z = beta * (c - r)
    unbiased = -(1.0 - label_smoothing) * jax.nn.log_sigmoid(z) + label_smoothing * jax.nn.log_sigmoid(-z)
    return unbiased / (1.0 - 2.0 * label_smoothing)


def _hinge(c, r, *, beta, label_smoothing, **_):
    """SLiC hinge loss (Zhao et al. 2023, arXiv 2305.10425): ``relu(1 - beta (c - r))``."""
    return jax.nn.relu(1.0 - beta * (c - r))


def _ipo(c, r, *, beta, label_smoothing, **_):
    """IPO (Azar et al. 2023, arXiv 2310.12036, eq. 17): ``((c - r) - 1 / (2 beta))**2``; ``beta`` is tau.
    Usually fed length-averaged log-probs (the paper's regulariser assumes per-token scale)."""
    return jnp.square((c - r) - 1.0 / (2.0 * beta))


def _bco_pair(c, r, *, beta, label_smoothing, **_):
    """Pairwise BCO (Jung et al. 2024, arXiv 2404.04656):
    ``-log sigmoid(beta c - delta) - log sigmoid(-(beta r - delta))`` with ``delta`` the batch mean of all
    implicit rewards ``beta c`` and ``beta r`` (no gradient; the paper keeps a running mean across steps,
    which a pure function cannot)."""
    delta = jax.lax.stop_gradient(jnp.mean(jnp.concatenate([beta * c, beta * r])))
    return -jax.nn.log_sigmoid(beta * c - delta) - jax.nn.log_sigmoid(-(beta * r - delta))


def _sppo_hard(c, r, *, beta, label_smoothing, **_):
    """SPPO with hard win probabilities (Wu et al. 2024, arXiv 2405.00675, eq. 4.9):
    ``(c - 1 / (2 beta))**2 + (r + 1 / (2 beta))**2``."""
    return jnp.square(c - 0.5 / beta) + jnp.square(r + 0.5 / beta)


def _nca_pair(c, r, *, beta, label_smoothing, **_):
    """Pairwise NCA (Chen et al. 2024, arXiv 2402.05369):
    ``-log sigmoid(beta c) - 0.5 log sigmoid(-beta c) - 0.5 log sigmoid(-beta r)``."""
    return (
        -jax.nn.log_sigmoid(beta * c)
        - 0.5 * jax.nn.log_sigmoid(-beta * c)
        - 0.5 * jax.nn.log_sigmoid(-beta * r)
    )


def _apo_zero(c, r, *, beta, label_smoothing, **_):
    """APO-zero (D'Oosterlinck et al. 2024, arXiv 2408.06266): raise chosen, lower rejected likelihood:
    ``(1 - sigmoid(beta c)) + sigmoid(beta r)``."""
    return (1.0 - jax.nn.sigmoid(beta * c)) + jax.nn.sigmoid(beta * r)


def _apo_down(c, r, *, beta, label_smoothing, **_):
    """APO-down (D'Oosterlinck et al. 2024, arXiv 2408.06266): lower both, rejected more:
    ``sigmoid(beta c) + (1 - sigmoid(beta (c - r)))``."""
    return jax.nn.sigmoid(beta * c) + (1.0 - jax.nn.sigmoid(beta * (c - r)))


def _exo_pair(c, r, *, beta, label_smoothing, **_):
    """EXO, pairwise (Ji et al. 2024, arXiv 2402.00856, eq. 16): ``KL(q || p)`` between the policy's
    preference ``q = (sigmoid(beta (c - r)), sigmoid(-beta (c - r)))`` and the labels smoothed by
    ``e = label_smoothing``, ``p = (1 - e, e)`` (``e`` must be > 0; the paper uses 1e-3)."""
    z = beta * (c - r)
    chosen = jax.nn.sigmoid(z) * (jax.nn.log_sigmoid(z) - jnp.log1p(-label_smoothing))
    rejected = jax.nn.sigmoid(-z) * (jax.nn.log_sigmoid(-z) - jnp.log(label_smoothing))
    return chosen + rejected


def _smoothed_logistic(delta, beta, label_smoothing):
    return -(1.0 - label_smoothing) * jax.nn.log_sigmoid(beta * delta) - label_smoothing * jax.nn.log_sigmoid(
        -beta * delta
    )


def _aot(c, r, *, beta, label_smoothing, pi_logratios, ref_logratios, **_):
    """AOT, paired (Melnyk et al. 2024, arXiv 2406.05882): DPO's logistic loss on the *sorted* policy
    log-ratios ``log pi(y_w) - log pi(y_l)`` minus the sorted reference ones (distributional dominance of
    the chosen over the rejected across the batch): ``-log sigmoid(beta (sort(pi_lr) - sort(ref_lr))_k)``,
    with cDPO's label smoothing (as TRL)."""
    return _smoothed_logistic(jnp.sort(pi_logratios) - jnp.sort(ref_logratios), beta, label_smoothing)


def _aot_pair(c, r, *, beta, label_smoothing, **_):
    """AOT, unpaired (Melnyk et al. 2024, arXiv 2406.05882): the logistic loss on ``sort(c)_k - sort(r)_k``,
    the chosen and rejected log-ratios sorted separately (TRL < 1.0's ``aot_pair``, 1.x's
    ``aot_unpaired``)."""
    return _smoothed_logistic(jnp.sort(c) - jnp.sort(r), beta, label_smoothing)


def _discopop(c, r, *, beta, discopop_tau, **_):
    """DiscoPOP (Chris Lu et al. 2024, arXiv 2406.08414, eq. 5), the log-ratio modulated loss: with
    ``z = beta (c - r)`` and ``w = sigmoid(z / tau)``, ``(1 - w) (-log sigmoid(z)) + w exp(-z)``."""
    z = beta * (c - r)
    w = jax.nn.sigmoid(z / discopop_tau)
    return (1.0 - w) * -jax.nn.log_sigmoid(z) + w * jnp.exp(-z)


DPO_LOSSES = {
    "sigmoid": _sigmoid,
    "robust": _robust,
    "hinge": _hinge,
    "ipo": _ipo,
    "bco_pair": _bco_pair,
    "sppo_hard": _sppo_hard,
    "nca_pair": _nca_pair,
    "apo_zero": _apo_zero,
    "apo_down": _apo_down,
    "exo_pair": _exo_pair,
    "aot": _aot,
    "aot_pair": _aot_pair,
    "aot_unpaired": _aot_pair,  # TRL 1.x's name of aot_pair
    "discopop": _discopop,
}
# Loss types whose formula reads label_smoothing; a nonzero value with any other type is an error.
SMOOTHED_LOSSES = frozenset({"sigmoid", "robust", "exo_pair", "aot", "aot_pair", "aot_unpaired"})
# Losses that compare pairs across the batch (sorting): they take the batch's valid rows as ``where``.
BATCH_SORTED_LOSSES = frozenset({"aot", "aot_pair", "aot_unpaired"})


def dpo_loss(
    policy_chosen_logps,
    policy_rejected_logps,
    ref_chosen_logps,
    ref_rejected_logps,
    *,
    beta: float,
    loss_type: str,
    label_smoothing: float = 0.0,
    discopop_tau: float = 0.05,
    where=None,
):
    """DPO-family preference loss per pair, with the implicit rewards.

    With ``c = log pi(y_w) - log pi_ref(y_w)`` and ``r = log pi(y_l) - log pi_ref(y_l)``, ``loss_type`` picks
    the formula in :data:`DPO_LOSSES` (sigmoid is DPO, arXiv 2305.18290: ``-log sigmoid(beta (c - r))``).
    Passing None for both reference log-probs gives the reference-free variant
    (``pi_ref = 1``: ``c = log pi(y_w)``).

    Args:
      policy_chosen_logps: ``[B]`` summed policy log-probs of the chosen responses.
      policy_rejected_logps: ``[B]`` same for the rejected responses.
      ref_chosen_logps: ``[B]`` reference log-probs of the chosen responses, or None (reference-free).
      ref_rejected_logps: ``[B]`` same for the rejected responses, or None (reference-free).
      beta: inverse temperature (tau for IPO).
      loss_type: a key of :data:`DPO_LOSSES`.
      label_smoothing: probability that a label is flipped (sigmoid: cDPO; robust: rDPO; exo_pair's
        epsilon, which must be > 0; aot, aot_pair); must be < 0.5.
      discopop_tau: DiscoPOP's temperature of the mixing weight (the paper's 0.05).
      where: ``[B]`` 0/1 real pairs (None: all). Only the sorting losses (aot, aot_pair) read it: they sort
        the real pairs among themselves and return their losses on the real rows (0 elsewhere); a loss of
        theirs belongs to the batch, not to one pair, and the batch is what the call sees (a micro-batch
        under gradient accumulation, as in TRL).

    Returns:
      ``(losses [B], chosen_rewards [B], rejected_rewards [B])``, float32; the rewards are ``beta * c`` and
      ``beta * r`` with gradients stopped (they are for logging).
    """
    loss_fn = lookup(DPO_LOSSES, loss_type, "DPO loss_type")
    if (ref_chosen_logps is None) != (ref_rejected_logps is None):
        raise ValueError(
            "dpo_loss: pass both ref_chosen_logps and ref_rejected_logps, or neither (reference-free)"
        )
    if isinstance(label_smoothing, numbers.Number):
        if label_smoothing and loss_type not in SMOOTHED_LOSSES:
            raise ValueError(
                f"dpo_loss: label_smoothing={label_smoothing} has no effect for loss_type {loss_type!r}; "
                f"it applies to: {', '.join(sorted(SMOOTHED_LOSSES))}"
            )
        if not 0.0 <= label_smoothing < 0.5:
            raise ValueError(f"dpo_loss: label_smoothing must be in [0, 0.5), got {label_smoothing}")
        if loss_type == "exo_pair" and label_smoothing <= 0:
            raise ValueError(
                "dpo_loss: exo_pair needs label_smoothing > 0 (its epsilon; the paper uses 1e-3)"
            )
    check_same_shape(
        "dpo_loss",
        policy_chosen_logps=policy_chosen_logps,
        policy_rejected_logps=policy_rejected_logps,
        ref_chosen_logps=ref_chosen_logps,
        ref_rejected_logps=ref_rejected_logps,
    )
    pc, pr = as_float(policy_chosen_logps), as_float(policy_rejected_logps)
    rc, rr = (
        (0.0, 0.0) if ref_chosen_logps is None else (as_float(ref_chosen_logps), as_float(ref_rejected_logps))
    )
    chosen, rejected = pc - rc, pr - rr
    extra = dict(label_smoothing=label_smoothing, discopop_tau=discopop_tau)
    if loss_type in BATCH_SORTED_LOSSES:
        losses = _sorted_over_real_rows(loss_fn, chosen, rejected, pc - pr, rc - rr, beta, where, extra)
    else:
        losses = loss_fn(chosen, rejected, beta=beta, **extra)
    rewards = jax.lax.stop_gradient((beta * chosen, beta * rejected))
    return losses, rewards[0], rewards[1]


def _sorted_over_real_rows(loss_fn, c, r, pi_logratios, ref_logratios, beta, where, extra):
    """A sorting loss over the real rows only: padding rows are sorted last (as the largest float, so their
    differences stay finite, 0, and no NaN reaches a gradient), and the k-th loss of
    the sorted real rows is placed on the k-th real row, so ``sum(losses * where)`` is the loss of the real
    rows whatever the padding."""
    n = c.shape[0]
    real = jnp.ones((n,), bool) if where is None else jnp.asarray(where) != 0
    ref_logratios = jnp.broadcast_to(ref_logratios, (n,))

    def last(x):
        return jnp.where(real, x, jnp.finfo(jnp.float32).max)

    losses = loss_fn(
        last(c),
        last(r),
        beta=beta,
        pi_logratios=last(pi_logratios),
        ref_logratios=last(ref_logratios),
        **extra,
    )
    ranked = jnp.arange(n) < jnp.sum(real)  # the sorted positions that hold real rows
    losses = jnp.where(ranked, losses, 0.0)
    rows = jnp.argsort(~real, stable=True)  # real rows first, in order
    return jnp.zeros_like(losses).at[rows].set(losses)


def simpo_loss(
    policy_chosen_logps,
    policy_rejected_logps,
    chosen_lengths,
    rejected_lengths,
    *,
    beta: float,
    gamma: float,
    label_smoothing: float = 0.0,
):
    """SimPO: reference-free, length-normalised preference loss with a target margin.

    ``loss = -(1 - e) log sigmoid(z) - e log sigmoid(-z)`` with
    ``z = beta/|y_w| log pi(y_w) - beta/|y_l| log pi(y_l) - gamma``
    (Meng et al. 2024, arXiv 2405.14734, eq. 6; ``e`` is optional label smoothing).

    Args:
      policy_chosen_logps: ``[B]`` summed log-probs of the chosen responses.
      policy_rejected_logps: ``[B]`` summed log-probs of the rejected responses.
      chosen_lengths: ``[B]`` number of tokens in each chosen response (values below 1 count as 1).
      rejected_lengths: ``[B]`` same for the rejected responses.
      beta: reward scale (the paper uses 2 to 10).
      gamma: target reward margin.
      label_smoothing: flipped-label probability, in [0, 0.5).

    Returns:
      ``(losses [B], chosen_rewards [B], rejected_rewards [B])``; rewards ``beta * mean logp``, no gradient.
    """
    check_same_shape(
        "simpo_loss",
        policy_chosen_logps=policy_chosen_logps,
        policy_rejected_logps=policy_rejected_logps,
        chosen_lengths=chosen_lengths,
        rejected_lengths=rejected_lengths,
    )
    chosen = beta * as_float(policy_chosen_logps) / jnp.maximum(as_float(chosen_lengths), 1.0)
    rejected = beta * as_float(policy_rejected_logps) / jnp.maximum(as_float(rejected_lengths), 1.0)
    z = chosen - rejected - gamma
    losses = -(1.0 - label_smoothing) * jax.nn.log_sigmoid(z) - label_smoothing * jax.nn.log_sigmoid(-z)
    rewards = jax.lax.stop_gradient((chosen, rejected))
    return losses, rewards[0], rewards[1]


def _log1mexp(x):
    """``log(1 - exp(x))`` for ``x < 0``, accurate at both ends (Mächler 2012)."""
    return jnp.where(x > -0.6931472, jnp.log(-jnp.expm1(x)), jnp.log1p(-jnp.exp(x)))


def orpo_odds_ratio_loss(policy_chosen_logps, policy_rejected_logps, chosen_lengths, rejected_lengths):
    """ORPO's odds-ratio term per pair (Hong et al. 2024, arXiv 2403.07691, eqs. 4-7).

    With the length-normalised likelihood ``P(y|x) = exp(log pi(y|x) / |y|)`` and ``odds(y) = P / (1 - P)``:
    ``L_OR = -log sigmoid(log odds(y_w) - log odds(y_l))``. The full ORPO loss is
    ``L_SFT(y_w) + lambda * L_OR``; add the chosen responses' NLL (e.g. :func:`jrft.losses.sft_loss`).
    Mean log-probs are clamped to at most -1e-6 so ``log(1 - P)`` stays finite.

    Args:
      policy_chosen_logps: ``[B]`` summed log-probs of the chosen responses.
      policy_rejected_logps: ``[B]`` summed log-probs of the rejected responses.
      chosen_lengths: ``[B]`` token counts of the chosen responses.
      rejected_lengths: ``[B]`` token counts of the rejected responses.

    Returns:
      ``(losses [B], log_odds_ratio [B])``; the log odds ratio is returned without gradient, for logging.
    """
    check_same_shape(
        "orpo_odds_ratio_loss",
        policy_chosen_logps=policy_chosen_logps,
        policy_rejected_logps=policy_rejected_logps,
        chosen_lengths=chosen_lengths,
        rejected_lengths=rejected_lengths,
    )
    chosen = as_float(policy_chosen_logps) / jnp.maximum(as_float(chosen_lengths), 1.0)
    rejected = as_float(policy_rejected_logps) / jnp.maximum(as_float(rejected_lengths), 1.0)
    chosen, rejected = jnp.minimum(chosen, -1e-6), jnp.minimum(rejected, -1e-6)
    log_odds = (chosen - _log1mexp(chosen)) - (rejected - _log1mexp(rejected))
    return -jax.nn.log_sigmoid(log_odds), jax.lax.stop_gradient(log_odds)
