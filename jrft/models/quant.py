"""int8 storage of a frozen base's projection weights (QLoRA-style, Dettmers et al. 2023, arXiv:2305.14314,
with per-channel symmetric int8 instead of NF4): ``W ~= q * s`` with ``q`` int8 in ``[-127, 127]`` and one
float32 scale per output channel ``s = max |W[:, o]| / 127``, so the error of every weight is at most
``s / 2``. Only the seven projections of the stacked layers are quantized (embeddings, LM head and norms
keep the parameter dtype); the layer body dequantizes one layer's weights at a time inside the scan
(``jrft.models.decoder._cast``), so no float copy of the whole base exists during training.

Shapes: a stacked weight is ``[L, *in, *out]`` (``wq [L, D, H, Dh]``: in = (D,), out = (H, Dh); ``wo [L, H,
Dh, D]``: in = (H, Dh)); its scale is ``[L, *out]`` and broadcasts against one layer's ``[*in, *out]``.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

# The quantizable weights and how many of their dims after ``layers`` are the matmul's input side.
INT8_WEIGHTS = {"wq": 1, "wk": 1, "wv": 1, "wo": 2, "w_gate": 1, "w_up": 1, "w_down": 1}
BASE_QUANTIZATIONS = ("none", "int8")


def quantize_int8(w, n_in: int):
    """``(q int8 [L, *in, *out], scale float32 [L, *out])`` of a stacked weight (numpy or JAX array in,
    the same kind out). A column of zeros gets scale 1 (and stays zero)."""
    xp = jnp if isinstance(w, jax.Array) else np
    w32 = w.astype(xp.float32)
    amax = xp.max(xp.abs(w32), axis=tuple(range(1, 1 + n_in)))  # [L, *out]
    scale = xp.where(amax > 0, amax / 127.0, 1.0).astype(xp.float32)
    expanded = scale.reshape(scale.shape[:1] + (1,) * n_in + scale.shape[1:])
    q = xp.clip(xp.rint(w32 / expanded), -127, 127).astype(xp.int8)
    return q, scale


def dequantize(q: jax.Array, scale: jax.Array, dtype) -> jax.Array:
    """``q * scale`` in ``dtype`` for one layer (``q [*in, *out]``, ``scale [*out]``) or a stack
    (``q [L, *in, *out]``, ``scale [L, *out]``: pass ``n_in`` via :func:`dequantize_stacked`)."""
    return q.astype(dtype) * scale.astype(dtype)


def dequantize_stacked(q: jax.Array, scale: jax.Array, n_in: int, dtype) -> jax.Array:
    """``q [L, *in, *out] * scale [L, *out]`` in ``dtype``: a whole stack (export, the fused sampler copy)."""
    expanded = scale.reshape(scale.shape[:1] + (1,) * n_in + scale.shape[1:])
    return (q.astype(jnp.float32) * expanded.astype(jnp.float32)).astype(dtype)


def scale_axes(axes: tuple, n_in: int) -> tuple:
    """Logical axes of a scale: the weight's without its input dims."""
    return axes[:1] + axes[1 + n_in :]


def int8_counts(cfg) -> tuple[int, int]:
    """``(weights, scales)``: how many base parameters a model of ``cfg`` stores in int8 and how many float32
    scales go with them (for the memory estimate)."""
    L, D, F = cfg.num_layers, cfg.hidden_size, cfg.intermediate_size
    q, kv = cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim
    ins_outs = [(D, q), (D, kv), (D, kv), (q, D), (D, F), (D, F), (F, D)]
    return L * sum(math.prod(io) for io in ins_outs), L * sum(o for _, o in ins_outs)
