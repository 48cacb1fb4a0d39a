"""Decode-step attention on TPU that reads only the filled part of a preallocated KV cache (Pallas).

One query token per row attends to its row's keys in one contiguous slot range ``[start, end]`` (prompts are
left-padded, so a row's valid keys run from its first real prompt slot to the slot written this step; a
sliding-window layer narrows ``start``). The grid runs over rows and kv blocks of ``block`` slots; step ``j``
of row ``b`` visits block ``min(start // block + j, end // block)``:

* the blocks of the range come first, so the steps past ``end // block`` ask for the block they already hold:
  the pipeline issues no new DMA for a repeated block index, and ``pl.when`` skips their compute;
* blocks before ``start`` and after ``end`` are never fetched, whatever the cache's allocated length.

Scores, the online softmax (Milakov & Gimelshein 2018; FlashAttention, Dao et al. 2022) and the accumulator
are float32; the attention scale and Gemma 2's soft-cap are applied to the scores before the range mask. All
kv heads of a row are handled in one grid step (a static loop over them, each a ``[G, Dh] x [Dh, block]``
matmul), which keeps the number of grid steps at rows x blocks.

Shapes: B rows, K kv heads, G = H / K query heads per kv head, Dh head dim, L layers, S cache slots. The cache
is the sampler's stacked ``[L, B, K, S, Dh]`` (``jrft.models.KVCache``); the layer read is a scalar-prefetch
argument, so no per-layer slice of the cache is ever materialised.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu
from jax.sharding import PartitionSpec

LANES = 128  # running max / sum kept lane-replicated, as TPU vregs want
_NT = (((1,), (1,)), ((), ()))  # contract both operands' last dims: [G, Dh] x [S, Dh] -> [G, S]


def visited_block(j, start, end, block: int):
    """The kv block that grid step ``j`` of a row with valid slots ``[start, end]`` reads: the range's blocks
    in order, then the last one repeated (the pipeline issues no DMA for a repeated block index)."""
    return jnp.minimum(jax.lax.div(start, block) + j, jax.lax.div(end, block))  # slots >= 0: no floor needed


def blocks_read(starts, ends, block: int) -> np.ndarray:
    """``[B]`` how many distinct kv blocks the kernel fetches and computes per row (``visited_block``)."""
    starts, ends = np.asarray(starts), np.asarray(ends)
    return np.maximum(ends // block - starts // block + 1, 0)


def _kernel(
    layer_ref, starts_ref, ends_ref, q_ref, k_ref, v_ref, o_ref, m_ref, l_ref, acc_ref,
    *, block, scale, softcap, num_blocks, slots_minor,
):  # fmt: skip
    """One grid step ``(b, j)``: ``q_ref [K, G, Dh]``, ``k_ref, v_ref [K, block, Dh]`` (``slots_minor``:
    ``[K, Dh, block]``), ``o_ref [K, G, Dh]``; scratch ``m_ref, l_ref [K, G, LANES]`` (running max and sum,
    lanes equal), ``acc_ref [K, G, Dh]`` float32."""
    del layer_ref  # used by the index maps only
    b, j = pl.program_id(0), pl.program_id(1)
    start, end = starts_ref[b], ends_ref[b]
    first = jax.lax.div(start, block)  # slots >= 0: truncation is floor (and needs no sign op on TPU)
    kv_heads = q_ref.shape[0]

    @pl.when(j == 0)
    def _init():
        m_ref[...] = jnp.full(m_ref.shape, -jnp.inf, jnp.float32)
        l_ref[...] = jnp.zeros(l_ref.shape, jnp.float32)
        acc_ref[...] = jnp.zeros(acc_ref.shape, jnp.float32)

    @pl.when(first + j <= jax.lax.div(end, block))
    def _compute():
        slots = (first + j) * block + jax.lax.broadcasted_iota(jnp.int32, (q_ref.shape[1], block), 1)
        valid = (slots >= start) & (slots <= end)  # [G, block]
        for h in range(kv_heads):  # static: one [G, Dh] x [Dh, block] matmul per kv head
            if slots_minor:  # [G, Dh] x [Dh, block]
                s = jnp.dot(q_ref[h], k_ref[h], preferred_element_type=jnp.float32)
            else:  # [G, Dh] x [block, Dh]^T
                s = jax.lax.dot_general(q_ref[h], k_ref[h], _NT, preferred_element_type=jnp.float32)
            s = s * scale
            if softcap is not None:
                s = softcap * jnp.tanh(s / softcap)
            s = jnp.where(valid, s, -jnp.inf)  # [G, block]
            m_prev, l_prev = m_ref[h], l_ref[h]  # [G, LANES], lanes equal
            # finite: every visited block meets the range
            m_next = jnp.maximum(m_prev, jnp.max(s, axis=1, keepdims=True))
            m_col = jnp.max(m_next, axis=1, keepdims=True)  # [G, 1]
            p = jnp.exp(s - m_col)  # [G, block], 0 outside the range
            alpha = jnp.exp(m_prev - m_next)  # [G, LANES]
            l_ref[h] = alpha * l_prev + jnp.sum(p, axis=1, keepdims=True)
            m_ref[h] = m_next
            p_v = p.astype(v_ref.dtype)
            if slots_minor:  # [G, block] x [Dh, block]^T
                pv = jax.lax.dot_general(p_v, v_ref[h], _NT, preferred_element_type=jnp.float32)
            else:
                pv = jnp.dot(p_v, v_ref[h], preferred_element_type=jnp.float32)  # [G, Dh]
            acc_ref[h] = acc_ref[h] * jnp.max(alpha, axis=1, keepdims=True) + pv

    @pl.when(j == num_blocks - 1)
    def _finish():
        for h in range(kv_heads):
            l_col = jnp.max(l_ref[h], axis=1, keepdims=True)  # [G, 1]
            o_ref[h] = (acc_ref[h] / jnp.where(l_col > 0, l_col, 1.0)).astype(o_ref.dtype)


def ragged_decode_attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    layer: jax.Array,
    starts: jax.Array,
    ends: jax.Array,
    scale: float,
    softcap: float | None = None,
    *,
    block: int = 256,
    slots_minor: bool | None = None,
    interpret: bool = False,
    mesh=None,
    kv_spec: PartitionSpec | None = None,
) -> jax.Array:
    """One query per row against cache layer ``layer``, keys ``[starts[b], ends[b]]`` only.

    Args:
      q: ``[B, K, G, Dh]`` queries (the G query heads of each kv head together).
      k, v: ``[L, B, K, S, Dh]`` the stacked cache (``S`` a multiple of ``block``).
      layer: scalar int, the layer to read.
      starts, ends: ``[B]`` int, each row's first and last valid slot (inclusive; ``start <= end``).
      scale: multiplies the scores; softcap: Gemma 2's ``cap * tanh(s / cap)`` (None: off).
      block: kv slots per grid step (a multiple of 8; 128 or more on TPU).
      slots_minor: read k/v as ``[..., Dh, S]`` views (default: when ``Dh`` is not a multiple of 128). XLA
        on TPU lays out a ``[..., S, Dh]`` array with ``Dh < 128`` slots-minor (no padding of the 128-lane
        tile); the kernel then reads it in that orientation and the transposed view costs no copy, where the
        row-major orientation made XLA copy the whole cache into the kernel's layout on every call.
      interpret: Pallas interpret mode (CPU tests).
      mesh, kv_spec: run per shard under ``jax.shard_map`` over ``mesh`` (None or empty: unsharded), the
        cache split by its partition spec ``kv_spec`` (rows over the batch axes, kv heads over tensor); q,
        starts and ends are split the same way (a Pallas call has no partitioning rule).

    Returns:
      ``[B, K, G, Dh]`` in ``q.dtype`` (a row with no valid key gives 0).
    """
    if mesh is not None and not mesh.empty:

        def per_shard(q, k, v, layer, starts, ends):
            return ragged_decode_attention(
                q, k, v, layer, starts, ends, scale, softcap, block=block, slots_minor=slots_minor,
                interpret=interpret,
            )  # fmt: skip

        q_spec = PartitionSpec(kv_spec[1], kv_spec[2], None, None)
        rows = PartitionSpec(kv_spec[1])
        return jax.shard_map(
            per_shard, mesh=mesh, in_specs=(q_spec, kv_spec, kv_spec, PartitionSpec(), rows, rows),
            out_specs=q_spec, check_vma=False,
        )(q, k, v, layer, starts, ends)  # fmt: skip
    _, b, kv, s, dh = k.shape
    g = q.shape[2]
    if s % block:
        raise ValueError(f"ragged_decode_attention: cache length {s} is not a multiple of block {block}")
    num_blocks = s // block
    slots_minor = dh % LANES != 0 if slots_minor is None else slots_minor
    kv_block = (None, None, kv, dh, block) if slots_minor else (None, None, kv, block, dh)

    def kv_map(i, j, layer_ref, starts_ref, ends_ref):
        blk = visited_block(j, starts_ref[i], ends_ref[i], block)
        return (layer_ref[0], i, 0, 0, blk) if slots_minor else (layer_ref[0], i, 0, blk, 0)

    def q_map(i, j, *_):
        return i, 0, 0, 0

    kernel = functools.partial(
        _kernel, block=block, scale=scale, softcap=softcap, num_blocks=num_blocks, slots_minor=slots_minor
    )
    grid_spec = pltpu.PrefetchScalarGridSpec(
        num_scalar_prefetch=3,
        grid=(b, num_blocks),
        in_specs=[
            pl.BlockSpec((None, kv, g, dh), q_map),
            pl.BlockSpec(kv_block, kv_map),
            pl.BlockSpec(kv_block, kv_map),
        ],
        out_specs=pl.BlockSpec((None, kv, g, dh), q_map),
        scratch_shapes=[
            pltpu.VMEM((kv, g, LANES), jnp.float32),
            pltpu.VMEM((kv, g, LANES), jnp.float32),
            pltpu.VMEM((kv, g, dh), jnp.float32),
        ],
    )
    return pl.pallas_call(
        kernel,
        grid_spec=grid_spec,
        out_shape=jax.ShapeDtypeStruct(q.shape, q.dtype),
        compiler_params=pltpu.CompilerParams(dimension_semantics=("parallel", "arbitrary")),
        interpret=interpret,
        name="ragged_decode_attention",
    )(
        jnp.asarray(layer, jnp.int32).reshape(1),
        starts.astype(jnp.int32),
        ends.astype(jnp.int32),
        q,
        k.swapaxes(-1, -2) if slots_minor else k,  # [L, B, K, Dh, S]: a view of XLA's own layout
        v.swapaxes(-1, -2) if slots_minor else v,
    )
