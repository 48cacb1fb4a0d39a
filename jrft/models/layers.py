"""Pure building blocks of the decoder: RMSNorm, RoPE, grouped-query attention, gated MLPs, remat policies.

Functions of arrays only (no modules), so the scanned layer body in ``decoder.py`` reads top to bottom.
Letters in shapes: B batch, T query length, S key length, D hidden, H query heads, K kv heads, G = H / K
heads per kv group, Dh head dim, F MLP width.
"""

from __future__ import annotations

import functools
import math
import weakref
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

from jrft.models import kernels
from jrft.models.config import ModelConfig


def rms_norm(x: jax.Array, weight: jax.Array, eps: float, plus_one: bool = False) -> jax.Array:
    """RMSNorm (Zhang & Sennrich 2019), statistics in float32, result in ``x.dtype``.

    ``plus_one`` is Gemma's variant, scaling by ``(1 + w)`` in float32; otherwise Llama's ``w * norm(x)``
    with the weight applied after casting back (as transformers does). ``x [..., D]``, ``weight [D]``.
    The backward pass is written by hand in float32 (same gradients as autodiff's; measured ~3% off the
    25M reference model's grad on XLA:CPU, which otherwise re-derives the statistics in several fusions).
    """
    return _rms_norm(x, weight, eps, plus_one)


def _rms_norm_value(x, weight, eps, plus_one):
    x32 = x.astype(jnp.float32)
    inv_rms = jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + eps)  # [..., 1]
    normed = x32 * inv_rms
    if plus_one:
        return (normed * (1.0 + weight.astype(jnp.float32))).astype(x.dtype), inv_rms
    return weight.astype(x.dtype) * normed.astype(x.dtype), inv_rms


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def _rms_norm(x, weight, eps, plus_one):
    return _rms_norm_value(x, weight, eps, plus_one)[0]


def _rms_norm_fwd(x, weight, eps, plus_one):
    y, inv_rms = _rms_norm_value(x, weight, eps, plus_one)
    return y, (x, weight, inv_rms)


def _rms_norm_bwd(eps, plus_one, residuals, dy):
    x, weight, inv_rms = residuals
    normed = x.astype(jnp.float32) * inv_rms
    dy32 = dy.astype(jnp.float32)
    w32 = weight.astype(jnp.float32)
    d_normed = dy32 * (1.0 + w32 if plus_one else w32)
    dx = inv_rms * (d_normed - normed * jnp.mean(d_normed * normed, axis=-1, keepdims=True))
    dw = jnp.sum((dy32 * normed).reshape(-1, normed.shape[-1]), axis=0).reshape(weight.shape)
    return dx.astype(x.dtype), dw.astype(weight.dtype)


_rms_norm.defvjp(_rms_norm_fwd, _rms_norm_bwd)


# --- RoPE (Su et al. 2021, "RoFormer"), with the frequency schedules transformers names rope_type


def _rope_default(inv_freq: np.ndarray, params: dict) -> np.ndarray:
    return inv_freq


def _rope_linear(inv_freq: np.ndarray, params: dict) -> np.ndarray:
    return inv_freq / params["factor"]


def _rope_llama3(inv_freq: np.ndarray, params: dict) -> np.ndarray:
    """Llama 3.1 frequency scaling: long wavelengths divided by ``factor``, short ones kept, a smooth ramp
    between (Meta's Llama 3.1 release; transformers ``_compute_llama3_parameters``)."""
    factor, low, high = params["factor"], params["low_freq_factor"], params["high_freq_factor"]
    old_len = params["original_max_position_embeddings"]
    wavelen = 2 * math.pi / inv_freq
    scaled = np.where(wavelen > old_len / low, inv_freq / factor, inv_freq)
    smooth = (old_len / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = ~(wavelen < old_len / high) & ~(wavelen > old_len / low)
    return np.where(medium, smoothed, scaled)


def _rope_yarn(inv_freq: np.ndarray, params: dict) -> np.ndarray:
    """YaRN (Peng et al. 2023, arXiv 2309.00071): dimensions that turn fewer than ``beta_slow`` times over
    the original context are interpolated (divided by ``factor``), those that turn more than ``beta_fast``
    times are kept, with a linear ramp between; the matching cos/sin scale is ``rope_attention_factor``."""
    dim = 2 * len(inv_freq)
    base, factor = params["rope_theta"], params["factor"]
    old_len = params["original_max_position_embeddings"]

    def dim_of(rotations: float) -> float:  # the dimension whose wavelength fits `rotations` times in old_len
        return dim * math.log(old_len / (rotations * 2 * math.pi)) / (2 * math.log(base))

    low, high = dim_of(params.get("beta_fast") or 32), dim_of(params.get("beta_slow") or 1)
    if params.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001
    ramp = np.clip((np.arange(dim // 2, dtype=np.float32) - low) / (high - low), 0, 1)  # 1: interpolate
    return inv_freq / factor * ramp + inv_freq * (1 - ramp)


ROPE_SCHEDULES: dict[str, Callable[[np.ndarray, dict], np.ndarray]] = {
    "default": _rope_default,
    "linear": _rope_linear,
    "llama3": _rope_llama3,
    "yarn": _rope_yarn,
}


def rope_attention_factor(config: ModelConfig) -> float:
    """The factor on cos and sin: YaRN's ``attention_factor`` (given, or ``0.1 ln(factor) + 1``, or with
    DeepSeek's ``mscale``/``mscale_all_dim`` the ratio of two such terms); 1 for the other rope types."""
    if config.rope_type != "yarn":
        return 1.0
    params = config.rope_params
    if params.get("attention_factor") is not None:
        return float(params["attention_factor"])

    def mscale(scale: float, m: float = 1.0) -> float:
        return 1.0 if scale <= 1 else 0.1 * m * math.log(scale) + 1.0

    factor = params["factor"]
    if params.get("mscale") and params.get("mscale_all_dim"):
        return mscale(factor, params["mscale"]) / mscale(factor, params["mscale_all_dim"])
    return mscale(factor)


def rope_inv_freq(config: ModelConfig) -> np.ndarray:
    """Inverse frequencies ``[Dh / 2]`` (float32), computed once at trace time."""
    dim = config.head_dim
    inv_freq = 1.0 / (config.rope_theta ** (np.arange(0, dim, 2, dtype=np.float32) / dim))
    params = {**config.rope_params, "rope_theta": config.rope_theta}
    return ROPE_SCHEDULES[config.rope_type](inv_freq.astype(np.float32), params).astype(np.float32)


def rope_cos_sin(
    positions: jax.Array, inv_freq: np.ndarray, dtype, scale: float = 1.0
) -> tuple[jax.Array, jax.Array]:
    """cos, sin ``[B, T, Dh]`` for integer ``positions [B, T]`` (angles in float32, times ``scale`` (see
    ``rope_attention_factor``), then cast)."""
    freqs = positions.astype(jnp.float32)[..., None] * jnp.asarray(inv_freq)  # [B, T, Dh/2]
    emb = jnp.concatenate([freqs, freqs], axis=-1)  # [B, T, Dh]
    cos, sin = jnp.cos(emb), jnp.sin(emb)
    if scale != 1.0:
        cos, sin = cos * scale, sin * scale
    return cos.astype(dtype), sin.astype(dtype)


def apply_rope(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """Rotates ``x [B, T, N, Dh]`` by position (the half-split "rotate_half" layout of transformers)."""
    half = x.shape[-1] // 2
    rotated = jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)
    return x * cos[:, :, None, :] + rotated * sin[:, :, None, :]


# --- attention ----------------------------------------------------------------------------------


def attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    mask: jax.Array,
    scale: float,
    softcap: float | None = None,
    *,
    causal_block: int | None = None,
) -> jax.Array:
    """Grouped-query scaled dot-product attention (Ainslie et al. 2023, GQA).

    Args:
      q: ``[B, T, H, Dh]`` queries.
      k, v: ``[B, K, S, Dh]`` keys and values (the KV-cache layout).
      mask: ``[B, T, S]`` bool, True where query t may attend key s. A row with no True key gives zeros
        (finite, no NaN); such rows are padding and are ignored downstream.
      scale: multiplies the scores (``Dh ** -0.5``).
      softcap: Gemma 2's ``cap * tanh(scores / cap)`` before masking (None: off).
      causal_block: only when T == S and ``mask`` is causal in slots (query t sees no key s > t, as from
        ``causal_mask(valid, slots, slots)``): queries are processed in blocks of this many, each against
        the keys up to its last slot only, which skips the masked upper triangle (about half the work for
        many blocks). The result equals the unblocked one.

    Returns:
      ``[B, T, H, Dh]`` in ``q.dtype``; scores and softmax in float32.

    The backward pass recomputes the softmax from the saved row maxima and sums instead of keeping the
    ``[B, K, G, T, S]`` probabilities (the FlashAttention recipe, Dao et al. 2022, without tiling).
    """
    platform, mesh = kernels.current_platform(q)
    if platform != "cpu":  # the CPU path below is the same whatever happens here
        out = _accelerator_attention(q, k, v, mask, scale, softcap, causal_block is not None, platform, mesh)
        if out is not None:
            return out
    t, s = q.shape[1], k.shape[2]
    if causal_block is None or t != s or t <= causal_block:
        return _attention(q, k, v, mask, scale, softcap)
    outs = []
    for start in range(0, t, causal_block):
        end = min(start + causal_block, t)
        outs.append(
            _attention(
                q[:, start:end], k[:, :, :end], v[:, :, :end], mask[:, start:end, :end], scale, softcap
            )
        )
    return jnp.concatenate(outs, axis=1)


def _accelerator_attention(q, k, v, mask, scale, softcap, full_causal, platform, mesh):
    """Splash (TPU) or cuDNN (GPU) when ``kernels.attention_impl`` picks it, else None (the XLA path)."""
    facts = mask_facts(mask)
    q_shards, kv_shards, q_spec, kv_spec = kernels.head_shards(mesh, q.shape, k.shape)
    choice = kernels.attention_impl(
        platform, q.dtype, q_heads=q.shape[2], kv_heads=k.shape[1], head_dim=q.shape[3], q_len=q.shape[1],
        kv_len=k.shape[2], full_causal=full_causal, segments_known=facts is not None, softcap=softcap,
        head_shards=q_shards, kv_head_shards=kv_shards,
    )  # fmt: skip
    choice = kernels.forced(choice)
    kernels.log_choice(choice, q, k)
    if choice.impl == kernels.SPLASH:
        key_valid, segment_ids = facts
        return kernels.splash_attention(
            q, k, v, key_valid, segment_ids, scale, softcap, mesh=mesh, q_spec=q_spec, kv_spec=kv_spec
        )
    if choice.impl == kernels.CUDNN:
        return kernels.cudnn_attention(q, k, v, mask, scale)
    return None


def causal_block_size(t: int, max_blocks: int = 16, min_block: int = 64) -> int:
    """Query block for ``attention(causal_block=...)`` on a length-``t`` sequence: at most ``max_blocks``
    blocks (bounded compile size), none shorter than ``min_block`` (matmuls stay large)."""
    return max(min_block, -(-t // max_blocks))


def _grouped_scores(q: jax.Array, k: jax.Array, scale: float) -> tuple[jax.Array, jax.Array]:
    """``(qg [B, T, K, G, Dh], scale * q.k [B, K, G, T, S] float32)``."""
    b, t, h, dh = q.shape
    kv = k.shape[1]
    qg = q.reshape(b, t, kv, h // kv, dh)
    return qg, jnp.einsum("btkgd,bksd->bkgts", qg, k, preferred_element_type=jnp.float32) * scale


def _capped_masked_scores(
    raw: jax.Array, mask: jax.Array, softcap: float | None
) -> tuple[jax.Array, jax.Array, jax.Array | None]:
    """``(scores, allowed [B, 1, 1, T, S], tanh or None)``: soft-capped scores, float32 min at masked keys."""
    th = None
    if softcap is not None:
        th = jnp.tanh(raw / softcap)
        raw = softcap * th
    allowed = mask[:, None, None, :, :]
    return jnp.where(allowed, raw, jnp.finfo(jnp.float32).min), allowed, th


def _masked_probs(
    raw: jax.Array, mask: jax.Array, softcap: float | None
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Softmax of the (soft-capped) scores over allowed keys: ``(probs, row_max, row_sum)``; probs are 0 at
    masked keys (a row with no allowed key is all 0)."""
    scores, allowed, _ = _capped_masked_scores(raw, mask, softcap)
    row_max = jnp.max(scores, axis=-1, keepdims=True)
    exp = jnp.exp(scores - row_max)
    row_sum = jnp.sum(exp, axis=-1, keepdims=True)
    return jnp.where(allowed, exp / row_sum, 0.0), row_max, row_sum


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5))
def _attention(q, k, v, mask, scale, softcap):
    return _attention_fwd(q, k, v, mask, scale, softcap)[0]


def _attention_fwd(q, k, v, mask, scale, softcap):
    b, t, h, dh = q.shape
    _, raw = _grouped_scores(q, k, scale)
    probs, row_max, row_sum = _masked_probs(raw, mask, softcap)
    out = jnp.einsum("bkgts,bksd->btkgd", probs.astype(v.dtype), v).reshape(b, t, h, dh)
    return out, (q, k, v, mask, out, row_max, row_sum)


def _attention_bwd(scale, softcap, residuals, d_out):
    q, k, v, mask, out, row_max, row_sum = residuals
    qg, raw = _grouped_scores(q, k, scale)
    scores, allowed, th = _capped_masked_scores(raw, mask, softcap)
    f32 = jnp.float32
    probs = jnp.where(allowed, jnp.exp(scores - row_max) / row_sum, 0.0)  # the forward's softmax, recomputed
    do = d_out.reshape(qg.shape)  # [B, T, K, G, Dh]
    dv = jnp.einsum("bkgts,btkgd->bksd", probs, do, preferred_element_type=f32)
    dp = jnp.einsum("btkgd,bksd->bkgts", do, v, preferred_element_type=f32)
    row_dot = jnp.einsum("btkgd,btkgd->bkgt", do.astype(f32), out.reshape(qg.shape).astype(f32))
    ds = probs * (dp - row_dot[..., None])  # softmax backward; 0 at masked keys
    if th is not None:
        ds = ds * (1.0 - th * th)
    ds = ds * scale
    dq = jnp.einsum("bkgts,bksd->btkgd", ds, k, preferred_element_type=f32).reshape(q.shape)
    dk = jnp.einsum("bkgts,btkgd->bksd", ds, qg, preferred_element_type=f32)
    return dq.astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype), None


_attention.defvjp(_attention_fwd, _attention_bwd)


def causal_mask(
    key_valid: jax.Array, query_slots: jax.Array, key_slots: jax.Array, segment_ids: jax.Array | None = None
) -> jax.Array:
    """``[B, T, S]`` bool: key slot <= query slot, the key is a real token, and (if given) same segment.

    Args:
      key_valid: ``[B, S]`` 0/1 (or bool) — which key slots hold real tokens.
      query_slots: ``[T]`` or ``[B, T]`` int — the slot (position in the key sequence) of each query.
      key_slots: ``[S]`` int.
      segment_ids: ``[B, T]`` ints (only when T == S, for packed sequences).
    """
    qs = query_slots if query_slots.ndim == 2 else query_slots[None, :]
    mask = key_slots[None, None, :] <= qs[:, :, None]  # [B or 1, T, S]
    mask = mask & key_valid.astype(bool)[:, None, :]
    if segment_ids is not None:
        mask = mask & (segment_ids[:, :, None] == segment_ids[:, None, :])
    if query_slots is key_slots and query_slots.ndim == 1:  # self-attention over one sequence
        _remember_mask_facts(mask, key_valid, segment_ids)
    return mask


# A kernel takes key validity and segment ids, not a dense mask. ``causal_mask`` remembers them for the mask
# object it returns (a trace-time fact keyed by identity, dropped with the mask); a mask derived from it
# (a sliding-window one, a slice) is another object, so it has none and gets the XLA path.
_MASK_FACTS: dict[int, tuple] = {}


def _remember_mask_facts(mask, key_valid, segment_ids) -> None:
    try:
        ref = weakref.ref(mask, lambda _, key=id(mask): _MASK_FACTS.pop(key, None))
    except TypeError:  # not weak-referenceable: no facts, the XLA path
        return
    _MASK_FACTS[id(mask)] = (ref, key_valid, segment_ids)


def mask_facts(mask) -> tuple[jax.Array, jax.Array | None] | None:
    """``(key_valid [B, S], segment_ids [B, T] or None)`` if ``mask`` is exactly what ``causal_mask`` returned
    for self-attention (one slot array, increasing, for queries and keys: ``Decoder.hidden``), else None."""
    entry = _MASK_FACTS.get(id(mask))
    if entry is None or entry[0]() is not mask:
        return None
    return entry[1], entry[2]


def window_mask(
    mask: jax.Array, query_slots: jax.Array, key_slots: jax.Array, window: int | None
) -> jax.Array | None:
    """``mask`` restricted to keys fewer than ``window`` slots back (sliding-window attention), or None."""
    if window is None:
        return None
    qs = query_slots if query_slots.ndim == 2 else query_slots[None, :]
    return mask & (qs[:, :, None] - key_slots[None, None, :] < window)


# --- gated MLPs: SwiGLU (Shazeer 2020, "GLU Variants Improve Transformer") and GeGLU ------------


@jax.custom_jvp
def silu(x: jax.Array) -> jax.Array:
    """``x * sigmoid(x)`` (as ``jax.nn.silu``) with a hand-written derivative ``s * (1 + x * (1 - s))``.

    Same values and gradients as ``jax.nn.silu``; the explicit rule keeps XLA:CPU from re-deriving the
    sigmoid in several backward fusions (measured: grad of the 25M reference model, 16 x 256 tokens,
    2.55 -> 2.45 s).
    """
    return x * jax.nn.sigmoid(x)


@silu.defjvp
def _silu_jvp(primals, tangents):
    (x,), (dx,) = primals, tangents
    s = jax.nn.sigmoid(x)
    return x * s, dx * (s * (1 + x * (1 - s)))


ACTIVATIONS: dict[str, Callable[[jax.Array], jax.Array]] = {
    "silu": silu,
    "gelu_pytorch_tanh": lambda x: jax.nn.gelu(x, approximate=True),
}


# --- remat (activation checkpointing) policies for the scanned layer body -----------------------
# Tagged tensors (``checkpoint_name``): "query", "key", "value" (after RoPE), "attn_out" (before the output
# projection), "mlp_hidden" (activation(gate) * up).

REMAT_POLICIES: dict[str, Callable | None] = {
    # keep everything (no recomputation; most memory)
    "none": None,
    # keep only the layer input; recompute the whole layer in the backward pass (least memory)
    "full": jax.checkpoint_policies.nothing_saveable,
    # keep matmul outputs, recompute elementwise ops (norms, rope, softmax, activations)
    "dots_saveable": jax.checkpoint_policies.dots_saveable,
    # keep matmul outputs without batch dims (the projections), recompute attention scores
    "dots_no_batch": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
    # keep only the attention output: recompute projections and the MLP
    "save_attn_out": jax.checkpoint_policies.save_only_these_names("attn_out"),
    # keep q/k/v and the attention output: recompute only the MLP
    "save_qkv_attn_out": jax.checkpoint_policies.save_only_these_names("query", "key", "value", "attn_out"),
}


def remat(fn: Callable, policy: str) -> Callable:
    """Wraps ``fn`` in ``jax.checkpoint`` with the named policy (``"none"`` returns ``fn``)."""
    if policy not in REMAT_POLICIES:
        raise ValueError(f"remat policy {policy!r} unknown; choose one of {sorted(REMAT_POLICIES)}")
    if policy == "none":
        return fn
    return jax.checkpoint(fn, policy=REMAT_POLICIES[policy], prevent_cse=False)
