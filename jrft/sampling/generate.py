"""Batched generation with a KV cache: G samples per prompt (GRPO groups), one jitted program per shape
bucket.

``generate(model, prompt_tokens, prompt_mask, ...)`` runs, inside ONE jit-compiled program:

1. ``prefill`` of the B left-padded prompts (once per prompt, not once per sample), then the cache and the
   last logits are repeated G times along the batch, so row ``b * G + g`` is sample g of prompt b (each
   prompt's G samples are contiguous, ``[B * G, ...]``);
2. the first token from the prefill logits, then a decode loop (``lax.while_loop``) whose carry holds the
   cache, the last tokens and the output buffers (the cache is updated in place: passing it through scan
   inputs/outputs copied it 4x per step, shared/NOTES.md). The loop is split into a few segments, each
   attending only to the cache prefix filled by its end (a static length per segment); every segment stops
   as soon as all rows have finished or ``max_new_tokens`` is reached. On TPU the decode step's attention is
   instead the ragged decode kernel (``jrft.models.ragged_decode``, chosen by
   ``kernels.decode_attention_impl``): the cache is allocated once for the whole length (no segment copies)
   and each step reads only the blocks of each row's filled slots, in one loop.

Rows stop at the first token in ``stop_token_ids`` (that token is part of the completion, as in transformers);
after it they emit ``pad_token_id`` with mask 0. Log-probs are float32, under the same
temperature/top-k/top-p/min-p that sampled the token (see ``jrft.sampling.logits`` for what that means for
GRPO's old log-probs).

Compiles: the prompt length is rounded up to a bucket (``bucket_length``: powers of two from 16) by extra left
padding, ``max_new_tokens`` to a power of two from 32 (only the cache size and output buffer depend on it; the
exact count is a runtime value), the number of prompts up to a multiple of the mesh's batch shards. Sampling
values (temperature, top-p, min-p), stop ids and pad id are runtime values; which filters are on and top-k are
static. ``Sampler.stats.compiles`` counts traces of the program (one per new bucket), and every result carries
a snapshot of it.

Parameters: the model is split once per call into (graphdef, state); the state is a jit argument (never
donated: the trainer keeps using it). The default CPU layout (``layout="unrolled"``, fused projections) makes
one transient copy of the layer weights per call, freed when it returns (a decode step on CPU is
overhead-bound and this removes per-step slicing); ``layout="scan", fuse_projections=False`` (the default off
CPU) copies nothing. "CPU" means the platform of the mesh's devices (else of the parameters':
``program_platform``), never the host's, so compiling for a TPU topology from a CPU host gets the TPU choices.
With a ``mesh``, prompt rows and the cache are sharded over the mesh's batch axes (``LOGICAL_RULES['batch']``:
data and fsdp); parameters stay where the caller placed them.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from jrft.models import kernels
from jrft.models.decoder import CACHE_AXES, KVCache, init_cache
from jrft.models.lora import LoRAParam
from jrft.parallel.sharding import LOGICAL_RULES, logical_axes_of, logical_to_spec, with_logical_constraint
from jrft.sampling.decode import (
    decode_step,
    decode_step_unrolled,
    fuse_decode_weights,
    prefill,
    ranged_decode_step,
    split_layers,
)
from jrft.sampling.logits import SamplingParams, select_next

FINISH_STOP = 0  # ended with a stop token
FINISH_LENGTH = 1  # reached max_new_tokens
FINISH_REASONS: tuple[str, ...] = ("stop", "length")
MAX_STOP_IDS = 8  # stop ids are a runtime array of this length (padded with -1)


def finish_reason_names(finish_reason) -> list[str]:
    """``[N]`` int finish reasons -> ``["stop" | "length", ...]``."""
    return [FINISH_REASONS[int(r)] for r in np.asarray(finish_reason)]


def bucket_length(n: int, minimum: int = 16) -> int:
    """The smallest power of two >= ``max(n, minimum)``: lengths padded to it compile once per bucket."""
    return max(minimum, 1 << max(0, math.ceil(math.log2(max(n, 1)))))


@dataclasses.dataclass(frozen=True)
class SamplerStats:
    """Counters of one ``Sampler``: ``compiles`` (traces of the generate program, one per bucket), ``calls``,
    and the buckets ``(prompts, prompt_len, new_tokens, G)`` seen."""

    compiles: int = 0
    calls: int = 0
    buckets: tuple[tuple[int, int, int, int], ...] = ()


@flax.struct.dataclass
class GenerationResult:
    """Completions of ``B`` prompts x ``G`` samples, row ``b * G + g`` (each prompt's samples contiguous).

    Attributes:
      tokens: ``[B*G, Tn]`` int32 completion tokens (``Tn = max_new_tokens``), ``pad_token_id`` after the end.
      mask: ``[B*G, Tn]`` int32, 1 for generated tokens (the stop token included), 0 after.
      logprobs: ``[B*G, Tn]`` float32 log-prob of each token under the processed sampling distribution
        (0 where mask is 0).
      lengths: ``[B*G]`` int32, ``mask.sum(-1)``.
      finish_reason: ``[B*G]`` int32, ``FINISH_STOP`` or ``FINISH_LENGTH`` (``finish_reason_names``).
      prompt_tokens, prompt_mask: ``[B*G, Tp]`` the prompts repeated G times (as given, not bucketed).
      decode_steps: how many decode steps the loop ran (< max_new_tokens - 1 when every row stopped early).
      stats: the sampler's counters after this call (compiles so far...).
    """

    tokens: jax.Array
    mask: jax.Array
    logprobs: jax.Array
    lengths: jax.Array
    finish_reason: jax.Array
    prompt_tokens: jax.Array
    prompt_mask: jax.Array
    decode_steps: int = flax.struct.field(pytree_node=False, default=0)
    num_samples: int = flax.struct.field(pytree_node=False, default=1)
    stats: SamplerStats = flax.struct.field(pytree_node=False, default=SamplerStats())

    def finish_reason_names(self) -> list[str]:
        return finish_reason_names(self.finish_reason)


@dataclasses.dataclass(frozen=True)
class _ProgramKey:
    """Static part of one compiled generate program."""

    num_samples: int
    new_bucket: int
    segments: tuple[int, ...]  # decode iteration t runs in the first segment whose end >= t
    sampling: SamplingParams  # structure only (placeholder values)
    cache_dtype: str
    fuse: bool
    layout: str
    gather_weights: bool = False
    decode_attention: kernels.AttentionChoice | None = None  # None: the XLA step, not logged (CPU)
    interpret: bool = False  # the ragged decode kernel in Pallas interpret mode (CPU tests)


def _structure(params: SamplingParams) -> SamplingParams:
    """Placeholder values with the same static structure, so changing a value does not recompile."""
    return SamplingParams(
        temperature=0.0 if params.greedy else 1.0,
        top_k=params.top_k or None,
        top_p=0.5 if params.use_top_p else None,
        min_p=0.5 if params.use_min_p else None,
    )


def _segments(new_bucket: int, minimum: int = 32, max_segments: int = 8) -> tuple[int, ...]:
    size = max(minimum, new_bucket // max_segments)
    return tuple(range(size, new_bucket, size)) + (new_bucket,)


def _record(out, t, tok, lp, finished, stop_ids, pad_id):
    """Writes column ``t``: the token where the row is still running, pad afterwards; updates ``finished``."""
    out_tok, out_lp, out_mask = out
    emit = ~finished
    out_tok = out_tok.at[:, t].set(jnp.where(emit, tok, pad_id))
    out_lp = out_lp.at[:, t].set(jnp.where(emit, lp, 0.0))
    out_mask = out_mask.at[:, t].set(emit.astype(jnp.int32))
    is_stop = jnp.any(tok[:, None] == stop_ids[None, :], axis=-1)
    return (out_tok, out_lp, out_mask), finished | (emit & is_stop)


class _Step(NamedTuple):
    """A decode-step layout: the loop-carried cache it starts from, ``run(tokens, positions, cache, slot,
    key_valid) -> (logits, cache)`` (``key_valid`` covers the slot being written) and ``grow``."""

    init: Any
    run: Callable
    grow: Callable  # (cache, extra slots) -> the cache with ``extra`` empty slots appended


def _pad_slots(x: jax.Array, extra: int, axis: int) -> jax.Array:
    widths = [(0, 0)] * x.ndim
    widths[axis] = (0, extra)
    return jnp.pad(x, widths)


def _scan_step(model, weights, cache: KVCache) -> _Step:
    """Stacked weights and cache, layers scanned: no weight copies (use where memory is tight)."""

    def run(tok, pos, cache, slot, key_valid):
        return decode_step(model, weights, tok, pos, cache, slot, key_valid)

    def grow(cache, extra):
        return KVCache(*(with_logical_constraint(_pad_slots(c, extra, 3), CACHE_AXES) for c in cache))

    return _Step(cache, run, grow)


def _unrolled_step(model, weights, cache: KVCache) -> _Step:
    """Per-layer weights and caches, layers unrolled: no per-step slicing copies (fastest on CPU), at the
    price of one transient copy of the layer weights per generate call."""
    layers = split_layers(weights, model.config.num_layers)

    def constrain(c):
        return with_logical_constraint(c, CACHE_AXES[1:])  # rows over the mesh's batch axes

    init = (tuple(constrain(c) for c in cache.k), tuple(constrain(c) for c in cache.v))  # [L] x [B, K, S, Dh]

    def run(tok, pos, cache, slot, key_valid):
        logits, ks, vs = decode_step_unrolled(model, layers, tok, pos, *cache, slot, key_valid)
        return logits, (ks, vs)

    def grow(cache, extra):
        return tuple(tuple(constrain(_pad_slots(c, extra, 2)) for c in part) for part in cache)

    return _Step(init, run, grow)


_STEPS: dict[str, Callable[..., _Step]] = {"scan": _scan_step, "unrolled": _unrolled_step}


def _ragged_step(model, weights, cache: KVCache, first_slot: jax.Array, interpret: bool) -> _Step:
    """Stacked weights and ONE cache allocated for the whole length, attended through the ragged decode
    kernel (rows' valid slots ``[first_slot, slot]``): nothing to grow, so no segment copies."""

    step = ranged_decode_step(model, weights, first_slot, block=_kernel_block(interpret), interpret=interpret)

    def run(tok, pos, cache, slot, key_valid):
        del key_valid  # the kernel takes slot ranges
        return step(tok, pos, cache, slot)

    def grow(cache, extra):
        raise AssertionError("the ragged decode step's cache is allocated whole: one segment, never grown")

    return _Step(cache, run, grow)


def _kernel_block(interpret: bool) -> int:
    """Cache slots per grid step of the ragged kernel: small in interpret mode, so that tiny test caches
    span several blocks."""
    return 16 if interpret else kernels.DECODE_BLOCK


def _decode_cache_length(key: _ProgramKey, tp: int) -> int:
    """Slots of the cache the decode loop starts with: the first segment's end (the XLA step grows it), or
    the whole length rounded up to the kernel's block (the ragged kernel's cache, allocated once)."""
    if not _ragged(key):
        return tp + key.segments[0]
    block = _kernel_block(key.interpret)
    return -(-(tp + key.new_bucket) // block) * block


def _ragged(key: _ProgramKey) -> bool:
    return key.decode_attention is not None and key.decode_attention.impl == kernels.RAGGED_DECODE


def _log_decode_attention(key: _ProgramKey, model, rows: int, slots: int) -> None:
    """Names the decode step's attention in the start-up log and ``jrft compile`` (``kernels.recording``)."""
    if key.decode_attention is None:
        return
    cfg = model.config
    q = jax.ShapeDtypeStruct((rows, 1, cfg.num_heads, cfg.head_dim), model.dtype)
    k = jax.ShapeDtypeStruct((rows, cfg.num_kv_heads, slots, cfg.head_dim), jnp.dtype(key.cache_dtype))
    kernels.log_choice(key.decode_attention, q, k)


class _Counter:
    """Counts traces; hashable by identity, so it can be a static jit argument."""

    def __init__(self):
        self.n = 0


def _program(
    graphdef, key: _ProgramKey, counter: _Counter, state, tokens, mask, stop_ids, values, max_new, pad_id, rng
):
    counter.n += 1  # runs at trace time only: one per compile
    if key.gather_weights:
        state = gather_decode_weights(state, graphdef_dtype((graphdef, state)))
    model = nnx.merge(graphdef, state)
    cfg = model.config
    bp, tp = tokens.shape
    g, n = key.num_samples, key.new_bucket
    rows, s_total = bp * g, tp + n

    # XLA step: the cache grows segment by segment (one copy per segment) so that attention always reads a
    # whole, exactly filled-to-bucket array (a static slice of a bigger cache was materialised every layer
    # and step). Ragged kernel: one cache for the whole length; the prompts' part is filled, then padded.
    ragged = _ragged(key)
    s_decode = _decode_cache_length(key, tp)
    cache = init_cache(cfg, bp, tp if ragged else s_decode, jnp.dtype(key.cache_dtype))
    cache = KVCache(*(with_logical_constraint(c, CACHE_AXES) for c in cache))
    logits, cache = prefill(model, tokens, mask, cache)  # [Bp, V]
    # one prefill per prompt; its cache and logits serve all G samples
    cache = KVCache(*(with_logical_constraint(jnp.repeat(c, g, axis=1), CACHE_AXES) for c in cache))
    if ragged:
        extra = s_decode - tp
        cache = KVCache(*(with_logical_constraint(_pad_slots(c, extra, 3), CACHE_AXES) for c in cache))
    _log_decode_attention(key, model, rows, s_decode)
    logits = jnp.repeat(logits, g, axis=0)  # [R, V]
    mask_r = jnp.repeat(mask, g, axis=0).astype(bool)  # [R, Tp]
    n_real = jnp.sum(mask_r, axis=-1, dtype=jnp.int32)  # [R]: position of the first generated token
    prompt_valid = jnp.pad(mask_r, ((0, 0), (0, n)))  # [R, S], generated slots filled in per step below
    slots = jnp.arange(s_total, dtype=jnp.int32)
    weights = fuse_decode_weights(model, key.fuse)
    if ragged:
        step = _ragged_step(model, weights, cache, tp - n_real, key.interpret)
    else:
        step = _STEPS[key.layout](model, weights, cache)

    def constrain(x):
        return with_logical_constraint(x, ("batch",) + (None,) * (x.ndim - 1))

    out = (
        constrain(jnp.full((rows, n), pad_id, jnp.int32)),
        constrain(jnp.zeros((rows, n), jnp.float32)),
        constrain(jnp.zeros((rows, n), jnp.int32)),
    )
    finished = n_real == 0  # batch-padding rows never run
    tok, lp = select_next(jax.random.fold_in(rng, 0), logits, key.sampling, values)
    out, finished = _record(out, 0, tok, lp, finished, stop_ids, pad_id)
    carry = (jnp.int32(1), tok, finished, step.init, out)

    for j, end in enumerate(key.segments):
        s_att = tp + end
        if j:
            t, tok, finished, cache, out = carry
            carry = (t, tok, finished, step.grow(cache, end - key.segments[j - 1]), out)

        def cond(c, end=end):
            t, _, finished, _, _ = c
            return (t <= end) & (t < max_new) & ~jnp.all(finished)

        def body(c, s_att=s_att):
            t, tok, finished, cache, out = c
            slot = tp + t - 1  # where the previous token's k/v go
            if ragged:  # the kernel takes each row's slot range instead
                key_valid = None
            else:
                key_valid = jnp.where(slots[:s_att] < tp, prompt_valid[:, :s_att], slots[:s_att] <= slot)
            logits, cache = step.run(tok, n_real + t - 1, cache, slot, key_valid)
            tok, lp = select_next(jax.random.fold_in(rng, t), logits, key.sampling, values)
            out, finished = _record(out, t, tok, lp, finished, stop_ids, pad_id)
            return t + 1, tok, finished, cache, out

        carry = jax.lax.while_loop(cond, body, carry)

    t, _, finished, _, (out_tok, out_lp, out_mask) = carry
    stopped = finished & (n_real > 0)
    reason = jnp.where(stopped, FINISH_STOP, FINISH_LENGTH).astype(jnp.int32)
    return out_tok, out_mask, out_lp, jnp.sum(out_mask, axis=-1, dtype=jnp.int32), reason, t - 1


# Decode layout of the weights when gathered: the fsdp split of every parameter undone, the tensor split kept.
DECODE_RULES = {**LOGICAL_RULES, "embed": None}


def gather_decode_weights(state, dtype):
    """The model's base parameters in the compute ``dtype`` (norm weights and LoRA adapters as they are:
    the decoder applies those in their own dtype) and gathered whole over the mesh's fsdp axis, keeping
    their tensor-parallel split (``DECODE_RULES``), once per generate call. Without it the parameters stay
    sharded and XLA decides: it gathered all of Llama-3-1B's once before the decode loop but Llama-3-8B's
    layer by layer inside every decode step (v5p-8, ``jrft compile``), which moves the whole model over the
    interconnect for every token. Under no mesh it only casts."""

    def one(path, x):
        if not isinstance(x, nnx.Param) or isinstance(x, LoRAParam):
            return x
        value = x.get_value()
        name = str(getattr(path[-1], "key", path[-1])) if path else ""
        if jnp.issubdtype(value.dtype, jnp.floating) and not name.endswith("norm"):
            value = value.astype(dtype)
        axes = logical_axes_of(x)
        return x.replace(with_logical_constraint(value, axes, DECODE_RULES) if axes else value)

    return jax.tree_util.tree_map_with_path(one, state, is_leaf=lambda v: isinstance(v, nnx.Variable))


def program_platform(mesh: Mesh | None = None, state=None) -> str:
    """The platform (``"cpu"``, ``"gpu"``, ``"tpu"``) the generate program is compiled for, which picks the
    CPU-only XLA options and the default layout: that of the ``mesh``'s devices, else of the devices the
    parameters in ``state`` are placed on (arrays or ``ShapeDtypeStruct``s with a sharding), else of
    ``jax.devices()[0]``. Never the host's default backend: a mesh of device-less TPU devices
    (``jrft.aot.topology_devices``) compiles the TPU program on a CPU host."""
    devices = getattr(mesh, "devices", None)  # an AbstractMesh has none
    if devices is not None and np.size(devices):
        return np.asarray(devices).flat[0].platform
    for leaf in jax.tree.leaves(state):
        sharding = getattr(leaf, "sharding", None)
        if sharding is not None:
            return next(iter(sharding.device_set)).platform
    return jax.devices()[0].platform


def _compiler_options(platform: str) -> dict[str, Any] | None:
    """XLA:CPU's default copy insertion copies every loop-carried cache buffer twice per decode step as soon
    as the step both reads and updates it (measured on the compiled HLO); its region analysis proves the read
    precedes the in-place update and inserts no copy. CPU-only option, so only set on CPU."""
    if platform == "cpu":
        return {"xla_cpu_copy_insertion_use_region_analysis": True}
    return None


class Sampler:
    """Owns the compiled generate programs (jit's cache, keyed by bucket) and their counters.

    ``jrft.sampling.generate`` uses one process-wide ``Sampler``; a trainer may keep its own to read
    ``stats`` for its run only.
    """

    def __init__(self, compiler_options: dict[str, Any] | None = None):
        """``compiler_options``: extra XLA options for the generate program, e.g.
        ``{"xla_cpu_multi_thread_eigen": False}`` (measured +12% on an idle 2-core CPU in NOTES.md as a
        process flag; worse when another process holds a core), added to the CPU defaults."""
        self._counter = _Counter()
        self._calls = 0
        self._buckets: list[tuple[int, int, int, int]] = []
        self._compiler_options = compiler_options
        self._jitted: dict[str, Callable] = {}  # platform -> the jitted program (options differ per platform)

    def program(self, platform: str) -> Callable:
        """The jitted generate program for ``platform`` (``program_platform``), with that platform's XLA
        options; its static arguments are ``(graphdef, _ProgramKey, counter)``."""
        if platform not in self._jitted:
            options = {**(_compiler_options(platform) or {}), **(self._compiler_options or {})} or None
            self._jitted[platform] = jax.jit(_program, static_argnums=(0, 1, 2), compiler_options=options)
        return self._jitted[platform]

    @property
    def stats(self) -> SamplerStats:
        return SamplerStats(self._counter.n, self._calls, tuple(self._buckets))

    def generate(self, model, prompt_tokens, prompt_mask, **options) -> GenerationResult:
        """``jrft.sampling.generate(model, prompt_tokens, prompt_mask, sampler=self, **options)``."""
        return generate(model, prompt_tokens, prompt_mask, sampler=self, **options)

    def _run(self, platform: str, key: _ProgramKey, graphdef, state, tokens, *args):
        """Runs the program for ``key`` on padded ``tokens`` ``[Bp, Tpb]`` and the program's other dynamic
        arguments (under the caller's mesh), and counts the call and its bucket."""
        outs = self.program(platform)(graphdef, key, self._counter, state, tokens, *args)
        self._calls += 1
        bucket = (*tokens.shape, key.new_bucket, key.num_samples)
        if bucket not in self._buckets:
            self._buckets.append(bucket)
        return outs

    def lower(self, model, batch: int, prompt_length: int, *, mesh: Mesh, **options):
        """The generate program for ``batch`` prompts of ``prompt_length`` tokens, lowered without running it
        (AOT compilation, ``jrft compile``): the same program, key and argument shardings as :meth:`generate`
        (prompts padded to their buckets), for ``model = (graphdef, state)`` whose state may be
        ``ShapeDtypeStruct``s with shardings (e.g. for the devices of a TPU topology). ``options``: those
        of :func:`generate` that pick the program (``max_new_tokens``, required; ``num_samples``,
        ``temperature``, ``top_k``, ``top_p``, ``min_p``, ``cache_dtype``, ``fuse_projections``, ``layout``,
        ``gather_weights``, ``decode_attention``). Returns a ``jax.stages.Lowered``."""
        graphdef, state = model
        platform, params, key = _program_key(model, mesh, **options)
        bp, tpb = _padded_shape(batch, prompt_length, _batch_shards(mesh))
        rows = NamedSharding(mesh, logical_to_spec(("batch", None), (bp, tpb), mesh))
        rep = NamedSharding(mesh, PartitionSpec())

        def spec(shape, dtype, sharding=rep):
            return jax.ShapeDtypeStruct(shape, dtype, sharding=sharding)

        values = jax.tree.map(lambda v: spec(v.shape, v.dtype), jax.eval_shape(params.dynamic_values))
        prompts = spec((bp, tpb), jnp.int32, rows)
        with jax.set_mesh(mesh):
            return self.program(platform).lower(
                graphdef,
                key,
                self._counter,
                state,
                prompts,
                prompts,
                spec((MAX_STOP_IDS,), jnp.int32),
                values,
                spec((), jnp.int32),
                spec((), jnp.int32),
                spec((), jax.eval_shape(lambda: jax.random.key(0)).dtype),
            )


def _program_key(
    model,
    mesh: Mesh | None,
    *,
    max_new_tokens,
    num_samples=1,
    temperature=1.0,
    top_k=None,
    top_p=None,
    min_p=None,
    cache_dtype=None,
    fuse_projections=None,
    layout=None,
    gather_weights=False,
    decode_attention=None,
) -> tuple[str, SamplingParams, _ProgramKey]:
    """The generate program for ``model`` (a ``(graphdef, state)`` pair) and these options of
    :func:`generate`: its platform (``program_platform``), sampling parameters and static part (checked).
    Layout and projection fusion default by the program's platform (unrolled and fused on CPU, scanned on
    accelerators)."""
    platform = program_platform(mesh, model[1])
    params = SamplingParams(temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p)
    on_cpu = platform == "cpu"
    # the ragged kernel reads the stacked cache: the scan layout, also when requested on CPU
    layout = layout or ("unrolled" if on_cpu and decode_attention != kernels.RAGGED_DECODE else "scan")
    fuse_projections = on_cpu if fuse_projections is None else fuse_projections
    if layout not in _STEPS:
        raise ValueError(f"generate: layout must be one of {sorted(_STEPS)}, got {layout!r}")
    if max_new_tokens < 1:
        raise ValueError(f"generate: max_new_tokens must be >= 1, got {max_new_tokens}")
    if num_samples < 1:
        raise ValueError(f"generate: num_samples must be >= 1, got {num_samples}")
    nb = bucket_length(max_new_tokens, 32)
    cache_dtype = graphdef_dtype(model) if cache_dtype is None else cache_dtype
    cache = jnp.dtype(cache_dtype).name
    choice = _decode_choice(model, platform, layout, decode_attention)
    ragged = choice is not None and choice.impl == kernels.RAGGED_DECODE
    return (
        platform,
        params,
        _ProgramKey(
            num_samples,
            nb,
            (nb,) if ragged else _segments(nb),
            _structure(params),
            cache,
            fuse_projections,
            layout,
            bool(gather_weights),
            choice,
            ragged and platform != "tpu",
        ),
    )


def _decode_choice(model, platform: str, layout: str, requested: str | None):
    """The decode step's attention (``kernels.decode_attention_impl`` unless ``requested``), or None for the
    XLA step on CPU (which is neither logged nor changed: the default there). Returns an
    ``kernels.AttentionChoice`` or None."""
    if requested not in (None, kernels.XLA, kernels.RAGGED_DECODE):
        raise ValueError(
            f"generate: decode_attention must be None, {kernels.XLA!r} or {kernels.RAGGED_DECODE!r}, "
            f"got {requested!r}"
        )
    if requested == kernels.RAGGED_DECODE:
        if layout != "scan":
            raise ValueError(f"generate: decode_attention={requested!r} needs layout='scan', got {layout!r}")
        return kernels.AttentionChoice(kernels.RAGGED_DECODE, "requested (decode_attention)")
    if requested == kernels.XLA:
        return None if platform == "cpu" else kernels.AttentionChoice(kernels.XLA, "requested")
    if platform == "cpu":
        return None
    cfg = (nnx.merge(*model) if isinstance(model, tuple) else model).config
    choice = kernels.decode_attention_impl(
        platform, q_heads=cfg.num_heads, kv_heads=cfg.num_kv_heads, layout=layout
    )
    return kernels.forced(choice)


def graphdef_dtype(model) -> jnp.dtype:
    """The compute dtype of a ``Decoder`` (or of a ``(graphdef, state)`` pair): the default cache dtype."""
    if isinstance(model, tuple):
        model = nnx.merge(*model)
    return jnp.dtype(model.dtype)


def _batch_shards(mesh: Mesh | None) -> int:
    if mesh is None:
        return 1
    spec = logical_to_spec(("batch",), None, mesh)[0]
    axes = () if spec is None else (spec,) if isinstance(spec, str) else spec
    return math.prod(mesh.shape[a] for a in axes)


def _check_prompts(prompt_tokens, prompt_mask) -> tuple[np.ndarray, np.ndarray]:
    tokens = np.asarray(prompt_tokens)
    mask = np.ones_like(tokens) if prompt_mask is None else np.asarray(prompt_mask)
    if tokens.ndim != 2:
        raise ValueError(f"generate: prompt_tokens must be [batch, prompt_len], got shape {tokens.shape}")
    if mask.shape != tokens.shape:
        raise ValueError(f"generate: prompt_mask shape {mask.shape} != prompt_tokens shape {tokens.shape}")
    m = mask.astype(bool)
    # left padding: once a row starts, it stays real to the end
    empty = np.flatnonzero(~m.any(axis=-1))
    if empty.size:
        raise ValueError(f"generate: prompt row {int(empty[0])} has no tokens (its prompt_mask is all 0)")
    bad = np.flatnonzero(np.any(m[:, :-1] & ~m[:, 1:], axis=-1))
    if bad.size:
        raise ValueError(
            f"generate: prompts must be LEFT-padded; row {int(bad[0])} has padding after a token"
        )
    return tokens.astype(np.int32), m.astype(np.int32)


def _padded_shape(batch: int, prompt_length: int, shards: int) -> tuple[int, int]:
    """The prompt array the program sees: rows up to a multiple of ``shards``, length up to its bucket."""
    return -(-batch // shards) * shards, bucket_length(prompt_length)


def _pad_to_buckets(tokens: np.ndarray, mask: np.ndarray, shards: int, pad_id: int):
    """Left-pads the prompt length to its bucket and adds all-padding rows up to a multiple of ``shards``."""
    b, tp = tokens.shape
    bp, tpb = _padded_shape(b, tp, shards)
    tok_p = np.full((bp, tpb), pad_id, np.int32)
    mask_p = np.zeros((bp, tpb), np.int32)
    tok_p[:b, tpb - tp :], mask_p[:b, tpb - tp :] = tokens, mask
    return tok_p, mask_p


def _stop_array(stop_token_ids) -> jax.Array:
    if stop_token_ids is None:
        stop_token_ids = ()
    elif isinstance(stop_token_ids, int | np.integer):
        stop_token_ids = (int(stop_token_ids),)
    ids = sorted({int(i) for i in stop_token_ids})
    if len(ids) > MAX_STOP_IDS:
        raise ValueError(f"generate: at most {MAX_STOP_IDS} stop_token_ids, got {len(ids)}")
    return jnp.asarray(ids + [-1] * (MAX_STOP_IDS - len(ids)), jnp.int32)


DEFAULT_SAMPLER = Sampler()


def generate(
    model,
    prompt_tokens,
    prompt_mask,
    *,
    max_new_tokens: int,
    num_samples: int = 1,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    min_p: float | None = None,
    stop_token_ids: Sequence[int] | int | None = (),
    rng: jax.Array | int | None = None,
    pad_token_id: int = 0,
    cache_dtype=None,
    mesh: Mesh | None = None,
    fuse_projections: bool | None = None,
    layout: str | None = None,
    gather_weights: bool = False,
    decode_attention: str | None = None,
    sampler: Sampler | None = None,
) -> GenerationResult:
    """Samples ``num_samples`` completions of each left-padded prompt with a KV cache.

    Args:
      model: a ``jrft.models.Decoder`` or its ``(graphdef, state)`` from ``nnx.split``.
      prompt_tokens: ``[B, Tp]`` int, LEFT-padded prompts.
      prompt_mask: ``[B, Tp]`` 0/1, 1 for real tokens (None: all real).
      max_new_tokens: completion length limit ``Tn``.
      num_samples: G samples per prompt, contiguous in the output (row ``b * G + g``).
      temperature: 0 for greedy (then the G samples are identical), else the softmax temperature.
      top_k, top_p, min_p: filters (None/0, None/1.0, None/0.0 = off); see ``jrft.sampling.logits``.
      stop_token_ids: a row ends at the first of these (kept in the completion); at most ``MAX_STOP_IDS``.
      rng: a ``jax.random.key`` or an int seed (default 0). The output is a deterministic function of it.
      pad_token_id: written after a row ends (and used to pad prompts to their length bucket).
      cache_dtype: KV-cache dtype (default: the model's compute dtype); ``jnp.bfloat16`` halves its memory.
      mesh: shard prompt rows and the cache over the mesh's batch axes (data, fsdp).
      fuse_projections: fuse q/k/v and gate/up matmuls in the decode step (a transient copy of those
        weights). Default: on for CPU, off elsewhere (the platform of the mesh's devices, else of the
        parameters', see ``program_platform``; not the host's).
      layout: ``"unrolled"`` (per-layer weights and caches, layers unrolled; fastest on CPU, a transient copy
        of the layer weights) or ``"scan"`` (stacked weights and cache, layers scanned; with unfused
        projections no weight is copied). Default: unrolled on CPU, scan elsewhere (not measured on GPU/TPU).
      gather_weights: gather the fsdp-sharded parameters whole (tensor split kept), in the compute dtype,
        once at the start of the call (``gather_decode_weights``): fastest decode, at the price of one
        whole copy per device while it runs. Off: they stay sharded and the compiler gathers as it likes.
      decode_attention: the decode step's attention: None (by platform: the ragged decode kernel on TPU,
        ``kernels.decode_attention_impl``; ``JRFT_ATTENTION=xla`` forces the XLA step), ``"xla"`` (the XLA
        step over a cache grown segment by segment) or ``"ragged-decode"`` (the Pallas kernel over one
        preallocated cache; in Pallas interpret mode off TPU, for tests).
      sampler: whose compiled programs and counters to use (default: the process-wide ``DEFAULT_SAMPLER``).

    Returns:
      A ``GenerationResult`` with ``.tokens``, ``.mask``, ``.logprobs``, ``.lengths``, ``.finish_reason``
      (``[B*G, Tn]`` / ``[B*G]``).
    """
    sampler = sampler or DEFAULT_SAMPLER
    graphdef, state = model if isinstance(model, tuple) else nnx.split(model)
    tokens, mask = _check_prompts(prompt_tokens, prompt_mask)
    platform, params, key = _program_key(
        (graphdef, state),
        mesh,
        max_new_tokens=max_new_tokens,
        num_samples=num_samples,
        temperature=temperature,
        top_k=top_k,
        top_p=top_p,
        min_p=min_p,
        cache_dtype=cache_dtype,
        fuse_projections=fuse_projections,
        layout=layout,
        gather_weights=gather_weights,
        decode_attention=decode_attention,
    )
    stops = _stop_array(stop_token_ids)
    b = tokens.shape[0]
    tok_p, mask_p = _pad_to_buckets(tokens, mask, _batch_shards(mesh), pad_token_id)
    bp, tpb = tok_p.shape
    if rng is None:
        rng = jax.random.key(0)
    elif isinstance(rng, int):
        rng = jax.random.key(rng)
    args = (tok_p, mask_p)
    ctx = contextlib.nullcontext() if mesh is None else jax.set_mesh(mesh)
    with ctx:
        if mesh is not None:
            spec = logical_to_spec(("batch", None), (bp, tpb), mesh)
            args = tuple(jax.device_put(a, NamedSharding(mesh, spec)) for a in args)
            rep = NamedSharding(mesh, PartitionSpec())
            stops, rng = jax.device_put(stops, rep), jax.device_put(rng, rep)
        outs = sampler._run(
            platform,
            key,
            graphdef,
            state,
            *args,
            stops,
            params.dynamic_values(),
            jnp.int32(max_new_tokens),
            jnp.int32(pad_token_id),
            rng,
        )
    out_tok, out_mask, out_lp, lengths, reason, steps = outs
    r, n = b * num_samples, max_new_tokens
    return GenerationResult(
        tokens=out_tok[:r, :n],
        mask=out_mask[:r, :n],
        logprobs=out_lp[:r, :n],
        lengths=lengths[:r],
        finish_reason=reason[:r],
        prompt_tokens=jnp.asarray(np.repeat(tokens, num_samples, axis=0)),
        prompt_mask=jnp.asarray(np.repeat(mask, num_samples, axis=0)),
        decode_steps=int(steps),
        num_samples=num_samples,
        stats=sampler.stats,
    )
