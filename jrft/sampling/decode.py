"""Prefill and one decode step over a preallocated KV cache: pure functions of a merged ``Decoder``.

``prefill`` runs the prompt through ``Decoder.forward_with_cache`` (the model's own cache forward). The
decode step is written here rather than calling ``forward_with_cache`` once per token, because a decode step
on CPU is dominated by per-op overhead, not FLOPs (see shared/NOTES.md), and three things make it leaner:

* fused projections — q, k and v come from ONE matmul against ``[D, (H + 2K) * Dh]`` and gate/up from ONE
  matmul against ``[D, 2F]``; the fused weights are concatenated once per ``generate`` call, outside the loop
  (``fuse_decode_weights``; a transient copy of those weights, freed when generation ends);
* 2-D activations ``[B, D]`` throughout (a decode step has T = 1);
* attention reads only the filled bucket of the cache (``decode_step``: the first ``s_att`` slots of the
  stacked cache; ``decode_step_unrolled``: whole per-layer arrays that the caller grows bucket by bucket;
  ``ranged_decode_step``, on TPU: a Pallas kernel that fetches only the blocks of each row's valid slots
  from one preallocated cache).

It uses the model's own building blocks (``rms_norm``, RoPE frequencies, embedding, final norm, LM head) and
its stacked parameters by name (``Decoder.layers``: ``wq, wk, wv, wo, w_gate, w_up, w_down, attn_norm,
mlp_norm`` and optional ``bq, bk, bv, bo, q_norm, k_norm``), so it follows the model's variants (Qwen2
biases, Qwen3 q/k norms, Gemma embedding scale and (1 + w) norms; Gemma 2's post-branch norms, query scale,
attention and final logit soft-capping and sliding-window layers). Tests check it against transformers token
for token.

Shapes: B rows, D hidden, H query heads, K kv heads, G = H / K, Dh head dim, F MLP width, L layers,
S cache slots, V vocab. Cache layout ``[L, B, K, S, Dh]`` (``jrft.models.KVCache``).
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp

from jrft.models.decoder import CACHE_AXES, KVCache, post_norm
from jrft.models.layers import (
    ACTIVATIONS,
    rms_norm,
    rope_attention_factor,
    rope_cos_sin,
    rope_inv_freq,
    window_mask,
)
from jrft.models.lora import merged_layer_arrays
from jrft.models.quant import dequantize, is_quantized
from jrft.parallel.sharding import logical_to_spec, with_logical_constraint


def prefill(model, tokens: jax.Array, mask: jax.Array, cache: KVCache) -> tuple[jax.Array, KVCache]:
    """Runs left-padded prompts ``tokens [B, Tp]`` (``mask [B, Tp]`` 0/1) into cache slots ``[0, Tp)``.

    Position ids are ``cumsum(mask) - 1`` (transformers' convention for left padding). Returns the float32
    logits of the last slot ``[B, V]`` (the next-token distribution of every prompt) and the filled cache.
    """
    positions = jnp.maximum(jnp.cumsum(mask.astype(jnp.int32), axis=-1) - 1, 0)
    logits, cache = model.forward_with_cache(tokens, positions, cache, 0, mask, last_only=True)
    return logits[:, 0], cache


def fuse_decode_weights(model, fuse: bool = True) -> dict[str, jax.Array]:
    """The stacked layer weights in the decode step's layout, cast to the compute dtype.

    With ``fuse``: ``wqkv [L, D, (H + 2K) * Dh]`` (and ``bqkv``), ``w_gate_up [L, D, 2F]``; otherwise the
    projections are kept separate (``wq [L, D, H*Dh]`` ...), which avoids the transient copy. A model with
    LoRA adapters decodes with its current adapters: fused, they are merged into the fused copy
    (``W + scale * A B``); unfused, they are applied beside the untouched weights (``lora_<w>_a [L, in, r]``,
    ``lora_<w>_b [L, r, out]`` scaled), so no weight is copied.
    """
    cfg = model.config
    # fused: the copy is made anyway, so the adapters are merged into it; unfused: they stay separate
    p = merged_layer_arrays(model) if fuse else model.layers.arrays(cfg)
    L, D = cfg.num_layers, cfg.hidden_size
    dtype = model.dtype

    def cast(x):  # a quantized base (unfused) stays as stored, dequantized per layer in _mm, scales beside
        return x if is_quantized(x) else x.astype(dtype)

    # norms stay in param dtype, like the model (fused: merged_layer_arrays dequantized a quantized base)
    out = {k: v for k, v in p.items() if k.endswith("norm")}
    # [L, in, out] (reshaped by out: nf4 codes hold in / 2 rows)
    flat = {k: cast(p[k].reshape(L, -1, p[k].shape[-2] * p[k].shape[-1])) for k in ("wq", "wk", "wv")}
    if fuse:
        out["wqkv"] = jnp.concatenate([flat["wq"], flat["wk"], flat["wv"]], axis=-1)
        out["w_gate_up"] = jnp.concatenate([p["w_gate"], p["w_up"]], axis=-1).astype(dtype)
    else:
        out.update(flat)
        out["w_gate"], out["w_up"] = cast(p["w_gate"]), cast(p["w_up"])
    if cfg.qkv_bias:
        biases = [p[k].reshape(L, -1).astype(dtype) for k in ("bq", "bk", "bv")]
        if fuse:
            out["bqkv"] = jnp.concatenate(biases, axis=-1)
        else:
            out["bq"], out["bk"], out["bv"] = biases
    out["wo"] = cast(p["wo"].reshape(L, -1, D))  # [L, H*Dh, D]
    out["w_down"] = cast(p["w_down"])
    if cfg.o_bias:
        out["bo"] = p["bo"].astype(dtype)
    if not fuse and getattr(model, "lora", None) is not None:
        for w, (a, b) in model.lora.arrays(dtype).items():
            out[f"lora_{w}_a"], out[f"lora_{w}_b"] = a, b
    for w in (k for k in p if k.endswith("_scale")):  # a quantized base, unfused
        n_out = out[w.removesuffix("_scale")].shape[-1]
        out[w] = p[w].reshape(L, -1, n_out).astype(dtype)  # [L, blocks, out] (int8: one block)
    return out


def _mm(p, h: jax.Array, w: str) -> jax.Array:
    """``h [B, in] @ p[w]`` (a quantized weight dequantized here, one layer's at a time) plus the unmerged
    LoRA path ``(h A)(scale B)`` when ``p`` carries one."""
    if f"{w}_scale" in p and p[w].dtype == jnp.int8:  # cast here, scale per output channel: (h q) s = h (q s)
        y = (h @ p[w].astype(h.dtype)) * p[f"{w}_scale"]  # scale [1, out]
    elif f"{w}_scale" in p:  # nf4: codes [in / 2, out], scale [blocks, out]
        y = h @ dequantize(p[w], p[f"{w}_scale"], 1, h.dtype)
    else:
        y = h @ p[w]
    a = p.get(f"lora_{w}_a")
    return y if a is None else y + (h @ a) @ p[f"lora_{w}_b"]


def _rope_1(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """RoPE for one position per row: ``x [B, N, Dh]``, ``cos/sin [B, 1, Dh]`` (rotate_half layout)."""
    half = x.shape[-1] // 2
    return x * cos + jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1) * sin


def _rope_cos_sin_1(cfg, positions: jax.Array, dtype) -> tuple[jax.Array, jax.Array]:
    """cos, sin ``[B, 1, Dh]`` for one position per row (angles in float32, as the model computes them)."""
    return rope_cos_sin(positions[:, None], rope_inv_freq(cfg), dtype, rope_attention_factor(cfg))


def _key_biases(cfg, key_valid: jax.Array, slot: jax.Array) -> tuple[jax.Array, jax.Array | None]:
    """Additive score biases ``[B, 1, 1, S]`` (0 or float32 min) for full-attention layers and, when the
    model has sliding-window layers, for those (keys fewer than ``sliding_window`` slots before ``slot``)."""
    neg = jnp.finfo(jnp.float32).min
    full = jnp.where(key_valid, 0.0, neg)[:, None, None, :]
    if cfg.sliding_window is None:
        return full, None
    key_slots = jnp.arange(key_valid.shape[1], dtype=jnp.int32)
    near = window_mask(
        key_valid.astype(bool)[:, None, :], slot[None], key_slots, cfg.sliding_window
    )  # [B, 1, S]
    return full, jnp.where(near, 0.0, neg)[:, None, :, :]


def _attend_1(cfg, p, q: jax.Array, k: jax.Array, v: jax.Array, bias: jax.Array) -> jax.Array:
    """One query per row against its cache, then the output projection: ``q [B, H, Dh]``, ``k, v
    [B, K, S, Dh]``, ``bias [B, 1, 1, S]`` (0 or float32 min) -> ``[B, D]``. Scores and softmax in float32;
    the model's query scale and (Gemma 2) score soft-capping before the bias."""
    b, h_, dh = q.shape
    k_ = k.shape[1]
    qg = q.reshape(b, k_, h_ // k_, dh)  # [B, K, G, Dh]
    scores = jnp.einsum("bkgd,bksd->bkgs", qg, k, preferred_element_type=jnp.float32) * cfg.attn_scale
    if cfg.attn_softcap is not None:
        scores = cfg.attn_softcap * jnp.tanh(scores / cfg.attn_softcap)
    probs = jax.nn.softmax(scores + bias, axis=-1).astype(v.dtype)  # [B, K, G, S]
    return _out_proj(cfg, p, jnp.einsum("bkgs,bksd->bkgd", probs, v).reshape(b, h_ * dh))


def _out_proj(cfg, p, attn: jax.Array) -> jax.Array:
    """The attention output projection: ``attn [B, H*Dh]`` -> ``[B, D]``."""
    y = _mm(p, attn, "wo")  # [B, D]
    return y + p["bo"] if cfg.o_bias else y


def _project_qkv(cfg, p, h):
    """``h [B, D]`` -> q ``[B, H*Dh]``, k, v ``[B, K*Dh]``."""
    hq, hk = cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim
    if "wqkv" in p:
        qkv = h @ p["wqkv"]  # [B, (H + 2K) * Dh]
        if cfg.qkv_bias:
            qkv = qkv + p["bqkv"]
        return qkv[:, :hq], qkv[:, hq : hq + hk], qkv[:, hq + hk :]
    q, k, v = _mm(p, h, "wq"), _mm(p, h, "wk"), _mm(p, h, "wv")
    if cfg.qkv_bias:
        q, k, v = q + p["bq"], k + p["bk"], v + p["bv"]
    return q, k, v


def _gated_mlp(cfg, p, h):
    """``h [B, D]`` -> ``act(h W_gate) * (h W_up)`` ``[B, F]``."""
    act = ACTIVATIONS[cfg.hidden_act]
    if "w_gate_up" in p:
        gu = h @ p["w_gate_up"]  # [B, 2F]
        f = cfg.intermediate_size
        return act(gu[:, :f]) * gu[:, f:]
    return act(_mm(p, h, "w_gate")) * _mm(p, h, "w_up")


def _position_qkv(cfg, p, x: jax.Array, cos: jax.Array, sin: jax.Array):
    """A layer's attention inputs for one position per row: ``x [B, D]`` -> (attention norm, projection,
    optional q/k norm, RoPE) q ``[B, H, Dh]``, k, v ``[B, K, Dh]``."""
    b, eps = x.shape[0], cfg.rms_norm_eps
    h_, k_, dh = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
    q, k, v = _project_qkv(cfg, p, rms_norm(x, p["attn_norm"], eps, cfg.norm_plus_one))
    q, k, v = q.reshape(b, h_, dh), k.reshape(b, k_, dh), v.reshape(b, k_, dh)  # [B, H | K, Dh]
    if cfg.qk_norm:
        q, k = rms_norm(q, p["q_norm"], eps), rms_norm(k, p["k_norm"], eps)
    return _rope_1(q, cos, sin), _rope_1(k, cos, sin), v


def _mlp_residual(cfg, p, x: jax.Array) -> jax.Array:
    """``x [B, D]`` plus the layer's MLP branch (pre-norm, gated MLP, down projection, optional post-norm)."""
    h = rms_norm(x, p["mlp_norm"], cfg.rms_norm_eps, cfg.norm_plus_one)
    return x + post_norm(cfg, p, "post_mlp_norm", _mm(p, _gated_mlp(cfg, p, h), "w_down"))


def _write_position(ck: jax.Array, cv: jax.Array, k: jax.Array, v: jax.Array, start: tuple):
    """The caches ``ck, cv`` (stacked ``[L, B, K, S, Dh]`` or one layer's ``[B, K, S, Dh]``) with one
    position's ``k, v [B, K, Dh]`` written at the cache index ``start`` (in place in a loop carry)."""

    def put(cache, x):
        x = jnp.expand_dims(x, (*range(cache.ndim - 4), -2))  # [1, B, K, 1, Dh] or [B, K, 1, Dh]
        return jax.lax.dynamic_update_slice(cache, x.astype(cache.dtype), start)

    return put(ck, k), put(cv, v)


def _next_logits(model, x: jax.Array) -> jax.Array:
    """The last layer's output ``x [B, D]`` -> float32 next-token logits ``[B, V]`` (final norm, LM head)."""
    return model.logits_from_hidden(model._final(x)[:, None])[:, 0]


def _scan_layers(
    model, weights, tokens, positions, cache: KVCache, slot, attend
) -> tuple[jax.Array, KVCache]:
    """One token per row through the stacked layers, the stacked ``cache`` in the scan's carry: per layer the
    attention inputs (``_position_qkv``), the new k/v written at ``slot``, the attention branch
    ``attend(p, q, ck, cv, i, sliding) -> [B, D]`` (layer ``i``'s weights ``p``, ``q [B, H, Dh]``, the
    whole cache; output projection included, post-norm not), then the MLP. Arguments as in ``decode_step``.
    Returns float32 next-token logits ``[B, V]`` and the updated cache."""
    cfg = model.config
    cos, sin = _rope_cos_sin_1(cfg, positions, model.dtype)
    zero = jnp.zeros((), jnp.int32)

    def layer(carry, xs):
        x, ck, cv = carry
        p, i, sliding = xs
        q, k, v = _position_qkv(cfg, p, x, cos, sin)
        ck, cv = _write_position(ck, cv, k, v, (i, zero, zero, slot, zero))
        x = x + post_norm(cfg, p, "post_attn_norm", attend(p, q, ck, cv, i, sliding))
        x = _mlp_residual(cfg, p, x)
        return (x, ck, cv), None

    x = model._embed(tokens[:, None])[:, 0]  # [B, D]
    ck = with_logical_constraint(cache.k, CACHE_AXES)
    cv = with_logical_constraint(cache.v, CACHE_AXES)
    sliding_flags = jnp.asarray(cfg.sliding_layers or (False,) * cfg.num_layers)
    xs = (weights, jnp.arange(cfg.num_layers, dtype=jnp.int32), sliding_flags)
    (x, ck, cv), _ = jax.lax.scan(layer, (x, ck, cv), xs)
    return _next_logits(model, x), KVCache(ck, cv)


def decode_step(
    model,
    weights: dict[str, jax.Array],
    tokens: jax.Array,
    positions: jax.Array,
    cache: KVCache,
    slot: jax.Array,
    key_valid: jax.Array,
) -> tuple[jax.Array, KVCache]:
    """One token per row through every layer, its k/v written at cache ``slot``.

    Args:
      model: the merged ``Decoder`` (embedding, final norm, LM head, config, dtype).
      weights: ``fuse_decode_weights(model)``.
      tokens: ``[B]`` int32, the last sampled token of each row.
      positions: ``[B]`` int32 position ids of those tokens.
      cache: ``[L, B, K, S, Dh]`` keys/values; kept in the caller's loop carry and updated in place.
      slot: scalar int32, the cache slot written (the same for every row: rows are left-padded).
      key_valid: ``[B, s_att]`` bool over the attended slots ``[0, s_att)`` (static ``s_att > slot``): real
        prompt tokens and generated slots ``<= slot``.

    Returns:
      float32 next-token logits ``[B, V]`` and the updated cache.
    """
    cfg = model.config
    dt = model.dtype
    b, s_att = key_valid.shape
    k_, dh = cfg.num_kv_heads, cfg.head_dim
    bias_full, bias_sliding = _key_biases(cfg, key_valid, slot)  # [B, 1, 1, s_att]
    zero = jnp.zeros((), jnp.int32)

    def attend(p, q, ck, cv, i, sliding):  # the first s_att slots of layer i
        bias = bias_full if bias_sliding is None else jnp.where(sliding, bias_sliding, bias_full)
        k_att = jax.lax.dynamic_slice(ck, (i, zero, zero, zero, zero), (1, b, k_, s_att, dh))[0].astype(dt)
        v_att = jax.lax.dynamic_slice(cv, (i, zero, zero, zero, zero), (1, b, k_, s_att, dh))[0].astype(dt)
        return _attend_1(cfg, p, q, k_att, v_att, bias)

    return _scan_layers(model, weights, tokens, positions, cache, slot, attend)


def ranged_decode_step(
    model, weights: dict[str, jax.Array], first_slot: jax.Array, *, block: int, interpret: bool = False
) -> Callable[..., tuple[jax.Array, KVCache]]:
    """``decode_step`` whose attention is the ragged decode kernel (``ragged_decode_attention``, per shard
    under the abstract mesh), for one decode loop: ``step(tokens, positions, cache, slot) -> (logits, cache)``
    reads, in each row, only the cache blocks of its valid slots ``[first_slot, slot]`` (sliding-window
    layers: from ``slot - sliding_window + 1`` at the earliest), whatever the cache's allocated length, and
    no per-layer slice of the cache is materialised (the kernel takes the layer index).

    Args:
      model, weights: as in ``decode_step``.
      first_slot: ``[B]`` int32, each row's first real prompt slot (rows are left-padded).
      block, interpret: the kernel's slots per grid step; Pallas interpret mode (CPU tests).

    The step's ``tokens``, ``positions`` are as in ``decode_step``; ``cache`` is ``[L, B, K, S, Dh]`` with
    ``S`` a multiple of ``block``, in the caller's loop carry; ``slot`` the slot written (the last valid one
    of every row). It returns float32 next-token logits ``[B, V]`` and the updated cache.
    """
    from jrft.models.ragged_decode import ragged_decode_attention  # Pallas TPU: imported when used

    cfg = model.config
    k_, dh = cfg.num_kv_heads, cfg.head_dim
    g = cfg.num_heads // k_

    def step(tokens: jax.Array, positions: jax.Array, cache: KVCache, slot: jax.Array):
        b = tokens.shape[0]
        ends = jnp.broadcast_to(slot, (b,)).astype(jnp.int32)
        if cfg.sliding_window is None:
            near = first_slot
        else:  # keys fewer than sliding_window slots back (layers.window_mask)
            near = jnp.maximum(first_slot, slot - cfg.sliding_window + 1)
        mesh = jax.sharding.get_abstract_mesh()
        kv_spec = None if mesh.empty else logical_to_spec(CACHE_AXES, cache.k.shape, mesh)

        def attend(p, q, ck, cv, i, sliding):
            starts = jnp.where(sliding, near, first_slot)
            attn = ragged_decode_attention(
                q.reshape(b, k_, g, dh), ck, cv, i, starts, ends, cfg.attn_scale, cfg.attn_softcap,
                mesh=mesh, kv_spec=kv_spec, block=block, interpret=interpret,
            )  # fmt: skip  # [B, K, G, Dh]
            return _out_proj(cfg, p, attn.reshape(b, -1))

        return _scan_layers(model, weights, tokens, positions, cache, slot, attend)

    return step


# --- unrolled layers over per-layer weights and caches (the CPU fast path) ----------------------------------


def split_layers(weights: dict[str, jax.Array], num_layers: int) -> list[dict[str, jax.Array]]:
    """``fuse_decode_weights``' stacked arrays as one dict per layer (static slices, done once outside the
    decode loop: slicing a stacked weight inside the loop copied it every layer of every step)."""
    return [{k: v[i] for k, v in weights.items()} for i in range(num_layers)]


def decode_step_unrolled(
    model,
    layers: list[dict[str, jax.Array]],
    tokens: jax.Array,
    positions: jax.Array,
    ks: tuple[jax.Array, ...],
    vs: tuple[jax.Array, ...],
    slot: jax.Array,
    key_valid: jax.Array,
):
    """``decode_step`` with the layers unrolled over per-layer weights ``layers`` and per-layer caches
    ``ks, vs`` (each ``[B, K, S, Dh]``); attention reads each whole cache array (``key_valid [B, S]``, True at
    ``slot``), so callers size the caches to the attended bucket rather than slicing them.

    Returns float32 logits ``[B, V]`` and the updated ``ks, vs``.
    """
    cfg = model.config
    dt = model.dtype
    cos, sin = _rope_cos_sin_1(cfg, positions, dt)
    bias_full, bias_sliding = _key_biases(cfg, key_valid, slot)  # [B, 1, 1, S]
    sliding_flags = cfg.sliding_layers or (False,) * cfg.num_layers
    zero = jnp.zeros((), jnp.int32)
    x = model._embed(tokens[:, None])[:, 0]  # [B, D]
    new_ks, new_vs = [], []
    for p, ck, cv, sliding in zip(layers, ks, vs, sliding_flags, strict=True):
        bias = bias_sliding if sliding and bias_sliding is not None else bias_full
        q, k, v = _position_qkv(cfg, p, x, cos, sin)
        # write first, then read: with region-analysis copy insertion XLA:CPU updates the carry in place
        ck, cv = _write_position(ck, cv, k, v, (zero, zero, slot, zero))
        new_ks.append(ck)
        new_vs.append(cv)
        x = x + post_norm(cfg, p, "post_attn_norm", _attend_1(cfg, p, q, ck.astype(dt), cv.astype(dt), bias))
        x = _mlp_residual(cfg, p, x)
    return _next_logits(model, x), tuple(new_ks), tuple(new_vs)
