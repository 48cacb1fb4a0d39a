"""A per-device memory estimate for a training or sampling run, printed at start.

Counts, per device, for a model of ``ModelConfig`` on a ``(data, fsdp, tensor)`` mesh:
  params      every parameter, split over fsdp x tensor (the rules table shards matrices over both);
              with LoRA, the base plus the adapters (a quantized base: 1 byte per projection weight in
              int8, 0.5 in nf4, plus their float32 scales: one per output channel in int8, one per block
              of 64 inputs in nf4);
  grads       the same again (one gradient per parameter, in the parameter dtype); with LoRA, the
              adapters' only (the base is never differentiated);
  optimizer   AdamW's two moments (``optimizer_copies`` = 2) in ``opt_dtype``, of the trained parameters
              (with LoRA: the adapters);
  activations what the backward pass keeps: per layer ``B_local x T x D`` times a factor set by the remat
              policy (``REMAT_ACTIVATION_FACTORS``), plus the float32 logits and their log-softmax,
              ``2 x B_local x T x V / tensor x 4`` -- or, with ``logits_chunk_size`` C, the chunks in flight
              (one; two on TPU, whose compiler overlaps consecutive chunks) of ``2 x B_local x C x V / tensor
              x 4`` plus the chunks' saved hidden states ``B_local x T x D``; plus, when the LM head is
              sharded (fsdp x tensor > 1), the whole head ``V x D / tensor`` gathered in the compute dtype
              plus one float32 buffer of its shape (the gathered float32 weight or the gradient the logits
              chunks accumulate into; both seen in TPU buffer assignments);
  kv_cache    ``2 x L x B_local x KV/tensor x S x Dh x bytes`` for sampling (on TPU ``Dh`` rounded up to
              128, the lane width its layout pads the minor axis to);
  reference   a frozen reference model's parameters (DPO, GRPO/PPO with a KL term), 0 when offloaded to host
              (and with LoRA, whose reference is the base with the adapters off).
It is an estimate (XLA's temporaries and fragmentation come on top): :func:`device_memory_in_use` reports
what the device itself says, where it can (GPU/TPU ``memory_stats``; CPU has none).
"""

from __future__ import annotations

import dataclasses

import jax
import numpy as np

# Activations kept per layer, in units of B*T*D values (rough, from the tensors each policy saves):
# none keeps q/k/v, attention output, MLP hidden (3F/D ~ 8), norms and float32 copies; full keeps only the
# layer input. "none" is calibrated on the TPU compiler (Llama-3-1B, v5e:2x4, scripts/compile_table.py:
# 41 per layer); the policies between are interpolations, not measured.
REMAT_ACTIVATION_FACTORS = {
    "none": 40.0,
    "dots_saveable": 12.0,
    "dots_no_batch": 10.0,
    "save_qkv_attn_out": 6.0,
    "save_attn_out": 3.0,
    "full": 1.0,
}


@dataclasses.dataclass(frozen=True)
class MemoryEstimate:
    """Bytes per device of each part; ``total`` sums them."""

    params: int
    grads: int
    optimizer: int
    activations: int
    kv_cache: int
    reference: int = 0

    @property
    def total(self) -> int:
        return self.params + self.grads + self.optimizer + self.activations + self.kv_cache + self.reference

    def describe(self) -> str:
        gib = lambda b: f"{b / 2**30:.2f} GiB"  # noqa: E731
        parts = ", ".join(f"{f.name} {gib(getattr(self, f.name))}" for f in dataclasses.fields(self))
        return (
            f"estimated per-device memory: {gib(self.total)} of device buffers ({parts}); the host process"
            " (Python, tokenizer, data, compiled code, and on CPU the runtime's copies) comes on top"
        )


def logits_activation_bytes(
    config,
    local_batch: int,
    seq_len: int,
    *,
    tensor: int = 1,
    compute_bytes: int = 4,
    chunk: int = 0,
    chunks_in_flight: int = 1,
    copies: float = 2.0,
) -> int:
    """Bytes the LM head + log-softmax keep live per device in a training step: the float32 logits and their
    gradient/softmax (``2 x B x T x V / tensor x 4``); with ``chunk`` > 0 (``train.logits_chunk_size``)
    ``chunks_in_flight`` chunks' worth (``T`` -> ``chunk``) plus the hidden states the chunks keep for the
    backward. ``copies``: float32 ``[B, T, V]`` buffers live at the peak (2: logits and their gradient)."""
    rows = seq_len if chunk <= 0 else min(chunk, seq_len) * chunks_in_flight
    logits = int(local_batch * rows * config.vocab_size * 4 * copies) // tensor
    if chunk > 0:
        logits += local_batch * seq_len * config.hidden_size * compute_bytes
    return int(logits)


def estimate_memory(
    config,
    *,
    mesh_shape: tuple[int, int, int],
    batch: int,
    seq_len: int,
    param_bytes: int = 4,
    compute_bytes: int = 4,
    opt_bytes: int = 4,
    optimizer_copies: int = 2,
    remat: str = "none",
    training: bool = True,
    cache_batch: int = 0,
    cache_len: int = 0,
    cache_bytes: int = 4,
    logits_chunk_size: int = 0,
    reference: bool = False,
    offload_reference: bool = False,
    platform: str = "cpu",
    completion_logps: bool = False,
    adapter_params: int = 0,
    quantized: tuple[int, int, int] = (0, 0, 0),
) -> MemoryEstimate:
    """Per-device bytes for ``config`` (a ``jrft.models.ModelConfig``) on a ``(data, fsdp, tensor)`` mesh.

    ``batch`` is the global batch (rows) of one micro-batch; ``cache_batch``/``cache_len`` the sampler's.
    ``logits_chunk_size`` is ``train.logits_chunk_size`` (0: the whole float32 logits at once); ``reference``
    counts a frozen reference copy of the parameters (in ``param_bytes``), none if ``offload_reference``.
    ``platform`` is the one the program is compiled for (its compiler's habits: see the module docstring).
    ``completion_logps``: the step takes log-probs of the sampled tokens (the GRPO / PPO update) rather than
    a cross-entropy over the sequence; on TPU its buffers differ (measured: see the comments below).
    ``adapter_params`` > 0: LoRA with that many adapter parameters (``jrft.models.lora.adapter_param_count``),
    the only ones trained: they add to ``params`` and alone have gradients and optimizer moments.
    ``quantized``: ``(weights, code bytes, scales)``: that many of the base's parameters are stored in that
    many bytes of codes plus that many float32 scales (``lora.base_quantization``,
    ``jrft.models.quant.quantized_counts``).
    """
    data, fsdp, tensor = mesh_shape
    if remat not in REMAT_ACTIVATION_FACTORS:
        raise ValueError(f"unknown remat policy {remat!r}; known: {sorted(REMAT_ACTIVATION_FACTORS)}")
    n = config.num_params() if callable(getattr(config, "num_params", None)) else config.num_params
    shards = fsdp * tensor
    trained = adapter_params or n
    q_weights, q_bytes, q_scales = quantized
    stored = (n - q_weights + adapter_params) * param_bytes + q_bytes + 4 * q_scales
    params = stored // shards
    grads = trained * param_bytes // shards if training else 0
    optimizer = trained * opt_bytes * optimizer_copies // shards if training else 0
    local_batch = max(batch // (data * fsdp), 1)
    activations = 0
    if training:
        per_layer = (
            REMAT_ACTIVATION_FACTORS[remat] * local_batch * seq_len * config.hidden_size * compute_bytes
        )
        logits = logits_activation_bytes(
            config,
            local_batch,
            seq_len,
            tensor=tensor,
            compute_bytes=compute_bytes,
            chunk=logits_chunk_size,
            chunks_in_flight=2 if platform == "tpu" else 1,
            # XLA:TPU holds ~1.75 whole-logits copies at the peak of the unchunked head (calibrated on
            # Llama-3-1B, v5e:2x4: two cases, scripts/compile_table.py), and as much per chunk in flight in
            # the GRPO update's completion log-probs (three float32 chunks and one bf16 in its buffer
            # assignment, 1B and 8B); XLA:CPU holds 2
            copies=1.75 if platform == "tpu" and (logits_chunk_size <= 0 or completion_logps) else 2.0,
        )
        # the whole head, gathered: a compute-dtype copy for the logits matmul and one float32 buffer of its
        # shape (the gathered float32 weight, or the float32 gradient the chunks accumulate into; in the
        # TPU GRPO update that float32 buffer shares the logits chunks' allocation; with LoRA and bf16
        # params the head has neither)
        shared = platform == "tpu" and completion_logps
        float32_head = (param_bytes == 4 or not adapter_params) and not shared
        head_bytes = compute_bytes + (4 if float32_head else 0)
        head = config.vocab_size * config.hidden_size * head_bytes // tensor if shards > 1 else 0
        activations = int(config.num_layers * per_layer + logits + head)
    kv = 0
    if cache_batch and cache_len:
        local_cache_batch = max(cache_batch // (data * fsdp), 1)
        kv_heads = (
            max(config.num_kv_heads // tensor, 1)
            if config.num_kv_heads % tensor == 0
            else config.num_kv_heads
        )
        # XLA:TPU tiles the cache's minor (head_dim) axis to 128 lanes: head_dim 64 takes 128's memory
        head_dim = -(-config.head_dim // 128) * 128 if platform == "tpu" else config.head_dim
        kv = 2 * config.num_layers * local_cache_batch * kv_heads * cache_len * head_dim * cache_bytes
    ref = n * param_bytes // shards if reference and not offload_reference else 0
    return MemoryEstimate(int(params), int(grads), int(optimizer), int(activations), int(kv), int(ref))


def device_memory_in_use() -> int | None:
    """Bytes in use on the first local device, from the runtime (None where it does not say, e.g. CPU)."""
    stats = jax.local_devices()[0].memory_stats()
    if not stats:
        return None
    return int(stats.get("bytes_in_use", 0)) or None


def measured_peak() -> tuple[str, int]:
    """The run's measured peak so far: ``("device", bytes)`` from the first local device's
    ``peak_bytes_in_use`` where the backend reports it (GPU, TPU), else ``("host RSS", bytes)``, the
    process's peak resident set (CPU, where device buffers live in host memory)."""
    stats = jax.local_devices()[0].memory_stats() or {}
    if stats.get("peak_bytes_in_use"):
        return "device", int(stats["peak_bytes_in_use"])
    import resource
    import sys

    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return "host RSS", int(rss if sys.platform == "darwin" else rss * 1024)  # bytes on macOS, KiB on Linux


def describe_measured_peak() -> str:
    """One line for the end of a run: its measured peak memory (:func:`measured_peak`)."""
    kind, value = measured_peak()
    where = "per device" if kind == "device" else "of the whole process"
    return f"measured peak memory: {value / 2**30:.2f} GiB {kind} ({where})"


def actual_param_bytes_per_device(params) -> int:
    """The largest per-device byte count over the addressable shards of a parameter pytree."""
    per_device: dict = {}
    for x in jax.tree.leaves(params):
        for shard in getattr(x, "addressable_shards", ()):
            per_device[shard.device] = (
                per_device.get(shard.device, 0) + int(np.prod(shard.data.shape)) * x.dtype.itemsize
            )
    return max(per_device.values()) if per_device else 0
