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


def logps(dtype=jnp.float32):
    return [jnp.asarray(-RNG.uniform(5.0, 40.0, size=B), dtype) for _ in range(4)]


def test_registry_has_every_documented_type():
    assert set(L.DPO_LOSSES) == set(NP_DPO)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=["f32", "bf16"])
@pytest.mark.parametrize("loss_type", sorted(NP_DPO))
def test_dpo_loss_matches_numpy(loss_type, dtype):
    pc, pr, rc, rr = logps(dtype)
    beta = 0.1
    smoothing = 0.1 if loss_type in ("sigmoid", "robust") else 0.0
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


@pytest.mark.parametrize("loss_type", sorted(NP_DPO))
def test_reference_free_equals_zero_reference(loss_type):
    pc, pr, _, _ = logps()
    zeros = jnp.zeros(B)
    free = L.dpo_loss(pc, pr, None, None, beta=0.1, loss_type=loss_type)
    zero_ref = L.dpo_loss(pc, pr, zeros, zeros, beta=0.1, loss_type=loss_type)
    for a, b in zip(free, zero_ref, strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-6)


def test_rewards_carry_no_gradient_and_loss_gradient_is_finite():
    pc, pr, rc, rr = logps()

    def rewards_sum(pc):
        _, chosen, rejected = L.dpo_loss(pc, pr, rc, rr, beta=0.1, loss_type="sigmoid")
        return jnp.sum(chosen + rejected)

    assert bool(jnp.all(jax.grad(rewards_sum)(pc) == 0))
    for loss_type in NP_DPO:
        grads = jax.grad(
            lambda p, t=loss_type: jnp.mean(L.dpo_loss(p, pr, rc, rr, beta=0.1, loss_type=t)[0])
        )(pc)
        assert bool(jnp.all(jnp.isfinite(grads))), loss_type


def test_dpo_gradients_match_finite_differences():
    with jax.enable_x64(True):
        pc, pr, rc, rr = (jnp.asarray(-RNG.uniform(1.0, 5.0, size=4)) for _ in range(4))
        # bco_pair's batch-mean delta is stop-gradient'ed by design, so finite differences disagree with it.
        for loss_type in sorted(set(NP_DPO) - {"bco_pair"}):
            loss_fn = lambda a, b, t=loss_type: L.dpo_loss(a, b, rc, rr, beta=0.3, loss_type=t)[0]
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
    with pytest.raises(ValueError, match=r"unknown DPO loss_type 'kto'; valid: apo_down, apo_zero, bco_pair"):
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
