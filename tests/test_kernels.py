"""jrft.models.kernels: which attention each platform gets (and why), the Pallas splash kernel in interpret
mode against ``layers.attention`` (values and gradients, float32, left-padded rows and packed segments), the
cuDNN wrapper's layout through ``jax.nn.dot_product_attention``'s XLA implementation, and that the mask facts
the kernel needs are known only for masks straight from ``causal_mask``."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jrft.models import kernels
from jrft.models.kernels import attention_impl, cudnn_attention, splash_attention
from jrft.models.layers import attention, causal_mask, mask_facts, window_mask

SHAPE = dict(q_heads=32, kv_heads=8, head_dim=64, q_len=2048, kv_len=2048)


def _impl(platform, dtype=jnp.bfloat16, **overrides):
    args = dict(SHAPE, full_causal=True, segments_known=True) | overrides
    return attention_impl(platform, dtype, **args)


def test_cpu_always_keeps_the_xla_path():
    for full_causal in (True, False):
        choice = _impl("cpu", jnp.float32, full_causal=full_causal)
        assert choice.impl == "xla" and "cpu" in choice.reason


def test_tpu_picks_splash_for_full_causal_sequences_and_says_why_not_otherwise():
    assert _impl("tpu").impl == "splash"
    assert _impl("tpu", jnp.float32, softcap=50.0).impl == "splash"  # the kernel soft-caps itself
    falls_back = {
        "decode": _impl("tpu", full_causal=False, q_len=1),
        "sliding window": _impl("tpu", segments_known=False),
        "multiple of 128": _impl("tpu", q_len=1000, kv_len=1000),
        "not a multiple": _impl("tpu", q_heads=12, kv_heads=8),
        "cross shards": _impl("tpu", head_shards=4, kv_head_shards=1),
    }
    for words, choice in falls_back.items():
        assert choice.impl == "xla", words
        assert words in choice.reason or words in choice.reason.replace("-", " "), choice.reason


def test_gpu_picks_cudnn_for_half_precision_only():
    assert _impl("gpu", jnp.bfloat16).impl == "cudnn"
    assert _impl("gpu", jnp.float16).impl == "cudnn"
    for choice in (
        _impl("gpu", jnp.float32),
        _impl("gpu", softcap=50.0),
        _impl("gpu", head_dim=256),
        _impl("gpu", head_dim=60),
        _impl("gpu", full_causal=False, q_len=1),
    ):
        assert choice.impl == "xla" and choice.reason


B, T, H, KV, DH = 2, 256, 4, 2, 32


def _inputs(seed=0):
    keys = jax.random.split(jax.random.PRNGKey(seed), 4)
    q = jax.random.normal(keys[0], (B, T, H, DH))
    k = jax.random.normal(keys[1], (B, KV, T, DH))
    v = jax.random.normal(keys[2], (B, KV, T, DH))
    d_out = jax.random.normal(keys[3], (B, T, H, DH))
    return q, k, v, d_out


def _ragged_left_padded():
    valid = np.ones((B, T), np.int32)
    valid[0, :37] = 0  # row 0 left-padded by 37, row 1 by 130 (a whole kernel block and more)
    valid[1, :130] = 0
    return jnp.asarray(valid), None


def _packed():
    seg = np.zeros((B, T), np.int32)
    seg[0, 60:] = 1
    seg[0, 200:] = 2
    seg[1, 128:] = 5
    valid = np.ones((B, T), np.int32)
    valid[0, 240:] = 0  # trailing padding after the last segment
    return jnp.asarray(valid), jnp.asarray(seg)


@pytest.mark.parametrize("softcap", [None, 3.0])
@pytest.mark.parametrize("batch", [_ragged_left_padded, _packed])
def test_splash_in_interpret_mode_matches_attention_values_and_gradients(batch, softcap):
    q, k, v, d_out = _inputs()
    valid, seg = batch()
    slots = jnp.arange(T)
    mask = causal_mask(valid, slots, slots, seg)
    real = valid.astype(bool)[:, :, None, None]
    d_out = jnp.where(real, d_out, 0.0)  # padding rows carry no loss (rows the XLA path sees as it may)

    def loss(fn):
        return lambda q, k, v: jnp.sum(fn(q, k, v) * d_out)

    def xla(q, k, v):
        return attention(q, k, v, mask, 0.3, softcap, causal_block=64)

    def splash(q, k, v):
        return splash_attention(q, k, v, valid, seg, 0.3, softcap, interpret=True)

    want, got = jax.jit(xla)(q, k, v), jax.jit(splash)(q, k, v)
    np.testing.assert_allclose(jnp.where(real, got, 0.0), jnp.where(real, want, 0.0), atol=1e-5, rtol=1e-5)
    assert np.all(np.asarray(got)[~np.asarray(real)[..., 0, 0]] == 0)  # padding rows give zeros
    grads_want = jax.jit(jax.grad(loss(xla), argnums=(0, 1, 2)))(q, k, v)
    grads_got = jax.jit(jax.grad(loss(splash), argnums=(0, 1, 2)))(q, k, v)
    for name, g, w in zip("qkv", grads_got, grads_want, strict=True):
        assert np.all(np.isfinite(g)), name
        np.testing.assert_allclose(g, w, atol=1e-5, rtol=1e-5, err_msg=f"d{name}")


def test_cudnn_wrapper_layout_matches_attention_through_the_xla_implementation():
    q, k, v, _ = _inputs()
    q, k, v = q[:, :64], k[:, :, :64], v[:, :, :64]
    valid, seg = _packed()
    slots = jnp.arange(64)
    mask = causal_mask(valid[:, :64].at[1, :9].set(0), slots, slots, seg[:, :64])
    mask = window_mask(mask, slots, slots, 20)  # the dense mask carries windows too
    got = cudnn_attention(q, k, v, mask, 0.3, implementation="xla")
    np.testing.assert_allclose(got, attention(q, k, v, mask, 0.3), atol=1e-5)


def test_mask_facts_only_for_masks_straight_from_causal_mask():
    valid, seg = _packed()
    slots = jnp.arange(T)
    mask = causal_mask(valid, slots, slots, seg)
    facts = mask_facts(mask)
    assert facts is not None and facts[0] is valid and facts[1] is seg
    assert mask_facts(window_mask(mask, slots, slots, 16)) is None  # sliding-window layers: XLA path
    assert mask_facts(causal_mask(valid, slots, jnp.arange(T))) is None  # not self-attention slots
    assert mask_facts(mask[:, :10]) is None


def test_platform_comes_from_the_mesh_not_the_host():
    seen = []

    def f(x):
        seen.append(kernels.current_platform(x)[0])
        return x

    x = jax.ShapeDtypeStruct((4,), jnp.float32)
    with jax.set_mesh(jax.make_mesh((1,), ("data",))):
        jax.jit(f).trace(x)
    assert seen == ["cpu"]


def test_forced_xla_and_the_recorded_names(monkeypatch):
    splash = kernels.AttentionChoice("splash", "TPU")
    assert kernels.forced(splash) == splash
    monkeypatch.setenv("JRFT_ATTENTION", "xla")
    assert kernels.forced(splash).impl == "xla" and "would be splash" in kernels.forced(splash).reason
    q, k = jnp.zeros((1, 128, 4, 8)), jnp.zeros((1, 2, 128, 8))
    with kernels.recording() as seen:
        kernels.log_choice(splash, q, k)
        kernels.log_choice(splash, q, k)
        kernels.log_choice(kernels.AttentionChoice("xla", "decode step"), q, k)
    assert kernels.describe(seen) == "splash (pallas-tpu); xla-blocked (decode step)"
    assert kernels.describe([]) is None
