"""jrft.losses.common against NumPy references written from the formulas, plus hand values and gradients."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.test_util import check_grads

import jrft.losses as L

RNG = np.random.default_rng(0)


def f64(x):
    """The exact values a loss sees (bf16 inputs rounded first), as float64 for the reference."""
    return np.asarray(jnp.asarray(x).astype(jnp.float32), dtype=np.float64)


def np_log_softmax(z):
    z = z - z.max(-1, keepdims=True)
    return z - np.log(np.exp(z).sum(-1, keepdims=True))


def np_token_logprobs(logits, tokens):
    return np.take_along_axis(np_log_softmax(f64(logits)), np.asarray(tokens)[..., None], -1)[..., 0]


def np_entropy(logits):
    logp = np_log_softmax(f64(logits))
    return -(np.exp(logp) * logp).sum(-1)


NP_KL = {
    "k1": lambda lp, rp: lp - rp,
    "k2": lambda lp, rp: 0.5 * (lp - rp) ** 2,
    "k3": lambda lp, rp: np.exp(rp - lp) - 1 - (rp - lp),
}


@pytest.fixture(params=[jnp.float32, jnp.bfloat16], ids=["f32", "bf16"])
def dtype(request):
    return request.param


def test_token_logprobs_matches_numpy(dtype):
    logits = jnp.asarray(RNG.normal(size=(3, 5, 17)) * 3, dtype)
    tokens = RNG.integers(0, 17, size=(3, 5))
    got = jax.jit(L.token_logprobs)(logits, tokens)
    assert got.dtype == jnp.float32 and got.shape == (3, 5)
    np.testing.assert_allclose(got, np_token_logprobs(logits, tokens), rtol=1e-5, atol=1e-5)


def test_token_logprobs_hand_value():
    logits = jnp.log(jnp.array([[[1.0, 3.0]]]))  # probabilities 1/4, 3/4
    np.testing.assert_allclose(L.token_logprobs(logits, jnp.array([[1]])), [[np.log(0.75)]], rtol=1e-6)
    np.testing.assert_allclose(L.token_logprobs(logits, jnp.array([[0]])), [[np.log(0.25)]], rtol=1e-6)


def test_entropy_matches_numpy_and_uniform(dtype):
    logits = jnp.asarray(RNG.normal(size=(2, 4, 9)) * 2, dtype)
    np.testing.assert_allclose(jax.jit(L.entropy)(logits), np_entropy(logits), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(L.entropy(jnp.zeros((1, 1, 8))), [[np.log(8)]], rtol=1e-6)


def test_masked_sum_and_mean(dtype):
    x = jnp.asarray(RNG.normal(size=(4, 6)), dtype)
    mask = RNG.integers(0, 2, size=(4, 6))
    mask[2] = 0
    xs = f64(x)
    np.testing.assert_allclose(L.masked_sum(x, mask), (xs * mask).sum(), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(L.masked_sum(x, mask, axis=-1), (xs * mask).sum(-1), rtol=1e-5, atol=1e-5)
    rows = (xs * mask).sum(-1) / np.maximum(mask.sum(-1), 1)
    got = jax.jit(L.masked_mean, static_argnums=2)(x, mask, -1)
    np.testing.assert_allclose(got, rows, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(L.masked_mean(x, mask), (xs * mask).sum() / mask.sum(), rtol=1e-5, atol=1e-5)
    assert float(L.masked_mean(x, np.zeros((4, 6)))) == 0.0


def test_masked_mean_never_reads_masked_values():
    x = jnp.array([[1.0, jnp.nan, jnp.inf]])
    mask = jnp.array([[1, 0, 0]])
    assert float(L.masked_mean(x, mask)) == 1.0
    grad = jax.grad(lambda v: L.masked_mean(v, mask))(x)
    np.testing.assert_array_equal(grad, [[1.0, 0.0, 0.0]])
    grad = jax.grad(lambda v: L.masked_mean(v, jnp.zeros_like(mask)))(jnp.ones((1, 3)))
    np.testing.assert_array_equal(grad, np.zeros((1, 3)))


@pytest.mark.parametrize("name", ["k1", "k2", "k3"])
def test_kl_estimators_match_numpy(name, dtype):
    logps = jnp.asarray(-RNG.uniform(0.1, 3.0, size=(3, 7)), dtype)
    ref = jnp.asarray(-RNG.uniform(0.1, 3.0, size=(3, 7)), dtype)
    want = NP_KL[name](f64(logps), f64(ref))
    np.testing.assert_allclose(jax.jit(L.KL_ESTIMATORS[name])(logps, ref), want, rtol=1e-5, atol=1e-5)
    got = L.kl_estimate(logps, ref, estimator=name)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_kl_estimators_hand_values():
    logp, ref = jnp.log(jnp.array([0.5])), jnp.log(jnp.array([0.25]))  # r = pi_ref / pi = 0.5
    np.testing.assert_allclose(L.k1(logp, ref), [np.log(2)], rtol=1e-6)
    np.testing.assert_allclose(L.k2(logp, ref), [0.5 * np.log(2) ** 2], rtol=1e-6)
    np.testing.assert_allclose(L.k3(logp, ref), [0.5 - 1 + np.log(2)], rtol=1e-5)
    # k3 is nonnegative and zero only where the two agree.
    x = jnp.asarray(RNG.normal(size=100))
    assert bool(jnp.all(L.k3(x, x + jnp.asarray(RNG.normal(size=100))) >= 0))
    np.testing.assert_array_equal(L.k3(x, x), np.zeros(100))


def test_kl_estimators_are_unbiased_in_expectation():
    """k1 and k3 average to the exact KL(p || q) under samples from p."""
    p = np.array([0.5, 0.3, 0.2])
    q = np.array([0.2, 0.2, 0.6])
    exact = float((p * np.log(p / q)).sum())
    logp, logq = jnp.log(p), jnp.log(q)
    for name in ("k1", "k3"):
        expectation = float((p * np.asarray(L.KL_ESTIMATORS[name](logp, logq))).sum())
        np.testing.assert_allclose(expectation, exact, rtol=1e-5)


def test_batch_counts():
    mask = jnp.array([[1, 1, 0], [0, 0, 0], [1, 0, 0]])
    num_tokens, num_sequences = L.batch_counts(mask)
    assert float(num_tokens) == 3 and float(num_sequences) == 2
    with pytest.raises(ValueError, match=r"batch_counts: mask must be \[batch, seq\]"):
        L.batch_counts(jnp.ones(3))


def test_gradients_match_finite_differences():
    with jax.enable_x64(True):
        logits = jnp.asarray(RNG.normal(size=(2, 3, 5)))
        tokens = jnp.asarray(RNG.integers(0, 5, size=(2, 3)))
        check_grads(jax.jit(lambda z: L.token_logprobs(z, tokens)), (logits,), order=1, modes=["rev"])
        check_grads(jax.jit(L.entropy), (logits,), order=1, modes=["rev"])
        a, b = jnp.asarray(RNG.normal(size=(2, 3))), jnp.asarray(RNG.normal(size=(2, 3)))
        for fn in (L.k1, L.k2, L.k3):
            check_grads(jax.jit(fn), (a, b), order=1, modes=["rev"])


def test_shape_mismatches_raise_clear_errors():
    with pytest.raises(ValueError, match=r"token_logprobs: .*logits\[2, 3, 5\] and tokens\[2, 4\]"):
        L.token_logprobs(jnp.zeros((2, 3, 5)), jnp.zeros((2, 4), jnp.int32))
    with pytest.raises(ValueError, match=r"k3: .*logps\[2, 3\], ref_logps\[3, 2\]"):
        L.k3(jnp.zeros((2, 3)), jnp.zeros((3, 2)))
    with pytest.raises(ValueError, match=r"masked_mean: .*values\[2, 3\], mask\[2\]"):
        L.masked_mean(jnp.zeros((2, 3)), jnp.zeros(2))


def test_unknown_kl_estimator_lists_valid_names():
    with pytest.raises(ValueError, match=r"unknown KL estimator 'k4'; valid: k1, k2, k3"):
        L.kl_estimate(jnp.zeros(2), jnp.zeros(2), estimator="k4")
