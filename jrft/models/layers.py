"""Pure building blocks of the decoder: RMSNorm, RoPE, grouped-query attention, gated MLPs, remat policies.

Functions of arrays only (no modules), so the scanned layer body in ``decoder.py`` reads top to bottom.
Letters in shapes: B batch, T query length, S key length, D hidden, H query heads, K kv heads, G = H / K
heads per kv group, Dh head dim, F MLP width.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

from jrft.models.config import ModelConfig


def rms_norm(x: jax.Array, weight: jax.Array, eps: float, plus_one: bool = False) -> jax.Array:
    """RMSNorm (Zhang & Sennrich 2019), statistics in float32, result in ``x.dtype``.

    ``plus_one`` is Gemma's variant, scaling by ``(1 + w)`` in float32; otherwise Llama's ``w * norm(x)``
    with the weight applied after casting back (as transformers does).
    """
    x32 = x.astype(jnp.float32)
    normed = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + eps)
    if plus_one:
        return (normed * (1.0 + weight.astype(jnp.float32))).astype(x.dtype)
    return weight.astype(x.dtype) * normed.astype(x.dtype)


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


ROPE_SCHEDULES: dict[str, Callable[[np.ndarray, dict], np.ndarray]] = {
    "default": _rope_default,
    "linear": _rope_linear,
    "llama3": _rope_llama3,
}


def rope_inv_freq(config: ModelConfig) -> np.ndarray:
    """Inverse frequencies ``[Dh / 2]`` (float32), computed once at trace time."""
    dim = config.head_dim
    inv_freq = 1.0 / (config.rope_theta ** (np.arange(0, dim, 2, dtype=np.float32) / dim))
    return ROPE_SCHEDULES[config.rope_type](inv_freq.astype(np.float32), config.rope_params).astype(
        np.float32
    )


def rope_cos_sin(positions: jax.Array, inv_freq: np.ndarray, dtype) -> tuple[jax.Array, jax.Array]:
    """cos, sin ``[B, T, Dh]`` for integer ``positions [B, T]`` (angles in float32, then cast)."""
    freqs = positions.astype(jnp.float32)[..., None] * jnp.asarray(inv_freq)  # [B, T, Dh/2]
    emb = jnp.concatenate([freqs, freqs], axis=-1)  # [B, T, Dh]
    return jnp.cos(emb).astype(dtype), jnp.sin(emb).astype(dtype)


def apply_rope(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """Rotates ``x [B, T, N, Dh]`` by position (the half-split "rotate_half" layout of transformers)."""
    half = x.shape[-1] // 2
    rotated = jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)
    return x * cos[:, :, None, :] + rotated * sin[:, :, None, :]


# --- attention ----------------------------------------------------------------------------------


def attention(
    q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array, scale: float, softcap: float | None = None
) -> jax.Array:
    """Grouped-query scaled dot-product attention (Ainslie et al. 2023, GQA).

    Args:
      q: ``[B, T, H, Dh]`` queries.
      k, v: ``[B, K, S, Dh]`` keys and values (the KV-cache layout).
      mask: ``[B, T, S]`` bool, True where query t may attend key s. A row with no True key gets uniform
        weights (finite, no NaN); such rows are padding and are ignored downstream.
      scale: multiplies the scores (``Dh ** -0.5``).
      softcap: Gemma 2's ``cap * tanh(scores / cap)`` before masking (None: off).

    Returns:
      ``[B, T, H, Dh]`` in ``q.dtype``; scores and softmax in float32.
    """
    b, t, h, dh = q.shape
    kv = k.shape[1]
    qg = q.reshape(b, t, kv, h // kv, dh)  # [B, T, K, G, Dh]
    scores = jnp.einsum("btkgd,bksd->bkgts", qg, k, preferred_element_type=jnp.float32) * scale
    if softcap is not None:
        scores = softcap * jnp.tanh(scores / softcap)
    scores = jnp.where(mask[:, None, None, :, :], scores, jnp.finfo(jnp.float32).min)  # [B, K, G, T, S]
    probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
    out = jnp.einsum("bkgts,bksd->btkgd", probs, v)  # [B, T, K, G, Dh]
    return out.reshape(b, t, h, dh)


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
    return mask


def window_mask(
    mask: jax.Array, query_slots: jax.Array, key_slots: jax.Array, window: int | None
) -> jax.Array | None:
    """``mask`` restricted to keys fewer than ``window`` slots back (sliding-window attention), or None."""
    if window is None:
        return None
    qs = query_slots if query_slots.ndim == 2 else query_slots[None, :]
    return mask & (qs[:, :, None] - key_slots[None, None, :] < window)


# --- gated MLPs: SwiGLU (Shazeer 2020, "GLU Variants Improve Transformer") and GeGLU ------------

ACTIVATIONS: dict[str, Callable[[jax.Array], jax.Array]] = {
    "silu": jax.nn.silu,
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
