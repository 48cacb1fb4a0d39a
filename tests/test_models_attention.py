"""jrft.models.layers.attention: forward against NumPy, custom backward against autodiff of a plain
version, and causal query blocking equal to the unblocked result."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jrft.models.layers import attention, causal_block_size, causal_mask

B, T, H, KV, DH = 2, 40, 4, 2, 8


def _numpy_attention(q, k, v, mask, scale, softcap):
    """Softmax over allowed keys per query (rows with no allowed key give 0), GQA by repeating kv heads."""
    q, k, v, mask = (np.asarray(x, np.float64) for x in (q, k, v, mask))
    group = H // KV
    out = np.zeros_like(q)
    for b in range(B):
        for h in range(H):
            s = q[b, :, h] @ k[b, h // group].T * scale  # [T, S]
            if softcap is not None:
                s = softcap * np.tanh(s / softcap)
            for t in range(T):
                allowed = mask[b, t] > 0
                if allowed.any():
                    w = np.exp(s[t, allowed] - s[t, allowed].max())
                    out[b, t, h] = (w / w.sum()) @ v[b, h // group][allowed]
    return out


def _plain_attention(q, k, v, mask, scale, softcap):
    """The same in jnp with autodiff's own backward (the reference for the custom VJP)."""
    qg = q.reshape(B, T, KV, H // KV, DH)
    s = jnp.einsum("btkgd,bksd->bkgts", qg, k) * scale
    if softcap is not None:
        s = softcap * jnp.tanh(s / softcap)
    full = mask[:, None, None]
    s = jnp.where(full, s, -1e30)
    p = jnp.where(full, jax.nn.softmax(s, axis=-1), 0.0)
    return jnp.einsum("bkgts,bksd->btkgd", p, v).reshape(B, T, H, DH)


def _inputs():
    keys = jax.random.split(jax.random.PRNGKey(0), 3)
    q = jax.random.normal(keys[0], (B, T, H, DH))
    k = jax.random.normal(keys[1], (B, KV, T, DH))
    v = jax.random.normal(keys[2], (B, KV, T, DH))
    valid = jnp.ones((B, T), jnp.int32).at[1, :5].set(0)  # row 1 left-padded: its first 5 queries see nothing
    segments = jnp.concatenate([jnp.zeros((B, 17), jnp.int32), jnp.ones((B, T - 17), jnp.int32)], axis=1)
    slots = jnp.arange(T)
    return q, k, v, causal_mask(valid, slots, slots), causal_mask(valid, slots, slots, segments)


@pytest.mark.parametrize("softcap", [None, 3.0])
@pytest.mark.parametrize(
    "block", [None, pytest.param(16, marks=pytest.mark.slow), 13]
)  # 13 does not divide T
def test_attention_matches_numpy_and_its_gradients_match_autodiff(softcap, block):
    q, k, v, causal, packed = _inputs()
    weights = jnp.arange(DH, dtype=jnp.float32)  # a non-symmetric downstream use of the output
    for mask in (causal, packed):
        out = attention(q, k, v, mask, 0.3, softcap, causal_block=block)
        np.testing.assert_allclose(out, _numpy_attention(q, k, v, mask, 0.3, softcap), atol=2e-5)
        assert not np.asarray(out[1, :5]).any()  # queries with no allowed key give zeros

        def loss(fn, q, k, v, mask=mask, **kw):
            return (fn(q, k, v, mask, 0.3, softcap, **kw) ** 2 * weights).sum()

        got = jax.grad(lambda *a: loss(attention, *a, causal_block=block), (0, 1, 2))(q, k, v)
        want = jax.grad(lambda *a: loss(_plain_attention, *a), (0, 1, 2))(q, k, v)
        for name, g, w in zip("qkv", got, want, strict=True):
            np.testing.assert_allclose(g, w, atol=2e-4, rtol=1e-4, err_msg=name)


def test_attention_keeps_bfloat16_and_query_shorter_than_keys_is_not_blocked():
    q, k, v, causal, _ = _inputs()
    out = attention(q.astype(jnp.bfloat16), k.astype(jnp.bfloat16), v.astype(jnp.bfloat16), causal, 0.3)
    assert out.dtype == jnp.bfloat16
    grads = jax.grad(lambda q: attention(q, k.astype(jnp.bfloat16), v, causal, 0.3).sum())(
        q.astype(jnp.bfloat16)
    )
    assert grads.dtype == jnp.bfloat16
    # decode-style call (T < S): causal_block is ignored, the result is the plain one
    last = attention(q[:, -3:], k, v, causal[:, -3:], 0.3, causal_block=2)
    np.testing.assert_allclose(last, attention(q, k, v, causal, 0.3)[:, -3:], atol=1e-6)


def test_causal_block_size_bounds_the_block_count():
    assert causal_block_size(256) == 64
    assert causal_block_size(4096) == 256  # 16 blocks
    assert causal_block_size(30) == 64  # short sequences: one block (no blocking)


def test_silu_matches_jax_nn_silu_in_value_and_first_two_derivatives():
    from jrft.models.layers import silu

    x = jnp.linspace(-12.0, 12.0, 97)
    np.testing.assert_allclose(silu(x), jax.nn.silu(x), rtol=1e-6, atol=1e-7)
    first = jax.vmap(jax.grad(silu))(x)
    np.testing.assert_allclose(first, jax.vmap(jax.grad(jax.nn.silu))(x), rtol=1e-5, atol=1e-6)
    second = jax.vmap(jax.grad(jax.grad(silu)))(x)
    np.testing.assert_allclose(second, jax.vmap(jax.grad(jax.grad(jax.nn.silu)))(x), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("plus_one", [False, True])
def test_rms_norm_gradients_match_autodiff_of_the_formula(plus_one):
    from jrft.models.layers import rms_norm

    def plain(x, w):
        x32 = x.astype(jnp.float32)
        normed = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + 1e-6)
        return normed * (1.0 + w) if plus_one else w * normed

    x = jax.random.normal(jax.random.PRNGKey(0), (3, 5, 16)) * 3.0
    w = jax.random.normal(jax.random.PRNGKey(1), (16,))
    up = jax.random.normal(jax.random.PRNGKey(2), (3, 5, 16))
    np.testing.assert_allclose(rms_norm(x, w, 1e-6, plus_one), plain(x, w), rtol=1e-6, atol=1e-6)
    got = jax.grad(lambda x, w: (rms_norm(x, w, 1e-6, plus_one) * up).sum(), (0, 1))(x, w)
    want = jax.grad(lambda x, w: (plain(x, w) * up).sum(), (0, 1))(x, w)
    for g, r in zip(got, want, strict=True):
        np.testing.assert_allclose(g, r, rtol=1e-5, atol=1e-5)
    xb = x.astype(jnp.bfloat16)
    gx, gw = jax.grad(lambda x, w: rms_norm(x, w, 1e-6, plus_one).astype(jnp.float32).sum(), (0, 1))(xb, w)
    assert gx.dtype == jnp.bfloat16 and gw.dtype == jnp.float32
