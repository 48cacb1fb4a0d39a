"""Quantized storage of a frozen base's projection weights (QLoRA, Dettmers et al. 2023, arXiv:2305.14314).

Two formats, each a pair of small named functions in :data:`FORMATS` (``quantize`` a stack, ``dequantize``
one layer); the storage dtype of the codes tells them apart (int8 or uint8), so a layer's weights dict needs
no other tag:

* ``int8``: per-channel symmetric int8, ``W ~= q * s`` with ``q`` in ``[-127, 127]`` and one float32 scale per
  output channel ``s = max |W[:, o]| / 127``; the error of every weight is at most ``s / 2``.
* ``nf4``: QLoRA's 4-bit NormalFloat: each block of :data:`NF4_BLOCK` consecutive input-dimension values of
  an output channel has a float32 absmax ``m``; a weight is stored as the index of the code value
  (:data:`NF4_CODES`) nearest to ``w / m``, two 4-bit indices per uint8 byte (even input row in the low
  nibble, odd row in the high one). The error of a weight is at most half the gap between the two code
  values around ``w / m``, times ``m``. Double quantization (the paper's 8-bit scales) is not built.

Only the seven projections of the stacked layers are quantized (embeddings, LM head and norms keep the
parameter dtype); the layer body dequantizes one layer's weights at a time inside the scan
(``jrft.models.decoder._cast``), so no float copy of the whole base exists during training.

Shapes: a stacked weight is ``[L, *in, *out]`` (``wq [L, D, H, Dh]``: in = (D,), out = (H, Dh); ``wo [L, H,
Dh, D]``: in = (H, Dh)); ``I`` / ``O`` are the flattened in / out sizes. int8: codes ``[L, *in, *out]``, scale
``[L, *out]``. nf4: codes ``[L, *in[:-1], in[-1] / 2, *out]`` (the last input dim halved by the packing; it
must be even), scale ``[L, ceil(I / 64), *out]`` (the last block is short when ``I`` is not a multiple of 64).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

# The quantizable weights and how many of their dims after ``layers`` are the matmul's input side.
QUANT_WEIGHTS = {"wq": 1, "wk": 1, "wv": 1, "wo": 2, "w_gate": 1, "w_up": 1, "w_down": 1}
BASE_QUANTIZATIONS = ("none", "int8", "nf4")

# Input-dimension values per nf4 absmax scale (QLoRA's block size).
NF4_BLOCK = 64
# The 16 NF4 code values, QLoRA's Appendix E (as published with bitsandbytes): quantiles of N(0, 1),
# 8 for the positive half and 7 for the negative one so that 0 is exact, normalised to [-1, 1].
# tests/test_lora_quant.py recomputes them from that definition with the standard library's NormalDist.
NF4_CODES = np.array(
    [
        -1.0,
        -0.6961928009986877,
        -0.5250730514526367,
        -0.39491748809814453,
        -0.28444138169288635,
        -0.18477343022823334,
        -0.09105003625154495,
        0.0,
        0.07958029955625534,
        0.16093020141124725,
        0.24611230194568634,
        0.33791524171829224,
        0.44070982933044434,
        0.5626170039176941,
        0.7229568362236023,
        1.0,
    ],
    np.float32,
)
# Decision boundaries: a normalised weight maps to the code whose interval between midpoints holds it.
_NF4_MIDPOINTS = (NF4_CODES[1:] + NF4_CODES[:-1]) / 2


def _xp(w):
    return jnp if isinstance(w, jax.Array) else np


def _flat_io(shape: tuple[int, ...], n_in: int) -> tuple[int, int]:
    """``(I, O)``: the flattened input and output sizes of one layer's ``[*in, *out]`` weight."""
    return math.prod(shape[:n_in]), math.prod(shape[n_in:])


# --- int8 -----------------------------------------------------------------------------------------


def quantize_int8(w, n_in: int):
    """``(q int8 [L, *in, *out], scale float32 [L, *out])`` of a stacked weight (numpy or JAX array in,
    the same kind out). A column of zeros gets scale 1 (and stays zero)."""
    xp = _xp(w)
    w32 = w.astype(xp.float32)
    amax = xp.max(xp.abs(w32), axis=tuple(range(1, 1 + n_in)))  # [L, *out]
    scale = xp.where(amax > 0, amax / 127.0, 1.0).astype(xp.float32)
    expanded = scale.reshape(scale.shape[:1] + (1,) * n_in + scale.shape[1:])
    q = xp.clip(xp.rint(w32 / expanded), -127, 127).astype(xp.int8)
    return q, scale


def _dequantize_int8(q: jax.Array, scale: jax.Array, n_in: int, dtype) -> jax.Array:
    """One layer: ``q [*in, *out] * scale [*out]`` in ``dtype`` (the scale broadcasts over the inputs)."""
    del n_in
    return q.astype(dtype) * scale.astype(dtype)


# --- nf4 ------------------------------------------------------------------------------------------


def quantize_nf4(w, n_in: int):
    """``(codes uint8 [L, *in[:-1], in[-1] / 2, *out], scale float32 [L, ceil(I / 64), *out])`` of a stacked
    weight ``[L, *in, *out]`` (numpy or JAX array in, the same kind out): blockwise absmax over
    :data:`NF4_BLOCK` consecutive input values, nearest NF4 code, two codes per byte. A block of zeros gets
    scale 1 (and stays zero: 0 is a code)."""
    xp = _xp(w)
    L, ins, outs = w.shape[0], w.shape[1 : 1 + n_in], w.shape[1 + n_in :]
    n_i, n_o = _flat_io(w.shape[1:], n_in)
    if ins[-1] % 2:
        raise ValueError(f"nf4 packs two input rows per byte: the last input dim must be even, got {ins}")
    blocks = -(-n_i // NF4_BLOCK)
    w32 = w.astype(xp.float32).reshape(L, n_i, n_o)
    padded = xp.pad(w32, ((0, 0), (0, blocks * NF4_BLOCK - n_i), (0, 0)))  # zeros leave the absmax as is
    amax = xp.max(xp.abs(padded.reshape(L, blocks, NF4_BLOCK, n_o)), axis=2)  # [L, blocks, O]
    scale = xp.where(amax > 0, amax, 1.0).astype(xp.float32)
    rows = xp.repeat(scale, NF4_BLOCK, axis=1)[:, :n_i]  # [L, I, O]: each row's block scale
    codes = xp.searchsorted(xp.asarray(_NF4_MIDPOINTS), w32 / rows).astype(xp.uint8)  # [L, I, O] in 0..15
    pairs = codes.reshape(L, n_i // 2, 2, n_o)
    packed = pairs[:, :, 0] | (pairs[:, :, 1] << 4)  # [L, I / 2, O]
    packed_shape = (L, *ins[:-1], ins[-1] // 2, *outs)
    return packed.astype(xp.uint8).reshape(packed_shape), scale.reshape(L, blocks, *outs)


def unpack_nf4(packed: jax.Array) -> jax.Array:
    """``[I / 2, O]`` bytes -> ``[I, O]`` code indices (low nibble: even row, high nibble: odd row)."""
    codes = jnp.stack([packed & 0xF, packed >> 4], axis=1)  # [I / 2, 2, O]
    return codes.reshape(-1, packed.shape[-1])


def _dequantize_nf4(q: jax.Array, scale: jax.Array, n_in: int, dtype) -> jax.Array:
    """One layer: packed codes ``[*in[:-1], in[-1] / 2, *out]`` and ``scale [blocks, *out]`` -> the weight
    ``[*in, *out]`` in ``dtype`` (code value times its block's absmax, in float32, then cast)."""
    ins, outs = q.shape[:n_in], q.shape[n_in:]
    n_o = math.prod(outs)
    codes = unpack_nf4(q.reshape(-1, n_o))  # [I, O]
    rows = jnp.repeat(scale.reshape(-1, n_o).astype(jnp.float32), NF4_BLOCK, axis=0)[: codes.shape[0]]
    w = jnp.asarray(NF4_CODES)[codes] * rows  # [I, O] float32
    return w.astype(dtype).reshape(*ins[:-1], 2 * ins[-1], *outs)


# --- the formats ----------------------------------------------------------------------------------


class Format(NamedTuple):
    """One storage format: ``quantize(w [L, *in, *out], n_in) -> (codes, scale)`` of a stack,
    ``dequantize(codes, scale, n_in, dtype)`` of ONE layer (no ``L`` axis), the codes' dtype, and the
    logical axes of the scale given the weight's and ``n_in``."""

    quantize: Callable
    dequantize: Callable
    code_dtype: np.dtype
    scale_axes: Callable[[tuple, int], tuple]


FORMATS = {
    # the scale has the weight's axes without its input dims
    "int8": Format(quantize_int8, _dequantize_int8, np.dtype(np.int8), lambda ax, n: ax[:1] + ax[1 + n :]),
    # blocks run along the flattened input: they take the first input dim's axis (sharded like the weight's)
    "nf4": Format(quantize_nf4, _dequantize_nf4, np.dtype(np.uint8), lambda ax, n: ax[:2] + ax[1 + n :]),
}


def format_of(codes) -> Format:
    """The format whose codes have ``codes``' dtype."""
    for fmt in FORMATS.values():
        if codes.dtype == fmt.code_dtype:
            return fmt
    raise ValueError(f"not a quantized weight: dtype {codes.dtype}")


def is_quantized(x) -> bool:
    """Whether ``x`` (an array) holds quantized codes (int8 or uint8) rather than float weights."""
    return any(x.dtype == fmt.code_dtype for fmt in FORMATS.values())


def dequantize(q: jax.Array, scale: jax.Array, n_in: int, dtype) -> jax.Array:
    """One layer's weight ``[*in, *out]`` in ``dtype`` from its codes and scale (either format)."""
    return format_of(q).dequantize(q, scale, n_in, dtype)


def dequantize_stacked(q: jax.Array, scale: jax.Array, n_in: int, dtype) -> jax.Array:
    """A whole stack ``[L, *in, *out]`` in ``dtype`` (export, the sampler's fused copy): each layer
    dequantized in float32, then cast."""
    layer = lambda q1, s1: dequantize(q1, s1, n_in, jnp.float32)  # noqa: E731
    return jax.vmap(layer)(jnp.asarray(q), jnp.asarray(scale)).astype(dtype)


def scale_axes(axes: tuple, n_in: int, quantization: str = "int8") -> tuple:
    """Logical axes of a stacked weight's scale, given the weight's ``axes``."""
    return FORMATS[quantization].scale_axes(axes, n_in)


def quantized_counts(cfg, quantization: str) -> tuple[int, int, int]:
    """``(weights, code bytes, scales)`` of a model of ``cfg`` under ``quantization`` (for the memory
    estimate): how many base parameters are quantized, the bytes of their codes (1 per weight in int8,
    0.5 in nf4) and how many float32 scales go with them. ``(0, 0, 0)`` for ``"none"``."""
    if quantization in (None, "none"):
        return 0, 0, 0
    L, D, F = cfg.num_layers, cfg.hidden_size, cfg.intermediate_size
    q, kv = cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim
    ins_outs = [(D, q), (D, kv), (D, kv), (q, D), (D, F), (D, F), (F, D)]
    weights = L * sum(i * o for i, o in ins_outs)
    if quantization == "int8":
        return weights, weights, L * sum(o for _, o in ins_outs)
    if quantization == "nf4":
        return weights, weights // 2, L * sum(-(-i // NF4_BLOCK) * o for i, o in ins_outs)
    raise ValueError(f"unknown base quantization {quantization!r}; known: {BASE_QUANTIZATIONS}")
