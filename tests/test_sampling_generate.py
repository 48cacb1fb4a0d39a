"""jrft.sampling.generate on tiny random transformers checkpoints: greedy equals transformers' generate token
for token (with EOS stops), log-probs equal teacher forcing, GRPO groups, determinism, compile buckets."""

import functools
import tempfile

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from flax import nnx  # noqa: E402

from jrft.models import from_pretrained  # noqa: E402
from jrft.models import testing as mt  # noqa: E402
from jrft.sampling.generate import (  # noqa: E402
    FINISH_LENGTH,
    FINISH_STOP,
    Sampler,
    bucket_length,
    generate,
)

LENGTHS = (11, 6, 3, 9)  # a left-padded batch of different prompt lengths
MAX_NEW = 40  # bucket 64: two attention segments, so the cache grows once mid-generation


# Compiles dominate this file's time: tests share programs (same family, batch, buckets, G, filters) through
# the process-wide sampler, so most calls below reuse one of a few compiled programs.


@functools.cache
def _load(family):
    path = mt.save_tiny_hf_model(family, tempfile.mkdtemp(prefix=f"jrft_sampling_{family}_"), seed=3)
    hf = transformers.AutoModelForCausalLM.from_pretrained(path).float().eval()
    return family, from_pretrained(path), hf


@pytest.fixture(scope="module", params=["llama", "qwen2", "qwen3", "gemma2"])
def models(request):
    return _load(request.param)


@pytest.fixture(scope="module")
def llama():
    return _load("llama")


def _prompts(vocab):
    return mt.mixed_padding_batch(vocab, seed=1, lengths=LENGTHS)


def _pick_stop_token(greedy: np.ndarray) -> int:
    """A token the model emits greedily in some rows (after a couple of steps) but not in every row, so the
    batch has both 'stop' and 'length' rows."""
    rows = [set(r[2:-2].tolist()) for r in greedy]
    for tok in sorted(set().union(*rows)):
        if tok > 2 and 0 < sum(tok in r for r in rows) < len(rows):
            return tok
    pytest.skip("no token emitted by only some rows")


def _hf_greedy(hf, tokens, mask, max_new, eos):
    with torch.no_grad():
        out = hf.generate(
            input_ids=torch.as_tensor(tokens, dtype=torch.long),
            attention_mask=torch.as_tensor(mask, dtype=torch.long),
            max_new_tokens=max_new,
            do_sample=False,
            eos_token_id=eos,
            pad_token_id=0,
        )
    return out[:, tokens.shape[1] :].numpy()


def _teacher_forced_logps(model, result, temperature=1.0):
    """log p(completion token) from one full forward over prompt + completion: ``[R, Tn]``."""
    seq = jnp.concatenate([result.prompt_tokens, result.tokens], axis=1)
    att = jnp.concatenate([result.prompt_mask, result.mask], axis=1)
    logits = model(seq, attention_mask=att) / temperature  # [R, T, V]
    logp = jax.nn.log_softmax(logits[:, :-1], axis=-1)
    logp = jnp.take_along_axis(logp, seq[:, 1:, None], axis=-1)[..., 0]
    return np.asarray(logp[:, result.prompt_tokens.shape[1] - 1 :])


def test_greedy_equals_transformers_with_eos_stop(models):
    family, model, hf = models
    tokens, mask = _prompts(model.config.vocab_size)
    free = generate(model, tokens, mask, max_new_tokens=MAX_NEW, temperature=0.0)
    np.testing.assert_array_equal(free.tokens, _hf_greedy(hf, tokens, mask, MAX_NEW, eos=None))
    assert (free.finish_reason == FINISH_LENGTH).all() and (free.lengths == MAX_NEW).all()

    stop = _pick_stop_token(np.asarray(free.tokens))
    res = generate(model, tokens, mask, max_new_tokens=MAX_NEW, temperature=0.0, stop_token_ids=[stop])
    ref = _hf_greedy(hf, tokens, mask, MAX_NEW, eos=stop)
    got = np.asarray(res.tokens)
    np.testing.assert_array_equal(got[:, : ref.shape[1]], ref, err_msg=family)
    assert (got[:, ref.shape[1] :] == 0).all()
    reasons = res.finish_reason_names()
    assert "stop" in reasons and "length" in reasons, reasons
    for row, mrow, n, why in zip(got, np.asarray(res.mask), np.asarray(res.lengths), reasons, strict=True):
        assert mrow[:n].all() and not mrow[n:].any() and (row[n:] == 0).all()
        assert (row[n - 1] == stop) == (why == "stop")


def test_logprobs_equal_teacher_forcing(llama):
    _, model, _ = llama
    tokens, mask = _prompts(model.config.vocab_size)
    for temperature in (1.0, 0.7):
        res = generate(model, tokens, mask, max_new_tokens=12, num_samples=2, temperature=temperature, rng=5)
        ref = _teacher_forced_logps(model, res, temperature)
        m = np.asarray(res.mask).astype(bool)
        np.testing.assert_allclose(np.asarray(res.logprobs)[m], ref[m], atol=1e-4)
        assert res.logprobs.dtype == jnp.float32


def test_greedy_logprobs_are_raw_softmax_and_top_k_1_is_greedy(llama):
    _, model, _ = llama
    tokens, mask = _prompts(model.config.vocab_size)
    greedy = generate(model, tokens, mask, max_new_tokens=10, temperature=0.0)
    np.testing.assert_allclose(greedy.logprobs, _teacher_forced_logps(model, greedy), atol=1e-4)
    topk1 = generate(model, tokens, mask, max_new_tokens=10, temperature=1.0, top_k=1, rng=9)
    np.testing.assert_array_equal(topk1.tokens, greedy.tokens)
    # under the filtered (one-token) distribution the log-prob is exactly 0
    np.testing.assert_array_equal(topk1.logprobs, 0.0)


def test_groups_distinct_when_sampling_identical_when_greedy(llama):
    _, model, _ = llama
    tokens, mask = _prompts(model.config.vocab_size)
    g = 2
    res = generate(model, tokens, mask, max_new_tokens=12, num_samples=g, temperature=1.0, rng=0)
    toks = np.asarray(res.tokens).reshape(len(LENGTHS), g, -1)
    for group in toks:
        assert len({tuple(r) for r in group}) == g
    np.testing.assert_array_equal(res.prompt_tokens, np.repeat(tokens, g, axis=0))
    greedy = generate(model, tokens, mask, max_new_tokens=12, num_samples=g, temperature=0.0)
    single = generate(model, tokens, mask, max_new_tokens=12, temperature=0.0)
    np.testing.assert_array_equal(greedy.tokens, np.repeat(np.asarray(single.tokens), g, axis=0))


def test_deterministic_for_an_rng(llama):
    _, model, _ = llama
    tokens, mask = _prompts(model.config.vocab_size)
    kw = dict(max_new_tokens=8, num_samples=2, temperature=1.0)
    a = generate(model, tokens, mask, rng=jax.random.key(7), **kw)
    b = generate(model, tokens, mask, rng=jax.random.key(7), **kw)
    c = generate(model, tokens, mask, rng=jax.random.key(8), **kw)
    np.testing.assert_array_equal(a.tokens, b.tokens)
    np.testing.assert_array_equal(a.logprobs, b.logprobs)
    assert not np.array_equal(a.tokens, c.tokens)


def test_buckets_compile_once_and_loop_stops_early(llama):
    _, model, _ = llama
    sampler = Sampler()
    tokens, mask = mt.mixed_padding_batch(model.config.vocab_size, seed=2, lengths=(5, 9))
    first = generate(model, tokens, mask, max_new_tokens=20, temperature=0.0, sampler=sampler)
    assert sampler.stats.compiles == 1
    # a (graphdef, state) pair, as a trainer holds it, runs the same program
    split = generate(nnx.split(model), tokens, mask, max_new_tokens=20, temperature=0.0, sampler=sampler)
    np.testing.assert_array_equal(split.tokens, first.tokens)
    assert sampler.stats.compiles == 1
    # other prompt length, max_new_tokens, temperature, top-p value and stop ids: same buckets, no compile
    tokens2, mask2 = mt.mixed_padding_batch(model.config.vocab_size, seed=3, lengths=(12, 4))
    generate(
        model, tokens2, mask2, max_new_tokens=30, temperature=0.0, stop_token_ids=[5, 6], sampler=sampler
    )
    generate(model, tokens, mask, max_new_tokens=7, temperature=0.0, sampler=sampler)
    assert sampler.stats.compiles == 1 and sampler.stats.calls == 4
    res = generate(model, tokens, mask, max_new_tokens=20, temperature=0.8, top_p=0.9, sampler=sampler)
    generate(model, tokens, mask, max_new_tokens=20, temperature=1.3, top_p=0.5, sampler=sampler)
    assert sampler.stats.compiles == 2 and res.stats.compiles == 2
    # every row stops at its first token: the decode loop ends after one step, not 19
    first_tokens = np.unique(np.asarray(first.tokens)[:, 0]).tolist()
    res = generate(
        model, tokens, mask, max_new_tokens=20, temperature=0.0, stop_token_ids=first_tokens, sampler=sampler
    )
    assert res.decode_steps == 0 and (res.lengths == 1).all() and (res.finish_reason == FINISH_STOP).all()
    assert sampler.stats.compiles == 2
    assert bucket_length(3) == 16 and bucket_length(17) == 32 and bucket_length(100, 32) == 128


def test_bf16_cache_runs_close_to_fp32(llama):
    _, model, _ = llama
    tokens, mask = _prompts(model.config.vocab_size)
    ref = generate(model, tokens, mask, max_new_tokens=6, temperature=0.0)
    res = generate(model, tokens, mask, max_new_tokens=6, temperature=0.0, cache_dtype=jnp.bfloat16)
    np.testing.assert_array_equal(res.tokens[:, :2], ref.tokens[:, :2])
    np.testing.assert_allclose(res.logprobs[:, 0], ref.logprobs[:, 0], atol=0.05)


def test_rejects_right_padding():
    tokens = np.array([[5, 6, 0]])
    with pytest.raises(ValueError, match="LEFT-padded; row 0"):
        generate((None, None), tokens, np.array([[1, 1, 0]]), max_new_tokens=2)
    with pytest.raises(ValueError, match="row 1 has no tokens"):
        generate((None, None), np.array([[5, 6], [0, 0]]), np.array([[1, 1], [0, 0]]), max_new_tokens=2)


def test_scan_layout_equals_unrolled(llama):
    _, model, _ = llama
    tokens, mask = _prompts(model.config.vocab_size)
    kw = dict(max_new_tokens=MAX_NEW, num_samples=2, temperature=1.0, rng=3)
    a = generate(model, tokens, mask, **kw)
    b = generate(model, tokens, mask, layout="scan", fuse_projections=False, **kw)
    np.testing.assert_array_equal(a.tokens, b.tokens)
    np.testing.assert_allclose(a.logprobs, b.logprobs, atol=1e-5)
    with pytest.raises(ValueError, match="layout"):
        generate(model, tokens, mask, max_new_tokens=2, layout="nope")


def test_gemma2_sampled_logprobs_equal_teacher_forcing_in_both_layouts():
    """Gemma 2's decode features (sliding window 4 on layer 0, attention and final soft-capping, query scale,
    post-branch norms) against the model's own full forward, over 40 sampled tokens."""
    _, model, _ = _load("gemma2")
    cfg = model.config
    assert cfg.sliding_window == 4 and cfg.attn_softcap and cfg.final_softcap and cfg.post_norms
    tokens, mask = _prompts(cfg.vocab_size)
    kw = dict(max_new_tokens=MAX_NEW, num_samples=2, temperature=1.0, rng=7)
    unrolled = generate(model, tokens, mask, **kw)
    scanned = generate(model, tokens, mask, layout="scan", fuse_projections=False, **kw)
    np.testing.assert_array_equal(unrolled.tokens, scanned.tokens)
    ref = _teacher_forced_logps(model, unrolled)
    m = np.asarray(unrolled.mask).astype(bool)
    assert m.sum() > 100
    for res in (unrolled, scanned):
        np.testing.assert_allclose(np.asarray(res.logprobs)[m], ref[m], atol=1e-4)


def test_yarn_rope_greedy_equals_transformers(tmp_path):
    """The decode step's RoPE carries YaRN's cos/sin factor (a Qwen2.5 long-context style config)."""
    rope = {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0, "original_max_position_embeddings": 16}
    path = mt.save_tiny_hf_model("qwen2", tmp_path, seed=3, rope_parameters=rope)
    hf = transformers.AutoModelForCausalLM.from_pretrained(path).float().eval()
    model = from_pretrained(path)
    tokens, mask = _prompts(model.config.vocab_size)
    res = generate(model, tokens, mask, max_new_tokens=24, temperature=0.0)
    np.testing.assert_array_equal(res.tokens, _hf_greedy(hf, tokens, mask, 24, eos=None))
