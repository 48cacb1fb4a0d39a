"""The ragged decode kernel (jrft.models.ragged_decode) in Pallas interpret mode against the decode step's
own attention math (``decode._attend_1``, float32, 1e-5): ragged rows (different starts and ends, an end
inside a block, a row with one valid key), GQA, soft-capping, both cache orientations; blocks outside a row's
range are never computed (poisoned with NaN, the result stays exact); which decode attention each platform
gets; and the sampler with the kernel forced (interpret mode, CPU) samples the default path's tokens."""

import tempfile
import types

import jax.numpy as jnp
import numpy as np
import pytest

from jrft.models import kernels
from jrft.models.ragged_decode import blocks_read, ragged_decode_attention, visited_block
from jrft.sampling.decode import _attend_1

L, B, K, G, S, DH, BLOCK = 2, 5, 2, 3, 64, 16, 16
STARTS = np.array([0, 5, 17, 40, 63])  # ends inside blocks (rows 1, 3); one valid key (rows 2, 4)
ENDS = np.array([63, 20, 17, 45, 63])


def _inputs(seed=0):
    r = np.random.default_rng(seed)
    q = r.normal(size=(B, K, G, DH)).astype(np.float32)
    k = r.normal(size=(L, B, K, S, DH)).astype(np.float32)
    v = r.normal(size=(L, B, K, S, DH)).astype(np.float32)
    return q, k, v


def _reference(q, k, v, layer, scale, softcap):
    """``_attend_1`` (the XLA decode step's attention) with an identity output projection."""
    cfg = types.SimpleNamespace(attn_scale=scale, attn_softcap=softcap, o_bias=False)
    p = {"wo": jnp.eye(K * G * DH)}
    slots = np.arange(S)
    valid = (slots[None] >= STARTS[:, None]) & (slots[None] <= ENDS[:, None])
    bias = jnp.where(valid, 0.0, jnp.finfo(jnp.float32).min)[:, None, None, :]
    out = _attend_1(cfg, p, jnp.asarray(q).reshape(B, K * G, DH), k[layer], v[layer], bias)
    return np.asarray(out).reshape(B, K, G, DH)


@pytest.mark.parametrize("softcap, slots_minor", [(None, False), (2.0, True)])
def test_kernel_equals_the_decode_step_attention_on_ragged_rows(softcap, slots_minor):
    q, k, v = _inputs()
    got = ragged_decode_attention(
        q, k, v, 1, STARTS, ENDS, 0.3, softcap, block=BLOCK, slots_minor=slots_minor, interpret=True
    )
    np.testing.assert_allclose(got, _reference(q, k, v, 1, 0.3, softcap), atol=1e-5, rtol=1e-5)


def test_blocks_outside_a_rows_range_are_neither_read_nor_computed():
    """Keys and values of every block a row does not visit are NaN (and so is every other layer): any
    arithmetic on them would poison the row's output."""
    q, k, v = _inputs(1)
    visit = np.zeros((B, S // BLOCK), bool)
    for b in range(B):
        visit[b, STARTS[b] // BLOCK : ENDS[b] // BLOCK + 1] = True
    poison = (
        ~np.repeat(visit, BLOCK, axis=1)[None, :, None, :, None]
        | (np.arange(L) != 0)[:, None, None, None, None]
    )
    k_bad, v_bad = np.where(poison, np.nan, k), np.where(poison, np.nan, v)
    got = ragged_decode_attention(q, k_bad, v_bad, 0, STARTS, ENDS, 0.25, block=BLOCK, interpret=True)
    np.testing.assert_allclose(got, _reference(q, k, v, 0, 0.25, None), atol=1e-5, rtol=1e-5)


def test_index_map_visits_the_range_blocks_then_repeats_the_last():
    steps = [int(visited_block(jnp.int32(j), 40, 100, 16)) for j in range(8)]
    assert steps == [2, 3, 4, 5, 6, 6, 6, 6]  # slots 40..100: blocks 2..6, then no new block (no DMA)
    np.testing.assert_array_equal(blocks_read(STARTS, ENDS, BLOCK), [4, 2, 1, 1, 1])
    np.testing.assert_array_equal(blocks_read([0, 300], [355, 355], 256), [2, 1])  # not the allocated 17


def test_decode_attention_choice_by_platform_and_layout(monkeypatch):
    heads = dict(q_heads=32, kv_heads=8)
    assert kernels.decode_attention_impl("tpu", **heads, layout="scan").impl == "ragged-decode"
    falls_back = {
        "platform cpu": kernels.decode_attention_impl("cpu", **heads, layout="scan"),
        "platform gpu": kernels.decode_attention_impl("gpu", **heads, layout="scan"),
        "layout 'unrolled'": kernels.decode_attention_impl("tpu", **heads, layout="unrolled"),
        "not a multiple": kernels.decode_attention_impl("tpu", q_heads=12, kv_heads=8, layout="scan"),
    }
    for words, choice in falls_back.items():
        assert choice.impl == "xla" and words in choice.reason, choice
    monkeypatch.setenv("JRFT_ATTENTION", "xla")
    forced = kernels.forced(kernels.decode_attention_impl("tpu", **heads, layout="scan"))
    assert forced.impl == "xla" and "JRFT_ATTENTION" in forced.reason
    assert kernels.LABELS["ragged-decode"] == "ragged-decode (pallas-tpu)"
    assert kernels.describe([kernels.AttentionChoice("ragged-decode", "")]) == "ragged-decode (pallas-tpu)"


@pytest.mark.parametrize("family", ["llama", "gemma2"])  # gemma2: sliding-window layers and soft-capping
def test_sampler_with_the_kernel_samples_the_default_paths_tokens(family):
    pytest.importorskip("transformers")
    from jrft.models import from_pretrained
    from jrft.models import testing as mt
    from jrft.sampling import generate

    model = from_pretrained(mt.save_tiny_hf_model(family, tempfile.mkdtemp(prefix="jrft_ragged_"), seed=3))
    tokens, mask = mt.mixed_padding_batch(128, seed=1, lengths=(11, 6, 3, 9))
    kw = dict(max_new_tokens=40, temperature=0.0)  # slots 16 + 64 = 5 kernel blocks of 16 in interpret mode
    default = generate(model, tokens, mask, **kw)
    ragged = generate(model, tokens, mask, decode_attention="ragged-decode", **kw)
    np.testing.assert_array_equal(ragged.tokens, default.tokens)
    np.testing.assert_array_equal(ragged.mask, default.mask)
    np.testing.assert_allclose(ragged.logprobs, default.logprobs, atol=1e-5)


def test_sampler_estimate_counts_one_unpadded_cache_with_the_kernel(monkeypatch):
    """The TPU sampler's estimate: with the kernel one cache (head_dim 64 unpadded, slots-minor), with the
    XLA step three caches with head_dim padded to 128 lanes (both measured by scripts/decode_memory.py)."""
    from jrft.aot.presets import model_config
    from jrft.config import load_config
    from jrft.train.runs.setup import run_estimates

    overrides = ["objective=grpo", "model.path=llama3-1b", "model.dtype=bfloat16", "train.batch_size=8"]
    overrides += ["grpo.num_generations=8", "grpo.max_new_tokens=1024", "data.max_prompt_length=256"]
    config = load_config(None, [*overrides, "grpo.reward_functions=[{name: accuracy}]", "output_dir=/tmp/x"])
    cfg, shape = model_config("llama3-1b"), [1, 8, 1]
    kernel = run_estimates(config, cfg, shape, platform="tpu", hbm_bytes=None)["sampler"]
    monkeypatch.setenv("JRFT_ATTENTION", "xla")
    xla = run_estimates(config, cfg, shape, platform="tpu", hbm_bytes=None)["sampler"]
    one_cache = 2 * 16 * (64 // 8) * 8 * 1280 * 64 * 2  # k and v, layers, rows per chip, kv heads, slots, Dh
    assert xla - kernel == 3 * 2 * one_cache - one_cache
