"""Which attention implementation a program uses, chosen by the platform of the mesh's devices, and the
accelerator wrappers: Pallas splash attention on TPU, cuDNN through ``jax.nn.dot_product_attention`` on GPU.
For the sampler's decode step on TPU it picks the ragged decode kernel, which reads only the filled blocks
of a preallocated cache (``jrft.models.ragged_decode``, which also runs it per shard under a mesh).

The blocked XLA path in ``layers.attention`` stays the CPU path (and every fallback). Selection happens at
trace time from static facts only (platform, dtype, shapes, soft-cap, whether the mask's key validity and
segment ids are known); each distinct choice is logged once with its reason, e.g.
``attention: splash (pallas-tpu) [B=8 T=2048 H=32 K=8 Dh=64 bfloat16]``.

Letters in shapes as in ``layers``: B batch, T query length, S key length, H query heads, K kv heads, Dh head
dim.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import logging
import os

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import PartitionSpec

logger = logging.getLogger(__name__)

XLA, SPLASH, CUDNN, RAGGED_DECODE = "xla", "splash", "cudnn", "ragged-decode"
LABELS = {
    XLA: "xla-blocked",
    SPLASH: "splash (pallas-tpu)",
    CUDNN: "cudnn",
    RAGGED_DECODE: "ragged-decode (pallas-tpu)",
}
SPLASH_BLOCK = 128  # the kernel's smallest tile: the sequence must be a multiple of it
# Cache slots per grid step of the ragged decode kernel: Llama-3-1B's 8 kv heads x 64 dims x 256 slots are
# 256 KiB of bf16 keys (as much again of values) per step, large enough to amortise a grid step (not measured
# on a chip: no TPU here).
DECODE_BLOCK = 256


@dataclasses.dataclass(frozen=True)
class AttentionChoice:
    """``impl``: one of ``"xla"``, ``"splash"``, ``"cudnn"``; ``reason``: why, in words (for logs)."""

    impl: str
    reason: str


def attention_impl(
    platform: str,
    dtype,
    *,
    q_heads: int,
    kv_heads: int,
    head_dim: int,
    q_len: int,
    kv_len: int,
    full_causal: bool,
    segments_known: bool,
    softcap: float | None = None,
    head_shards: int = 1,
    kv_head_shards: int = 1,
) -> AttentionChoice:
    """The attention implementation for one call site.

    Args:
      platform: of the mesh's devices (``"cpu"``, ``"gpu"``, ``"tpu"``), never of the host.
      dtype: compute dtype of q/k/v.
      q_heads, kv_heads, head_dim, q_len, kv_len: ``H, K, Dh, T, S``.
      full_causal: the mask is causal over one full sequence (T == S, training / prefill), not a decode step.
      segments_known: the mask's key validity and segment ids are known as arrays (it was built by
        ``layers.causal_mask`` and not narrowed further, e.g. by a sliding window): what splash needs.
      softcap: Gemma 2's logit soft-cap, or None.
      head_shards, kv_head_shards: how many ways the mesh splits query heads and kv heads.
    """
    if platform == "tpu":
        return _tpu_choice(
            q_heads, kv_heads, q_len, kv_len, full_causal, segments_known, head_shards, kv_head_shards
        )
    if platform == "gpu":
        return _gpu_choice(dtype, q_heads, kv_heads, head_dim, full_causal, softcap)
    return AttentionChoice(XLA, f"platform {platform}: the blocked XLA path")


def _tpu_choice(q_heads, kv_heads, q_len, kv_len, full_causal, segments_known, head_shards, kv_head_shards):
    fallback = functools.partial(AttentionChoice, XLA)
    if not full_causal or q_len != kv_len:
        return fallback("not a full causal sequence (decode step or cross lengths): splash is for T == S")
    if not segments_known:
        return fallback("mask not from causal_mask (e.g. a sliding-window layer): splash needs segment ids")
    if q_len % SPLASH_BLOCK:
        return fallback(f"sequence length {q_len} is not a multiple of {SPLASH_BLOCK} (splash tile)")
    if q_heads % kv_heads:
        return fallback(f"{q_heads} query heads are not a multiple of {kv_heads} kv heads")
    if head_shards != kv_head_shards:
        split = f"query heads split {head_shards} ways, kv heads {kv_head_shards}"
        return fallback(f"{split}: GQA groups would cross shards")
    return AttentionChoice(SPLASH, "TPU, full causal sequence with segment ids")


def _gpu_choice(dtype, q_heads, kv_heads, head_dim, full_causal, softcap):
    fallback = functools.partial(AttentionChoice, XLA)
    if not full_causal:
        return fallback("decode step: the fused kernel is used for training and prefill only")
    if jnp.dtype(dtype) not in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16)):
        return fallback(f"cuDNN flash attention needs bf16/fp16, got {jnp.dtype(dtype).name}")
    if softcap is not None:
        return fallback("logit soft-capping is not supported by jax.nn.dot_product_attention")
    if head_dim > 128 or head_dim % 8:
        return fallback(f"head dim {head_dim}: cuDNN needs <= 128 and a multiple of 8")
    if q_heads % kv_heads:
        return fallback(f"{q_heads} query heads are not a multiple of {kv_heads} kv heads")
    return AttentionChoice(CUDNN, "GPU, bf16/fp16")


def decode_attention_impl(platform: str, *, q_heads: int, kv_heads: int, layout: str) -> AttentionChoice:
    """The sampler's decode-step attention (one query per row against the KV cache).

    Args:
      platform: of the mesh's devices (``"cpu"``, ``"gpu"``, ``"tpu"``), never of the host.
      q_heads, kv_heads: ``H, K``.
      layout: the sampler's decode layout (``"scan"``: one stacked cache; ``"unrolled"``: per-layer caches).

    On TPU the ragged kernel over one preallocated cache, each row's keys a slot range (sliding-window layers
    narrow it); elsewhere the XLA path over a cache grown segment by segment (tuned for XLA:CPU).
    """
    fallback = functools.partial(AttentionChoice, XLA)
    if platform != "tpu":
        return fallback(f"platform {platform}: the XLA decode step over a cache grown segment by segment")
    if layout != "scan":
        return fallback(f"decode layout {layout!r}: the kernel reads the stacked cache of the scan layout")
    if q_heads % kv_heads:
        return fallback(f"{q_heads} query heads are not a multiple of {kv_heads} kv heads")
    return AttentionChoice(RAGGED_DECODE, "TPU decode step: reads only the filled blocks of the cache")


def forced(choice: AttentionChoice) -> AttentionChoice:
    """``choice``, unless ``JRFT_ATTENTION=xla`` forces the XLA path (to compare a program with and without
    the kernel, e.g. two ``jrft compile`` runs)."""
    if os.environ.get("JRFT_ATTENTION", "").lower() == XLA and choice.impl != XLA:
        return AttentionChoice(XLA, f"JRFT_ATTENTION=xla (would be {choice.impl}: {choice.reason})")
    return choice


_logged: set[tuple] = set()
_recorders: list[list[AttentionChoice]] = []


@contextlib.contextmanager
def recording():
    """Collects the choices made while tracing inside the block (a list, filled as attention is traced):
    how ``jrft compile`` names each program's attention."""
    seen: list[AttentionChoice] = []
    _recorders.append(seen)
    try:
        yield seen
    finally:
        _recorders.remove(seen)


def describe(choices: list[AttentionChoice]) -> str | None:
    """``"splash (pallas-tpu)"``, ``"xla-blocked (reason)"``, ... for the distinct choices, or None."""
    names = dict.fromkeys(LABELS[c.impl] if c.impl != XLA else f"{LABELS[XLA]} ({c.reason})" for c in choices)
    return "; ".join(names) or None


def log_choice(choice: AttentionChoice, q: jax.Array, k: jax.Array) -> None:
    """Logs ``attention: <impl> [shapes] (reason)`` once per distinct choice and shape (and records it)."""
    for seen in _recorders:
        seen.append(choice)
    b, t, h, dh = q.shape
    key = (choice, q.shape, k.shape, str(q.dtype))
    if key in _logged:
        return
    _logged.add(key)
    logger.info(
        "attention: %s [B=%d T=%d S=%d H=%d K=%d Dh=%d %s] (%s)",
        LABELS[choice.impl], b, t, k.shape[2], h, k.shape[1], dh, q.dtype, choice.reason,
    )  # fmt: skip


def current_platform(x: jax.Array) -> tuple[str, jax.sharding.AbstractMesh | None]:
    """``(platform, mesh)`` of the program being traced: the devices of the mesh set with ``jax.set_mesh``,
    else of a concrete ``x``'s sharding, else of the default backend (where an un-meshed jit runs)."""
    mesh = jax.sharding.get_abstract_mesh()
    if not mesh.empty and mesh.abstract_device is not None:
        return mesh.abstract_device.platform, mesh
    sharding = getattr(x, "sharding", None) if not isinstance(x, jax.core.Tracer) else None
    if sharding is not None:
        return next(iter(sharding.device_set)).platform, None
    return jax.devices()[0].platform, None


def head_shards(mesh, q_shape, k_shape) -> tuple[int, int, PartitionSpec, PartitionSpec]:
    """How the logical rules split q ``[B, T, H, Dh]`` and k/v ``[B, K, S, Dh]`` on ``mesh``:
    ``(query head shards, kv head shards, q spec, kv spec)``."""
    if mesh is None or mesh.empty:
        return 1, 1, PartitionSpec(), PartitionSpec()
    from jrft.parallel.sharding import logical_to_spec

    q_spec = logical_to_spec(("batch", "seq", "act_heads", "act_head_dim"), q_shape, mesh)
    kv_spec = logical_to_spec(("batch", "act_kv_heads", "seq", "act_head_dim"), k_shape, mesh)
    return _shards(mesh, q_spec[2]), _shards(mesh, kv_spec[1]), q_spec, kv_spec


def _shards(mesh, entry) -> int:
    if entry is None:
        return 1
    names = (entry,) if isinstance(entry, str) else entry
    return int(np.prod([dict(mesh.shape)[n] for n in names]))


# --- TPU: Pallas splash attention ---------------------------------------------------------------


def _block(t: int) -> int:
    return next(b for b in (512, 256, SPLASH_BLOCK) if t % b == 0)


def splash_attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    key_valid: jax.Array,
    segment_ids: jax.Array | None,
    scale: float,
    softcap: float | None = None,
    *,
    mesh=None,
    q_spec: PartitionSpec | None = None,
    kv_spec: PartitionSpec | None = None,
    interpret: bool = False,
) -> jax.Array:
    """Causal self-attention through JAX's Pallas TPU splash kernel (forward and backward), with GQA.

    Args:
      q: ``[B, T, H, Dh]``; k, v: ``[B, K, T, Dh]``.
      key_valid: ``[B, T]`` 0/1, 1 for real tokens (left or right padding).
      segment_ids: ``[B, T]`` ints for packed rows, or None (one segment).
      scale, softcap: as in ``layers.attention``.
      mesh, q_spec, kv_spec: when given, the kernel runs per shard under ``jax.shard_map`` (a Pallas call has
        no partitioning rule of its own).
      interpret: run the kernel in Pallas interpret mode (CPU tests).

    Returns:
      ``[B, T, H, Dh]`` in ``q.dtype``; rows of padding queries are 0 (as ``layers.attention`` gives for a
      query with no allowed key). Real queries never see padding keys; padding queries see only padding, so
      every softmax row has a key and stays finite.
    """
    valid = key_valid.astype(bool)
    seg = jnp.zeros(valid.shape, jnp.int32) if segment_ids is None else segment_ids.astype(jnp.int32)
    seg = jnp.where(valid, seg, jnp.iinfo(jnp.int32).min)  # padding: its own segment

    def per_shard(q, k, v, seg, valid):
        from jax.experimental.pallas.ops.tpu import splash_attention as sa

        b, t, h, dh = q.shape
        block = _block(t)
        sizes = sa.BlockSizes(
            block_q=block, block_kv=block, block_kv_compute=block,
            block_q_dkv=block, block_kv_dkv=block, block_kv_dkv_compute=block,
            block_q_dq=block, block_kv_dq=block,
        )  # fmt: skip
        mask = sa.MultiHeadMask([sa.CausalMask((t, t)) for _ in range(h)])
        kernel = sa.make_splash_mha(
            mask, block_sizes=sizes, head_shards=1, q_seq_shards=1, attn_logits_soft_cap=softcap,
            interpret=interpret,
        )  # fmt: skip
        qh = (q * jnp.asarray(scale, q.dtype)).transpose(0, 2, 1, 3)  # [B, H, T, Dh]
        call = jax.vmap(lambda q, k, v, s: kernel(q, k, v, segment_ids=sa.SegmentIds(s, s)))
        out = call(qh, k, v, seg).transpose(0, 2, 1, 3)  # [B, T, H, Dh]
        return jnp.where(valid[:, :, None, None], out, 0).astype(q.dtype)

    if mesh is None or mesh.empty:
        return per_shard(q, k, v, seg, valid)
    batch = PartitionSpec(q_spec[0], None)
    return jax.shard_map(
        per_shard, mesh=mesh, in_specs=(q_spec, kv_spec, kv_spec, batch, batch), out_specs=q_spec,
        check_vma=False,
    )(q, k, v, seg, valid)  # fmt: skip


# --- GPU: cuDNN through jax.nn.dot_product_attention ----------------------------------------------


def cudnn_attention(
    q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array, scale: float, implementation: str = CUDNN
) -> jax.Array:
    """``layers.attention`` through ``jax.nn.dot_product_attention`` (cuDNN's fused kernel on GPU; ``"xla"``
    runs the same call anywhere, for tests). ``mask [B, T, S]`` is the dense mask (padding, segments and
    sliding windows all in it); rows with no allowed key give 0. Shapes as in ``layers.attention``."""
    out = jax.nn.dot_product_attention(
        q,
        k.transpose(0, 2, 1, 3),  # [B, S, K, Dh]
        v.transpose(0, 2, 1, 3),
        mask=mask[:, None],
        scale=scale,
        implementation=implementation,
    )
    return jnp.where(jnp.any(mask, axis=-1)[:, :, None, None], out, 0).astype(q.dtype)
