"""KV-cache forward: prefill + single-token decode steps reproduce one full forward (left padding too)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jrft.models import Decoder, ModelConfig, init_cache, positions_from_mask
from jrft.models.testing import mixed_padding_batch, tiny_hf_config


def _model(family, **overrides):
    cfg = ModelConfig.from_hf(tiny_hf_config(family, **overrides))
    return Decoder(cfg, rngs=nnx.Rngs(1))


@jax.jit
def _step(model, tokens, positions, cache, index, mask):
    return model.forward_with_cache(tokens, positions, cache, index, mask)


def _incremental(model, tokens, mask, prompt_len, max_len, bucket=None, cache_dtype=jnp.float32):
    """Logits [B, T, V] from a prefill of ``prompt_len`` tokens then one token per step."""
    b, t = tokens.shape
    positions = np.asarray(positions_from_mask(mask))
    cache = init_cache(model.config, b, max_len, cache_dtype)
    slot_mask = np.zeros((b, max_len), np.int32)
    slot_mask[:, :prompt_len] = mask[:, :prompt_len]

    def attended(end):  # the bucketed prefix a sampler would attend over
        size = max_len if bucket is None else min(max_len, -(-end // bucket) * bucket)
        return slot_mask[:, :size]

    logits, cache = _step(
        model, tokens[:, :prompt_len], positions[:, :prompt_len], cache, 0, attended(prompt_len)
    )
    out = [np.asarray(logits)]
    for i in range(prompt_len, t):
        slot_mask[:, i] = mask[:, i]
        logits, cache = _step(model, tokens[:, i : i + 1], positions[:, i : i + 1], cache, i, attended(i + 1))
        out.append(np.asarray(logits))
    return np.concatenate(out, axis=1), cache


@pytest.mark.parametrize("family,bucket", [("llama", None), ("llama", 4), ("qwen3", None), ("gemma2", 4)])
def test_prefill_and_decode_match_full_forward(family, bucket):
    model = _model(family)
    prompt, prompt_mask = mixed_padding_batch(128, seed=2, lengths=(6, 3, 6, 1))
    gen = np.random.default_rng(0).integers(3, 128, (4, 5)).astype(np.int32)
    tokens = np.concatenate([prompt, gen], axis=1)
    mask = np.concatenate([prompt_mask, np.ones_like(gen)], axis=1)
    full = np.asarray(model(tokens, mask))
    inc, cache = _incremental(model, tokens, mask, prompt_len=6, max_len=14, bucket=bucket)
    valid = mask.astype(bool)
    np.testing.assert_array_less(np.abs(full - inc)[valid], 1e-5)
    assert cache.k.shape == (2, 4, 2, 14, 16)  # [L, B, K, S, Dh]
    assert np.all(np.asarray(cache.k)[:, :, :, 11:] == 0)  # nothing written past the last token


def test_bf16_cache_and_last_only():
    model = _model("llama")
    tokens, mask = mixed_padding_batch(128, seed=3, lengths=(7, 4))
    full = np.asarray(model(tokens, mask))
    inc, cache = _incremental(model, tokens, mask, prompt_len=5, max_len=8, cache_dtype=jnp.bfloat16)
    assert cache.k.dtype == jnp.bfloat16
    valid = mask.astype(bool)
    err = np.abs(full - inc)[valid].max()
    assert 0 < err < 0.05 * np.abs(full).max()
    cache = init_cache(model.config, 2, 8)
    last, _ = model.forward_with_cache(tokens, positions_from_mask(mask), cache, 0, mask, last_only=True)
    assert last.shape == (2, 1, 128) and last.dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(last[:, 0]), full[:, -1], atol=1e-5)
