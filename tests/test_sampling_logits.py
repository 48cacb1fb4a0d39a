"""Pure logits -> token pieces of jrft.sampling: filters keep exactly the right tokens, sampling matches the
softmax (chi-square), log-probs are under the processed distribution."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import stats

from jrft.sampling.logits import (
    SamplingParams,
    logits_to_probs,
    process_logits,
    sample,
    select_next,
    token_logprob,
)


def kept(logits, **kw):
    out = jax.jit(functools.partial(process_logits, **kw))(jnp.asarray(logits, jnp.float32))
    return [int(i) for i in np.flatnonzero(np.isfinite(np.asarray(out)[0]))]


def test_top_k_keeps_the_k_largest():
    logits = [[1.0, 5.0, 3.0, 4.0, 2.0]]
    assert kept(logits, top_k=1) == [1]
    assert kept(logits, top_k=2) == [1, 3]
    assert kept(logits, top_k=3) == [1, 2, 3]
    assert kept(logits, top_k=10) == [0, 1, 2, 3, 4]  # k > V keeps all


def test_top_k_keeps_all_ties_at_the_boundary():
    # documented: every token equal to the k-th largest survives (as transformers' TopKLogitsWarper)
    assert kept([[5.0, 4.0, 4.0, 1.0]], top_k=2) == [0, 1, 2]
    assert kept([[5.0, 4.0, 4.0, 1.0]], top_k=1) == [0]


def test_top_p_keeps_the_minimal_nucleus():
    logits = np.log([[0.5, 0.25, 0.125, 0.0625, 0.0625]])  # exact in binary
    assert kept(logits, top_p=0.1) == [0]  # at least one token
    assert kept(logits, top_p=0.5) == [0]  # 0.5 already reaches p
    assert kept(logits, top_p=0.51) == [0, 1]
    assert kept(logits, top_p=0.75) == [0, 1]
    assert kept(logits, top_p=0.8) == [0, 1, 2]
    assert kept(logits, top_p=1.0) == [0, 1, 2, 3, 4]
    # order of the vocabulary does not matter
    assert kept(logits[:, ::-1], top_p=0.8) == [2, 3, 4]


def test_top_p_keeps_ties_at_the_boundary():
    # 0.5 + 0.25 reaches 0.7, but token 2 ties with token 1 (both 0.25): both are kept (documented)
    logits = np.log([[0.5, 0.25, 0.25]])
    assert kept(logits, top_p=0.7) == [0, 1, 2]


def test_top_p_matches_numpy_reference_on_random_rows():
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(64, 50)).astype(np.float32) * 3
    for p in (0.3, 0.9):
        out = np.isfinite(np.asarray(process_logits(jnp.asarray(logits), top_p=p)))
        for row, got in zip(logits, out, strict=True):
            order = np.argsort(-row)
            probs = np.exp(row[order] - row.max())
            probs /= probs.sum()
            n = int(np.searchsorted(np.cumsum(probs), p) + 1)  # smallest prefix with mass >= p
            want = np.zeros(50, bool)
            want[order[:n]] = True
            np.testing.assert_array_equal(got, want)


def test_top_k_then_top_p_on_the_renormalised_distribution():
    logits = np.log([[0.4, 0.3, 0.2, 0.1]])
    # after top-k=2: 0.4/0.7=0.571, 0.3/0.7=0.429 -> p=0.5 keeps only token 0, p=0.6 keeps both
    assert kept(logits, top_k=2, top_p=0.5) == [0]
    assert kept(logits, top_k=2, top_p=0.6) == [0, 1]
    # a tie beyond k: top-k=2 keeps [0, 1, 2] (1 and 2 tie); masses 0.5,0.25,0.25 -> p=0.6 keeps all three
    assert kept(np.log([[0.4, 0.2, 0.2, 0.1]]), top_k=2, top_p=0.6) == [0, 1, 2]


def test_min_p_keeps_tokens_above_a_fraction_of_the_max():
    logits = np.log([[0.5, 0.25, 0.125, 0.125]])
    assert kept(logits, min_p=0.3) == [0, 1]  # threshold 0.15
    assert kept(logits, min_p=0.6) == [0]
    assert kept(logits, min_p=0.2) == [0, 1, 2, 3]


def test_temperature_scales_logits():
    logits = jnp.array([[1.0, -2.0, 0.5]])
    np.testing.assert_allclose(process_logits(logits, temperature=0.5), logits / 0.5, rtol=1e-6)
    probs = logits_to_probs(logits, temperature=2.0)
    np.testing.assert_allclose(probs, jax.nn.softmax(logits / 2.0), rtol=1e-6)


def test_token_logprob_is_under_the_filtered_distribution():
    logits = jnp.log(jnp.array([[0.5, 0.3, 0.2]]))
    processed = process_logits(logits, top_k=2)
    lp = token_logprob(processed, jnp.array([1]))
    np.testing.assert_allclose(lp, np.log(0.3 / 0.8), rtol=1e-5)
    assert np.isneginf(np.asarray(token_logprob(processed, jnp.array([2])))[0])


def test_greedy_select_takes_argmax_and_raw_logprob():
    logits = jnp.array([[0.1, 2.0, -1.0], [3.0, 3.0, 0.0]])
    tokens, lps = jax.jit(lambda r, x: select_next(r, x, SamplingParams(temperature=0.0)))(
        jax.random.key(0), logits
    )
    np.testing.assert_array_equal(tokens, [1, 0])  # first max on ties
    np.testing.assert_allclose(lps, jax.nn.log_softmax(logits)[jnp.arange(2), tokens], rtol=1e-6)


@pytest.mark.parametrize(
    "params, allowed",
    [
        (SamplingParams(temperature=1.0), None),
        (SamplingParams(temperature=0.7), None),
        (SamplingParams(temperature=1.0, top_k=3), [0, 1, 2]),
        (SamplingParams(temperature=1.0, top_p=0.7), [0, 1, 2]),
    ],
)
def test_sampling_frequencies_match_softmax_chi_square(params, allowed):
    probs = np.array([0.35, 0.2, 0.15, 0.1, 0.08, 0.06, 0.04, 0.02], np.float32)
    n = 40_000
    logits = jnp.broadcast_to(jnp.log(probs), (n, probs.size))
    tokens, lps = jax.jit(lambda r, x: select_next(r, x, params))(jax.random.key(1234), logits)
    counts = np.bincount(np.asarray(tokens), minlength=probs.size)
    want = probs.astype(np.float64) ** (1.0 / params.temperature)
    if allowed is not None:
        mask = np.zeros_like(want)
        mask[allowed] = 1
        want = want * mask
        assert counts[mask == 0].sum() == 0, "a filtered token was sampled"
    want = want / want.sum()
    support = want > 0
    _, pvalue = stats.chisquare(counts[support], n * want[support])
    assert pvalue > 1e-3, (counts, n * want)
    # the returned log-prob of each sample is log(want[token])
    np.testing.assert_allclose(np.asarray(lps), np.log(want[np.asarray(tokens)]), rtol=1e-4, atol=1e-5)


def test_sampling_is_deterministic_for_a_key_and_varies_across_keys():
    logits = jnp.zeros((16, 100))
    a = sample(jax.random.key(0), logits)
    b = sample(jax.random.key(0), logits)
    c = sample(jax.random.key(1), logits)
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)


def test_sampling_params_validate_fields():
    with pytest.raises(ValueError, match="temperature"):
        SamplingParams(temperature=-1.0)
    with pytest.raises(ValueError, match="top_p"):
        SamplingParams(top_p=0.0)
    with pytest.raises(ValueError, match="min_p"):
        SamplingParams(min_p=1.5)
    assert SamplingParams(top_p=1.0).static_key() == (False, 0, False, False)
