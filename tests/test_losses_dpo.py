"""jrft.losses.dpo: every DPO loss type, SimPO and ORPO against NumPy references written from the papers."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.test_util import check_grads

import jrft.losses as L

RNG = np.random.default_rng(3)
B = 8


def f64(x):
    return np.asarray(jnp.asarray(x).astype(jnp.float32), dtype=np.float64)


def logsig(x):
    return -np.logaddexp(0.0, -x)


def sig(x):
    return 1.0 / (1.0 + np.exp(-x))


def np_bco(c, r, beta, e):
    delta = np.concatenate([beta * c, beta * r]).mean()
    return -logsig(beta * c - delta) - logsig(-(beta * r - delta))


# c = chosen log-ratio, r = rejected log-ratio, e = label smoothing.
NP_DPO = {
    "sigmoid": lambda c, r, beta, e: -(1 - e) * logsig(beta * (c - r)) - e * logsig(-beta * (c - r)),
    "robust": lambda c, r, beta, e: (
        (-(1 - e) * logsig(beta * (c - r)) + e * logsig(-beta * (c - r))) / (1 - 2 * e)
    ),
    "hinge": lambda c, r, beta, e: np.maximum(0.0, 1 - beta * (c - r)),
    "ipo": lambda c, r, beta, e: ((c - r) - 1 / (2 * beta)) ** 2,
    "bco_pair": np_bco,
    "sppo_hard": lambda c, r, beta, e: (c - 0.5 / beta) ** 2 + (r + 0.5 / beta) ** 2,
    "nca_pair": lambda c, r, beta, e: -logsig(beta * c) - 0.5 * logsig(-beta * c) - 0.5 * logsig(-beta * r),
    "apo_zero": lambda c, r, beta, e: (1 - sig(beta * c)) + sig(beta * r),
    "apo_down": lambda c, r, beta, e: sig(beta * c) + (1 - sig(beta * (c - r))),
}


def np_logistic(delta, beta, e):
    return -(1 - e) * logsig(beta * delta) - e * logsig(-beta * delta)


def np_exo_pair(c, r, beta, e):
    """EXO (arXiv 2402.00856, eq. 16): KL of q = softmax(beta (c, r)) from p = (1 - e, e), written out."""
    q_w, q_l = sig(beta * (c - r)), sig(-beta * (c - r))
    return q_w * (np.log(q_w) - np.log(1 - e)) + q_l * (np.log(q_l) - np.log(e))


def np_discopop(c, r, beta, e, tau=0.05):
    """DiscoPOP (arXiv 2406.08414, eq. 5): logistic and exponential losses mixed by sigmoid(z / tau)."""
    z = beta * (c - r)
    w = sig(z / tau)
    return (1 - w) * -logsig(z) + w * np.exp(-z)


# Batch-level (sorting) losses read the four log-probs: (pc, pr, rc, rr) below.
NP_SORTED = {
    # AOT paired (arXiv 2406.05882; TRL's "aot"): sorted policy log-ratios minus sorted reference ones.
    "aot": lambda lp, beta, e: np_logistic(np.sort(lp[0] - lp[1]) - np.sort(lp[2] - lp[3]), beta, e),
    # AOT unpaired (TRL < 1.0 "aot_pair", 1.x "aot_unpaired"): sorted chosen minus sorted rejected log-ratios.
    "aot_pair": lambda lp, beta, e: np_logistic(np.sort(lp[0] - lp[2]) - np.sort(lp[1] - lp[3]), beta, e),
}
NP_SORTED["aot_unpaired"] = NP_SORTED["aot_pair"]
NP_DPO["exo_pair"] = np_exo_pair
NP_DPO["discopop"] = np_discopop


def smoothing_for(loss_type):
    """A label smoothing each type accepts: exo_pair's epsilon must be > 0 (the paper's 1e-3)."""
    if loss_type == "exo_pair":
        return 1e-3
    return 0.1 if loss_type in ("sigmoid", "robust", "aot", "aot_pair", "aot_unpaired") else 0.0


def logps(dtype=jnp.float32):
    return [jnp.asarray(-RNG.uniform(5.0, 40.0, size=B), dtype) for _ in range(4)]


def test_registry_has_every_documented_type():
    assert set(L.DPO_LOSSES) == set(NP_DPO) | set(NP_SORTED)


@pytest.mark.parametrize("loss_type", sorted(NP_SORTED))
def test_sorting_losses_match_numpy_and_ignore_padding_rows(loss_type):
    pc, pr, rc, rr = logps()
    beta, e = 0.1, 0.1
    fn = jax.jit(lambda *a, where=None: L.dpo_loss(*a, beta=beta, loss_type=loss_type, label_smoothing=e,
                                                    where=where)[0])  # fmt: skip
    want = NP_SORTED[loss_type]([f64(x) for x in (pc, pr, rc, rr)], beta, e)
    np.testing.assert_allclose(np.sort(fn(pc, pr, rc, rr)), np.sort(want), rtol=1e-5, atol=1e-6)
    # Two padding rows with wild values: the real rows' losses sum as if the padding were not there.
    where = jnp.array([1, 1, 0, 1, 1, 1, 0, 1])
    padded = [x.at[2].set(1e3).at[6].set(-1e3) for x in (pc, pr, rc, rr)]
    real = np.flatnonzero(where)
    got = fn(*padded, where=where)
    want = NP_SORTED[loss_type]([f64(x)[real] for x in (pc, pr, rc, rr)], beta, e)
    np.testing.assert_allclose(float(jnp.sum(got * where)), want.sum(), rtol=1e-5)
    assert float(got[2]) == float(got[6]) == 0.0
    grads = jax.grad(lambda p: jnp.sum(fn(p, *padded[1:], where=where)))(padded[0])
    assert bool(jnp.all(jnp.isfinite(grads))) and float(grads[2]) == float(grads[6]) == 0.0


def test_exo_pair_needs_a_positive_epsilon_and_discopop_hand_value():
    pc, pr, rc, rr = logps()
    with pytest.raises(ValueError, match=r"exo_pair needs label_smoothing > 0"):
        L.dpo_loss(pc, pr, rc, rr, beta=0.1, loss_type="exo_pair")
    zero = jnp.zeros(1)  # z = 0: w = 1/2, loss = (log 2 + 1) / 2
    got = L.dpo_loss(zero, zero, zero, zero, beta=0.1, loss_type="discopop")[0]
    np.testing.assert_allclose(got, [(np.log(2) + 1) / 2], rtol=1e-6)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=["f32", "bf16"])
@pytest.mark.parametrize("loss_type", sorted(NP_DPO))
def test_dpo_loss_matches_numpy(loss_type, dtype):
    pc, pr, rc, rr = logps(dtype)
    beta = 0.1
    smoothing = smoothing_for(loss_type)
    loss_fn = jax.jit(lambda *a: L.dpo_loss(*a, beta=beta, loss_type=loss_type, label_smoothing=smoothing))
    losses, chosen_rewards, rejected_rewards = loss_fn(pc, pr, rc, rr)
    c, r = f64(pc) - f64(rc), f64(pr) - f64(rr)
    assert losses.shape == (B,) and losses.dtype == jnp.float32
    np.testing.assert_allclose(losses, NP_DPO[loss_type](c, r, beta, smoothing), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(chosen_rewards, beta * c, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(rejected_rewards, beta * r, rtol=1e-5, atol=1e-5)


def test_dpo_hand_values():
    zero = jnp.zeros(1)
    np.testing.assert_allclose(
        L.dpo_loss(zero, zero, zero, zero, beta=0.5, loss_type="sigmoid")[0], [np.log(2)]
    )
    one = jnp.ones(1)
    # Margin of log-ratios 1 - 0 = 1 with beta 2: hinge relu(1 - 2) = 0; IPO (1 - 1/4)^2.
    np.testing.assert_allclose(L.dpo_loss(one, zero, zero, zero, beta=2.0, loss_type="hinge")[0], [0.0])
    np.testing.assert_allclose(L.dpo_loss(one, zero, zero, zero, beta=2.0, loss_type="ipo")[0], [0.5625])


@pytest.mark.parametrize("loss_type", sorted(set(NP_DPO) | set(NP_SORTED)))
def test_reference_free_equals_zero_reference(loss_type):
    pc, pr, _, _ = logps()
    zeros = jnp.zeros(B)
    kw = dict(beta=0.1, loss_type=loss_type, label_smoothing=smoothing_for(loss_type))
    free = L.dpo_loss(pc, pr, None, None, **kw)
    zero_ref = L.dpo_loss(pc, pr, zeros, zeros, **kw)
    for a, b in zip(free, zero_ref, strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-6)


def test_rewards_carry_no_gradient_and_loss_gradient_is_finite():
    pc, pr, rc, rr = logps()

    def rewards_sum(pc):
        _, chosen, rejected = L.dpo_loss(pc, pr, rc, rr, beta=0.1, loss_type="sigmoid")
        return jnp.sum(chosen + rejected)

    assert bool(jnp.all(jax.grad(rewards_sum)(pc) == 0))
    for loss_type in L.DPO_LOSSES:
        kw = dict(beta=0.1, loss_type=loss_type, label_smoothing=smoothing_for(loss_type))
        grads = jax.grad(lambda p, kw=kw: jnp.mean(L.dpo_loss(p, pr, rc, rr, **kw)[0]))(pc)
        assert bool(jnp.all(jnp.isfinite(grads))), loss_type


def test_dpo_gradients_match_finite_differences():
    with jax.enable_x64(True):
        pc, pr, rc, rr = (jnp.asarray(-RNG.uniform(1.0, 5.0, size=4)) for _ in range(4))
        # bco_pair's batch-mean delta is stop-gradient'ed by design, so finite differences disagree with it.
        for loss_type in sorted(set(L.DPO_LOSSES) - {"bco_pair"}):
            kw = dict(beta=0.3, loss_type=loss_type, label_smoothing=smoothing_for(loss_type))
            loss_fn = lambda a, b, kw=kw: L.dpo_loss(a, b, rc, rr, **kw)[0]
            check_grads(loss_fn, (pc, pr), 1, ["rev"], eps=1e-6)


def np_simpo(pc, pr, lc, lr, beta, gamma, e):
    z = beta * f64(pc) / lc - beta * f64(pr) / lr - gamma
    return -(1 - e) * logsig(z) - e * logsig(-z)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=["f32", "bf16"])
def test_simpo_matches_numpy(dtype):
    pc, pr, _, _ = logps(dtype)
    lc, lr = RNG.integers(1, 30, size=B), RNG.integers(1, 30, size=B)
    loss_fn = jax.jit(lambda *a: L.simpo_loss(*a, beta=2.0, gamma=0.5, label_smoothing=0.1))
    losses, chosen_rewards, _ = loss_fn(pc, pr, lc, lr)
    np.testing.assert_allclose(losses, np_simpo(pc, pr, lc, lr, 2.0, 0.5, 0.1), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(chosen_rewards, 2.0 * f64(pc) / lc, rtol=1e-5)
    # Hand value: equal average log-probs and gamma 0 -> log 2 (length normalisation makes 2x length equal).
    got = L.simpo_loss(
        jnp.array([-4.0]), jnp.array([-2.0]), jnp.array([4]), jnp.array([2]), beta=2.0, gamma=0.0
    )[0]
    np.testing.assert_allclose(got, [np.log(2)], rtol=1e-6)


def np_orpo(pc, pr, lc, lr):
    a, b = f64(pc) / lc, f64(pr) / lr
    log_odds = (a - np.log1p(-np.exp(a))) - (b - np.log1p(-np.exp(b)))
    return -logsig(log_odds), log_odds


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=["f32", "bf16"])
def test_orpo_matches_numpy(dtype):
    pc, pr, _, _ = logps(dtype)
    lc, lr = RNG.integers(5, 30, size=B), RNG.integers(5, 30, size=B)
    losses, log_odds = jax.jit(L.orpo_odds_ratio_loss)(pc, pr, lc, lr)
    want_losses, want_odds = np_orpo(pc, pr, lc, lr)
    np.testing.assert_allclose(losses, want_losses, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(log_odds, want_odds, rtol=1e-5, atol=1e-5)
    # Hand value: P = 1/2 for both -> odds 1 -> log odds ratio 0 -> loss log 2.
    half = jnp.log(jnp.array([0.5]))
    np.testing.assert_allclose(L.orpo_odds_ratio_loss(half, half, jnp.ones(1), jnp.ones(1))[0], [np.log(2)])


def test_orpo_is_finite_near_probability_one():
    near_one = jnp.array([-1e-9, 0.0])
    losses, _ = L.orpo_odds_ratio_loss(near_one, jnp.array([-3.0, -3.0]), jnp.ones(2), jnp.ones(2))
    grads = jax.grad(lambda p: jnp.sum(L.orpo_odds_ratio_loss(p, p - 3.0, jnp.ones(2), jnp.ones(2))[0]))(
        near_one
    )
    assert bool(jnp.all(jnp.isfinite(losses))) and bool(jnp.all(jnp.isfinite(grads)))


def test_simpo_and_orpo_gradients_match_finite_differences():
    with jax.enable_x64(True):
        pc, pr = jnp.asarray(-RNG.uniform(1.0, 5.0, size=4)), jnp.asarray(-RNG.uniform(1.0, 5.0, size=4))
        lc, lr = jnp.asarray([2.0, 3.0, 4.0, 5.0]), jnp.asarray([5.0, 2.0, 3.0, 1.0])
        check_grads(lambda a, b: L.simpo_loss(a, b, lc, lr, beta=2.0, gamma=0.3)[0], (pc, pr), 1, ["rev"])
        check_grads(lambda a, b: L.orpo_odds_ratio_loss(a, b, lc, lr)[0], (pc, pr), 1, ["rev"])


def test_errors_name_the_problem():
    pc, pr, rc, rr = logps()
    with pytest.raises(
        ValueError,
        match=r"unknown DPO loss_type 'kto'; valid: aot, aot_pair, aot_unpaired, apo_down, apo_zero",
    ):
        L.dpo_loss(pc, pr, rc, rr, beta=0.1, loss_type="kto")
    with pytest.raises(ValueError, match=r"label_smoothing=0.1 has no effect for loss_type 'ipo'"):
        L.dpo_loss(pc, pr, rc, rr, beta=0.1, loss_type="ipo", label_smoothing=0.1)
    with pytest.raises(ValueError, match=r"label_smoothing must be in \[0, 0.5\)"):
        L.dpo_loss(pc, pr, rc, rr, beta=0.1, loss_type="robust", label_smoothing=0.5)
    with pytest.raises(ValueError, match=r"both ref_chosen_logps and ref_rejected_logps, or neither"):
        L.dpo_loss(pc, pr, rc, None, beta=0.1, loss_type="sigmoid")
    with pytest.raises(ValueError, match=r"dpo_loss: .*policy_chosen_logps\[8\], policy_rejected_logps\[7\]"):
        L.dpo_loss(pc, pr[:7], rc, rr, beta=0.1, loss_type="sigmoid")
    with pytest.raises(ValueError, match=r"simpo_loss: .*chosen_lengths\[3\]"):
        L.simpo_loss(pc, pr, jnp.ones(3), jnp.ones(B), beta=2.0, gamma=0.5)
    with pytest.raises(ValueError, match=r"orpo_odds_ratio_loss: .*rejected_lengths\[2\]"):
        L.orpo_odds_ratio_loss(pc, pr, jnp.ones(B), jnp.ones(2))
