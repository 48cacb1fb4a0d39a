"""jrft.losses.ppo: GAE, whitening, clipped policy and value losses, KL rewards vs NumPy references."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.test_util import check_grads

import jrft.losses as L

RNG = np.random.default_rng(4)
B, T = 4, 7


def f64(x):
    return np.asarray(jnp.asarray(x).astype(jnp.float32), dtype=np.float64)


def np_gae(rewards, values, mask, gamma, lam, bootstrap=None):
    """GAE written as the textbook loop over each row's unmasked tokens, latest first."""
    rewards, values = f64(rewards), f64(values)
    adv = np.zeros_like(rewards)
    for b in range(rewards.shape[0]):
        next_value = 0.0 if bootstrap is None else float(bootstrap[b])
        running = 0.0
        for t in reversed(np.flatnonzero(mask[b])):
            delta = rewards[b, t] + gamma * next_value - values[b, t]
            running = delta + gamma * lam * running
            adv[b, t] = running
            next_value = values[b, t]
    return adv, (adv + values) * mask


def random_mask():
    mask = (RNG.uniform(size=(B, T)) < 0.75).astype(np.float32)
    mask[1, 3:] = 0  # right padding
    mask[2] = 0  # empty row
    mask[3, :2] = 0  # left padding
    return mask


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=["f32", "bf16"])
@pytest.mark.parametrize("bootstrap", [False, True])
def test_gae_matches_numpy(dtype, bootstrap):
    rewards = jnp.asarray(RNG.normal(size=(B, T)), dtype)
    values = jnp.asarray(RNG.normal(size=(B, T)), dtype)
    mask = random_mask()
    boot = RNG.normal(size=B) if bootstrap else None
    fn = jax.jit(lambda r, v, m, b: L.gae(r, v, m, gamma=0.97, lam=0.9, bootstrap_values=b))
    adv, ret = fn(rewards, values, mask, boot)
    want_adv, want_ret = np_gae(rewards, values, mask, 0.97, 0.9, boot)
    np.testing.assert_allclose(adv, want_adv, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(ret, want_ret, rtol=1e-5, atol=1e-5)


def test_gae_hand_values_and_scan():
    # gamma = lam = 1: advantage = reward-to-go minus value.
    rewards = jnp.array([[0.0, 0.0, 1.0, 5.0]])
    values = jnp.array([[0.5, 0.25, 0.0, 9.0]])
    mask = jnp.array([[1, 1, 1, 0]])
    adv, ret = L.gae(rewards, values, mask, gamma=1.0, lam=1.0)
    np.testing.assert_allclose(adv, [[0.5, 0.75, 1.0, 0.0]])
    np.testing.assert_allclose(ret, [[1.0, 1.0, 1.0, 0.0]])
    # lam = 0: one-step TD errors.
    adv, _ = L.gae(rewards, values, mask, gamma=0.5, lam=0.0)
    np.testing.assert_allclose(adv, [[0.5 * 0.25 - 0.5, 0.0 - 0.25, 1.0, 0.0]])
    jaxpr = str(jax.make_jaxpr(lambda r, v, m: L.gae(r, v, m, gamma=1.0, lam=1.0))(rewards, values, mask))
    assert "scan[" in jaxpr


def test_gae_masking_equals_dropping():
    rewards, values = RNG.normal(size=(1, T)), RNG.normal(size=(1, T))
    mask = np.array([[0, 1, 1, 0, 1, 0, 1]])
    keep = np.flatnonzero(mask[0])
    adv, ret = L.gae(rewards, values, mask, gamma=0.9, lam=0.8)
    short_adv, short_ret = L.gae(
        rewards[:, keep], values[:, keep], np.ones((1, len(keep))), gamma=0.9, lam=0.8
    )
    np.testing.assert_allclose(np.asarray(adv)[:, keep], short_adv, rtol=1e-6)
    np.testing.assert_allclose(np.asarray(ret)[:, keep], short_ret, rtol=1e-6)


@pytest.mark.parametrize("shift_mean", [True, False])
def test_whiten_matches_numpy(shift_mean):
    x = RNG.normal(size=(B, T)) * 3 + 2
    mask = random_mask()
    got = jax.jit(lambda v, m: L.whiten(v, m, shift_mean=shift_mean))(jnp.asarray(x, jnp.bfloat16), mask)
    xs = f64(jnp.asarray(x, jnp.bfloat16))
    kept = xs[mask > 0]
    want = (xs - kept.mean()) / np.sqrt(kept.var() + 1e-8)
    if not shift_mean:
        want = want + kept.mean()
    np.testing.assert_allclose(got, want * mask, rtol=1e-5, atol=1e-5)
    if shift_mean:
        white = np.asarray(got)[mask > 0]
        np.testing.assert_allclose([white.mean(), white.std()], [0.0, 1.0], atol=1e-5)


def np_policy(logps, old, adv, mask, el, eh, dual):
    ratio = np.exp(f64(logps) - f64(old))
    loss = np.maximum(-adv * ratio, -adv * np.clip(ratio, 1 - el, 1 + eh))
    if dual is not None:
        loss = np.where(adv < 0, np.minimum(loss, -dual * adv), loss)
    low = (ratio < 1 - el) & (adv < 0) & (mask > 0)
    high = (ratio > 1 + eh) & (adv > 0) & (mask > 0)
    return loss * mask, low, high, ratio


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=["f32", "bf16"])
@pytest.mark.parametrize("dual", [None, 2.0])
def test_clipped_policy_loss_matches_numpy(dtype, dual):
    logps = jnp.asarray(-RNG.uniform(0.5, 3.0, size=(B, T)), dtype)
    old = jnp.asarray(f64(logps) + RNG.normal(size=(B, T)) * 0.5, dtype)
    adv = RNG.normal(size=(B, T)) * 2
    mask = random_mask()
    fn = jax.jit(
        lambda lp, o, a, m: L.clipped_policy_loss(
            lp, o, a, m, clip_eps_low=0.2, clip_eps_high=0.28, dual_clip=dual
        )
    )
    losses, metrics = fn(logps, old, adv, mask)
    want, low, high, ratio = np_policy(logps, old, adv, mask, 0.2, 0.28, dual)
    np.testing.assert_allclose(losses, want, rtol=1e-5, atol=1e-5)
    n = mask.sum()
    np.testing.assert_allclose(metrics["clip_frac_low"], low.sum() / n, rtol=1e-6)
    np.testing.assert_allclose(metrics["clip_frac_high"], high.sum() / n, rtol=1e-6)
    np.testing.assert_allclose(metrics["ratio_mean"], (ratio * mask).sum() / n, rtol=1e-5)
    np.testing.assert_allclose(
        metrics["approx_kl"], (((ratio - 1) - np.log(ratio)) * mask).sum() / n, rtol=1e-4
    )


def test_clipped_policy_loss_hand_values():
    logps = jnp.log(jnp.array([[1.5, 0.5, 0.5, 1.0]]))  # old log-probs 0: ratios 1.5, 0.5, 0.5, 1.0
    adv = jnp.array([[1.0, -1.0, -4.0, 2.0]])
    losses, metrics = L.clipped_policy_loss(logps, jnp.zeros((1, 4)), adv, jnp.ones((1, 4)), clip_eps_low=0.2)
    # 1.5 clipped to 1.2 for A > 0; 0.5 with A < 0 keeps the pessimistic -A * 0.8; ratio 1 is untouched.
    np.testing.assert_allclose(losses, [[-1.2, 0.8, 3.2, -2.0]], rtol=1e-6)
    np.testing.assert_allclose(metrics["clip_frac_high"], 0.25)
    np.testing.assert_allclose(metrics["clip_frac_low"], 0.5)
    # Dual clip c = 3 caps A < 0 tokens at -3A: only a ratio above 3 would hit it.
    logps = jnp.log(jnp.array([[4.0, 2.0]]))
    losses, metrics = L.clipped_policy_loss(
        logps, jnp.zeros((1, 2)), jnp.array([[-1.0, -1.0]]), jnp.ones((1, 2)), clip_eps_low=0.2, dual_clip=3.0
    )
    np.testing.assert_allclose(losses, [[3.0, 2.0]], rtol=1e-6)
    np.testing.assert_allclose(metrics["dual_clip_frac"], 0.5)


def test_clipped_value_loss_matches_numpy_and_hand_values():
    values, old, returns = (jnp.asarray(RNG.normal(size=(B, T)), jnp.bfloat16) for _ in range(3))
    mask = random_mask()
    losses, metrics = jax.jit(lambda *a: L.clipped_value_loss(*a, clip_eps=0.2))(values, old, returns, mask)
    v, o, r = f64(values), f64(old), f64(returns)
    unclipped, clipped = (v - r) ** 2, (o + np.clip(v - o, -0.2, 0.2) - r) ** 2
    np.testing.assert_allclose(losses, 0.5 * np.maximum(unclipped, clipped) * mask, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(metrics["value_clip_frac"], ((clipped > unclipped) * mask).sum() / mask.sum())
    # Hand: V=1, V_old=0, R=1 -> clipped V=0.2 -> 0.5 * max(0, 0.64) = 0.32.
    losses, _ = L.clipped_value_loss(
        jnp.ones((1, 1)), jnp.zeros((1, 1)), jnp.ones((1, 1)), None, clip_eps=0.2
    )
    np.testing.assert_allclose(losses, [[0.32]], rtol=1e-6)


@pytest.mark.parametrize("estimator", ["k1", "k3"])
def test_kl_penalty_rewards_matches_numpy(estimator):
    logps = jnp.asarray(-RNG.uniform(0.5, 3.0, size=(B, T)), jnp.bfloat16)
    ref = jnp.asarray(-RNG.uniform(0.5, 3.0, size=(B, T)), jnp.bfloat16)
    scores = RNG.normal(size=B)
    mask = random_mask()
    fn = jax.jit(lambda *a: L.kl_penalty_rewards(*a, kl_coef=0.05, kl_estimator=estimator))
    rewards, kl = fn(scores, logps, ref, mask)
    lp, rp = f64(logps), f64(ref)
    want_kl = (lp - rp if estimator == "k1" else np.exp(rp - lp) - 1 - (rp - lp)) * mask
    want = -0.05 * want_kl
    for b in range(B):
        if mask[b].any():
            want[b, np.flatnonzero(mask[b])[-1]] += scores[b]
    np.testing.assert_allclose(kl, want_kl, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(rewards, want, rtol=1e-5, atol=1e-5)


def test_all_masked_gives_finite_gradients():
    zeros = jnp.zeros((B, T))
    logps = jnp.asarray(-RNG.uniform(0.5, 3.0, size=(B, T)))
    # Masked positions may hold garbage: the losses must never read it.
    garbage = jnp.full((B, T), 1e4)

    def total(lp):
        pol, _ = L.clipped_policy_loss(lp, garbage, garbage, zeros, clip_eps_low=0.2, dual_clip=3.0)
        val, _ = L.clipped_value_loss(lp, garbage, garbage, zeros, clip_eps=0.2)
        return L.masked_mean(pol, zeros) + L.masked_mean(val, zeros)

    total = jax.jit(total)
    assert float(total(logps)) == 0.0
    assert bool(jnp.all(jax.jit(jax.grad(total))(logps) == 0))
    adv, ret = L.gae(garbage, garbage, zeros, gamma=1.0, lam=0.95)
    assert bool(jnp.all(adv == 0)) and bool(jnp.all(ret == 0))
    assert bool(jnp.all(L.whiten(garbage, zeros) == 0))
    # Non-finite padding next to real values: whitening and its gradient only see the real ones.
    padded = jnp.array([[1.0, 2.0, 4.0, jnp.inf]])
    grads = jax.grad(lambda x: jnp.sum(L.whiten(x, jnp.array([[1, 1, 1, 0]])) ** 3))(padded)
    assert bool(jnp.all(jnp.isfinite(grads))) and float(grads[0, 3]) == 0.0


def test_gradients_match_finite_differences():
    with jax.enable_x64(True):
        logps = jnp.asarray(-RNG.uniform(0.5, 3.0, size=(2, 3)))
        old = logps + jnp.asarray([[0.05, -0.5, 0.4], [0.1, -0.02, 0.6]])
        adv = jnp.asarray(RNG.normal(size=(2, 3)))
        mask = jnp.array([[1, 1, 1], [1, 1, 0]])
        policy = lambda lp: L.clipped_policy_loss(lp, old, adv, mask, clip_eps_low=0.2, dual_clip=2.0)[0]
        check_grads(jax.jit(policy), (logps,), 1, ["rev"], eps=1e-6)
        values = jnp.asarray(RNG.normal(size=(2, 3)))
        value = lambda v: L.clipped_value_loss(
            v, v + jnp.array([[0.5, -0.05, 0.3]] * 2), adv, mask, clip_eps=0.2
        )[0]
        check_grads(jax.jit(value), (values,), 1, ["rev"], eps=1e-6)
        check_grads(jax.jit(lambda r, v: L.gae(r, v, mask, gamma=0.9, lam=0.8)), (adv, values), 1, ["rev"])
        check_grads(jax.jit(lambda x: L.whiten(x, mask)), (values,), 1, ["rev"])


def test_shape_mismatches_raise_clear_errors():
    a, b = jnp.zeros((2, 3)), jnp.zeros((2, 4))
    with pytest.raises(ValueError, match=r"gae: .*rewards\[2, 3\], values\[2, 4\]"):
        L.gae(a, b, a, gamma=1.0, lam=1.0)
    with pytest.raises(ValueError, match=r"gae: rewards must be \[batch, seq\]"):
        L.gae(jnp.zeros(3), jnp.zeros(3), jnp.zeros(3), gamma=1.0, lam=1.0)
    with pytest.raises(
        ValueError, match=r"clipped_policy_loss: advantages must be \[batch\] or \[batch, seq\]"
    ):
        L.clipped_policy_loss(a, a, jnp.zeros(3), a, clip_eps_low=0.2)
    with pytest.raises(ValueError, match=r"clipped_policy_loss: dual_clip must be > 1"):
        L.clipped_policy_loss(a, a, a, a, clip_eps_low=0.2, dual_clip=0.5)
    with pytest.raises(ValueError, match=r"clipped_value_loss: .*returns\[2, 4\]"):
        L.clipped_value_loss(a, a, b, a, clip_eps=0.2)
    with pytest.raises(ValueError, match=r"kl_penalty_rewards: .*scores\[3\]"):
        L.kl_penalty_rewards(jnp.zeros(3), a, a, a, kl_coef=0.1)
    with pytest.raises(ValueError, match=r"unknown KL estimator 'k9'"):
        L.kl_penalty_rewards(jnp.zeros(2), a, a, a, kl_coef=0.1, kl_estimator="k9")
