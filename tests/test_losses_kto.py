"""jrft.losses.kto: KTO's loss and KL reference point against a NumPy reference written from the paper."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.test_util import check_grads

import jrft.losses as L

RNG = np.random.default_rng(11)
B = 8


def sig(x):
    return 1.0 / (1.0 + np.exp(-x))


def np_kto(pol, ref, pol_kl, ref_kl, labels, beta, wd, wu):
    """arXiv 2402.01306 eq. 8 with z0 = max(0, mean KL of mismatched pairs), row by row."""
    z0 = max(0.0, float(np.mean(pol_kl - ref_kl)))
    out = []
    for p, r, good in zip(pol, ref, labels, strict=True):
        reward = p - r
        out.append(wd * (1 - sig(beta * (reward - z0))) if good else wu * (1 - sig(beta * (z0 - reward))))
    return np.asarray(out), z0


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=["f32", "bf16"])
@pytest.mark.parametrize("shift", [0.0, 3.0], ids=["kl-clamped", "kl-positive"])
def test_kto_matches_numpy(dtype, shift):
    pol, ref, ref_kl = (-RNG.uniform(5, 30, size=B) for _ in range(3))
    pol_kl = ref_kl + RNG.normal(size=B) + shift  # shift 0: the mean may be < 0 and is clamped at 0
    labels = RNG.integers(0, 2, size=B).astype(bool)
    args = [jnp.asarray(x, dtype) for x in (pol, ref, pol_kl, ref_kl)]
    f64 = [np.asarray(jnp.asarray(a).astype(jnp.float32), np.float64) for a in args]

    @jax.jit
    def fn(pol, ref, pol_kl, ref_kl, labels):
        kl = L.kto_kl_estimate(pol_kl, ref_kl)
        losses, rewards = L.kto_loss(
            pol, ref, labels, kl, beta=0.1, desirable_weight=1.0, undesirable_weight=1.3
        )
        return losses, rewards, kl

    losses, rewards, kl = fn(*args, jnp.asarray(labels))
    want, z0 = np_kto(*f64, labels, 0.1, 1.0, 1.3)
    np.testing.assert_allclose(kl, z0, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(losses, want, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(rewards, 0.1 * (f64[0] - f64[1]), rtol=1e-5, atol=1e-6)
    assert losses.dtype == jnp.float32


def test_kto_hand_values_and_padding():
    zero = jnp.zeros(2)
    losses, _ = L.kto_loss(zero, zero, jnp.array([True, False]), 0.0, beta=1.0, undesirable_weight=2.0)
    np.testing.assert_allclose(losses, [0.5, 1.0])  # sigmoid(0) = 1/2, times the weights
    # Padding rows (where = 0) never move the KL estimate.
    kl = L.kto_kl_estimate(jnp.array([1.0, 100.0]), jnp.array([0.0, 0.0]), where=jnp.array([1, 0]))
    assert float(kl) == 1.0


def test_kto_gradients_flow_into_policy_only():
    with jax.enable_x64(True):
        pol, ref = jnp.asarray(-RNG.uniform(1, 5, size=4)), jnp.asarray(-RNG.uniform(1, 5, size=4))
        labels = jnp.array([1, 0, 1, 0])

        def loss(p, kl_logps):
            kl = L.kto_kl_estimate(kl_logps, ref)
            return jnp.sum(L.kto_loss(p, ref, labels, kl, beta=0.5)[0])

        check_grads(lambda p: loss(p, pol + 1.0), (pol,), 1, ["rev"], eps=1e-6)
        assert bool(jnp.all(jax.grad(loss, argnums=1)(pol, pol + 1.0) == 0))  # z0 is detached
