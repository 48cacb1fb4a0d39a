"""A sampling session that keeps its KV cache between calls: multi-turn rollouts continue where they stopped.

``generate`` starts from prompts and throws its cache away. A :class:`Session` holds ``R`` rows' cache
``[L, R, K, S, Dh]`` (``S`` slots) between *turns*. Each :meth:`Session.turn` call

1. appends a chunk of tokens per row (``[R, C]``, left-padded inside the chunk; the first turn's chunk is the
   prompt, a later one the row's last sampled token followed by the environment's tokens) with ONE prefill
   forward at slots ``[fill, fill + C)`` against everything already cached, then
2. decodes every row that is ``active`` until its stop token or its own ``budget``, all rows sharing one
   slot counter.

Rows finish independently: a row that has stopped (or is not active) keeps computing in lock-step but writes
nothing valid; its slots are holes that a per-row validity mask ``valid [R, S]`` hides from attention, and
position ids are per row (``pos [R]``, the count of real tokens), so every token sees exactly the real
tokens before it, as in a forward over the final sequence (tested against teacher forcing). A row's last
sampled token is not yet in the cache when a turn returns (nothing has attended to it): the next chunk
starts with it.

Slots are spent by every row at the pace of the longest one (holes), so a session can run out of slots; then
:meth:`Session.turn` rebuilds the cache from the rows' full sequences (one prefill, counted in ``rebuilds``;
the cache grows when even that would not fit) and goes on. Layout: stacked layers, scanned
(``decode_step``); the decode loop runs in segments, as ``generate``'s, each attending to a static prefix of
slots covering what it can fill (the turn's first free slot rounded up to 128, plus the segment's end: one
program per such base), holes masked.

Multi-host: a session is one global program over the rows of all processes under the global mesh (the cache's
rows sharded over the mesh's batch axes). Every process calls :meth:`Session.turn` with the same chunks,
flags and budgets for ALL rows (``jrft.agentic.rollout`` gathers them) and gets back every row's samples, so
the host bookkeeping (sequences, rebuilds) is the same everywhere and each row samples what it samples in a
one-process run on the same mesh.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding

from jrft.models.decoder import CACHE_AXES, KVCache, init_cache
from jrft.parallel.distributed import host_array
from jrft.parallel.sharding import logical_to_spec
from jrft.sampling.decode import decode_step, fuse_decode_weights
from jrft.sampling.generate import (
    _compiler_options,
    _record,
    _segments,
    _stop_array,
    _structure,
    bucket_length,
    graphdef_dtype,
    program_platform,
)
from jrft.sampling.logits import SamplingParams, select_next


@dataclasses.dataclass(frozen=True)
class _TurnKey:
    new_bucket: int
    base: int  # slots attended by the chunk's prefill: a bucket >= fill + chunk width
    segments: tuple[int, ...]  # decode step t runs in the first segment whose end >= t ...
    attends: tuple[int, ...]  # ... attending to that segment's static slot prefix (>= base + end)
    sampling: SamplingParams
    fuse: bool


def _turn_program(graphdef, key: _TurnKey, state, cache, valid, pos, fill, chunk, chunk_mask, active, budget,
                  stop_ids, values, pad_id, rng):  # fmt: skip
    model = nnx.merge(graphdef, state)
    r, c = chunk.shape
    n = key.new_bucket
    chunk_mask = chunk_mask.astype(bool)
    # 1. the chunk: one prefill at slots [fill, fill + C) against what is cached
    positions = jnp.maximum(pos[:, None] + jnp.cumsum(chunk_mask, axis=1, dtype=jnp.int32) - 1, 0)  # [R, C]
    valid = jax.lax.dynamic_update_slice(valid, chunk_mask, (0, fill))  # [R, S]
    logits, cache = model.forward_with_cache(
        chunk, positions, cache, fill, valid[:, : key.base].astype(jnp.int32), last_only=True
    )
    logits = logits[:, 0]  # [R, V]
    pos = pos + jnp.sum(chunk_mask, axis=1, dtype=jnp.int32)
    fill = fill + c
    weights = fuse_decode_weights(model, key.fuse)
    out = (
        jnp.full((r, n), pad_id, jnp.int32),
        jnp.zeros((r, n), jnp.float32),
        jnp.zeros((r, n), jnp.int32),
    )
    tok, lp = select_next(jax.random.fold_in(rng, 0), logits, key.sampling, values)
    out, stopped = _record(out, 0, tok, lp, ~active, stop_ids, pad_id)
    count = active.astype(jnp.int32)
    finished = stopped | (count >= budget)

    carry = (jnp.int32(1), tok, finished, stopped, count, cache, valid, pos, fill, out)
    # The loop in segments of growing attended prefixes, as generate's (attention over the whole cache from
    # the first step made a long turn ~3x slower on CPU).
    for end, a in zip(key.segments, key.attends, strict=True):

        def cond(carry, end=end):
            t, _, finished, *_ = carry
            return (t <= end) & (t < n) & ~jnp.all(finished)

        def body(carry, a=a):
            t, tok, finished, stopped, count, cache, valid, pos, fill, out = carry
            running = ~finished  # these rows write their last token at slot `fill`
            valid = jax.lax.dynamic_update_slice(valid, running[:, None], (0, fill))
            logits, cache = decode_step(model, weights, tok, pos, cache, fill, valid[:, :a])
            pos, fill = pos + running.astype(jnp.int32), fill + 1
            tok, lp = select_next(jax.random.fold_in(rng, t), logits, key.sampling, values)
            out, stopped = _record(out, t, tok, lp, finished, stop_ids, pad_id)
            count = count + running.astype(jnp.int32)
            return t + 1, tok, stopped | (count >= budget), stopped, count, cache, valid, pos, fill, out

        carry = jax.lax.while_loop(cond, body, carry)
    _, _, _, stopped, count, cache, valid, pos, fill, (out_tok, out_lp, out_mask) = carry
    return cache, valid, pos, fill, out_tok, out_lp, out_mask, count, stopped & active


def _zeros(shape: tuple[int, ...], dtype, axes: Sequence[str | None], mesh) -> jax.Array:
    """Zeros of ``shape`` placed over ``mesh`` by logical ``axes``, built shard by shard on the host: no
    device holds (and no process allocates) more than its own shards."""
    sharding = NamedSharding(mesh, logical_to_spec(axes, shape, mesh))
    zero = np.zeros((), jnp.dtype(dtype))
    return jax.make_array_from_callback(shape, sharding, lambda index: np.broadcast_to(zero, shape)[index])


@dataclasses.dataclass
class TurnResult:
    """One turn's samples, host arrays: ``tokens``/``logprobs`` ``[R, N]`` (row ``r``'s first ``lengths[r]``
    entries are its turn), ``lengths [R]`` and ``stopped [R]`` (ended with a stop token)."""

    tokens: np.ndarray
    logprobs: np.ndarray
    lengths: np.ndarray
    stopped: np.ndarray


class Session:
    """``rows`` rows' KV cache of ``slots`` slots kept between turns (see the module docstring).

    Args:
      model: a ``Decoder``; its parameters are read at construction (a session serves one rollout).
      rows: R.
      slots: cache capacity ``S`` (rounded up to a bucket); a turn that would pass it rebuilds the cache.
      max_new_tokens: the most tokens one turn may sample (the output width of every turn, so that turns of
        shrinking budgets share one program).
      temperature, top_k, top_p: sampling; stop_token_ids end a row's turn (kept in its tokens).
      rng: a ``jax.random.key``; turn ``k`` samples with ``fold_in(rng, k)``.
    """

    _jitted: dict[str, Any] = {}  # platform -> the jitted turn program

    def __init__(self, model, rows: int, slots: int, *, max_new_tokens: int = 256, temperature=1.0,
                 top_k=None, top_p=None, stop_token_ids: Sequence[int] = (), pad_token_id: int = 0, rng=None,
                 mesh=None):  # fmt: skip
        self.graphdef, self.state = nnx.split(model)
        self.dtype = graphdef_dtype((self.graphdef, self.state))
        self.config = model.config
        self.rows, self.slots = rows, bucket_length(slots, 32)
        self.new_bucket = bucket_length(max_new_tokens, 32)
        self.params = SamplingParams(temperature=temperature, top_k=top_k, top_p=top_p)
        self.stops, self.pad_id = _stop_array(stop_token_ids), pad_token_id
        self.rng = jax.random.key(0) if rng is None else rng
        self.mesh = mesh
        self.platform = program_platform(mesh, self.state)
        self.fuse = self.platform == "cpu"  # fused projections on CPU, as generate
        self.sequences: list[list[int]] = [[] for _ in range(rows)]  # every token given or sampled, per row
        self.pending: list[list[int]] = [[] for _ in range(rows)]  # given or sampled, not yet in the cache
        self.turns, self.rebuilds = 0, 0
        self._reset()

    def _reset(self) -> None:
        if self.mesh is None:
            self.cache = init_cache(self.config, self.rows, self.slots, self.dtype)
        else:  # rows over the mesh's batch axes, as the program keeps them; each process fills its own shards
            c = self.config
            shape = (c.num_layers, self.rows, c.num_kv_heads, self.slots, c.head_dim)  # init_cache's
            self.cache = KVCache(*(_zeros(shape, self.dtype, CACHE_AXES, self.mesh) for _ in range(2)))
        self.valid = jnp.zeros((self.rows, self.slots), bool)
        self.pos = jnp.zeros((self.rows,), jnp.int32)
        self.fill = 0

    @classmethod
    def _program(cls, platform: str = "cpu"):
        """The jitted turn program for ``platform`` (with generate's XLA options for it: on CPU, no copy of
        the loop-carried cache per step)."""
        if platform not in cls._jitted:
            cls._jitted[platform] = jax.jit(
                _turn_program,
                static_argnums=(0, 1),
                donate_argnums=(3,),
                compiler_options=_compiler_options(platform),
            )
        return cls._jitted[platform]

    def turn(
        self, chunks: Sequence[Sequence[int]], active: Sequence[bool], budget: Sequence[int]
    ) -> TurnResult:
        """Appends ``chunks[r]`` to row ``r`` (after its pending last token), then samples up to ``budget[r]``
        tokens for every ``active`` row. Returns this turn's samples."""
        for r, chunk in enumerate(chunks):
            self.pending[r] += list(chunk)
            self.sequences[r] += list(chunk)
        if max(budget) > self.new_bucket:
            raise ValueError(f"Session.turn: budget {max(budget)} > max_new_tokens {self.new_bucket}")
        new_bucket = self.new_bucket
        width = bucket_length(max(len(p) for p in self.pending), 16)
        if self.fill + width + new_bucket > self.slots:  # out of slots: rebuild from the full sequences
            self.pending = [list(s) for s in self.sequences]
            width = bucket_length(max(len(p) for p in self.pending), 16)
            self.slots = max(self.slots, bucket_length(width + new_bucket, 32))  # grow if even that won't fit
            self.rebuilds += 1
            self._reset()
        tokens = np.full((self.rows, width), self.pad_id, np.int32)
        mask = np.zeros((self.rows, width), np.int32)
        for r, p in enumerate(self.pending):
            if p:
                tokens[r, width - len(p) :], mask[r, width - len(p) :] = p, 1
        # the attended prefix: the filled slots rounded up to 128 (a power of two attended up to 2x the filled
        # slots late in a trajectory, measured 2-3x slower per step there; each base is one more program)
        base = min(-(-(self.fill + width) // 128) * 128, self.slots)
        segments = _segments(new_bucket)
        attends = tuple(min(base + end, self.slots) for end in segments)
        key = _TurnKey(new_bucket, base, segments, attends, _structure(self.params), self.fuse)
        args = (
            self.state, self.cache, self.valid, self.pos, jnp.int32(self.fill), jnp.asarray(tokens),
            jnp.asarray(mask), jnp.asarray(np.asarray(active, bool)),
            jnp.asarray(np.asarray(budget, np.int32)),
            self.stops, self.params.dynamic_values(), jnp.int32(self.pad_id),
            jax.random.fold_in(self.rng, self.turns),
        )  # fmt: skip
        ctx = jax.set_mesh(self.mesh) if self.mesh is not None else contextlib.nullcontext()
        with ctx:
            outs = self._program(self.platform)(self.graphdef, key, *args)
        self.cache, self.valid, self.pos, fill, out_tok, out_lp, out_mask, count, stopped = outs
        self.fill = int(host_array(fill))
        self.turns += 1
        # multi-host: every process gets every row (collective gathers; rows span processes)
        tok, lp, lengths, stopped = (host_array(x) for x in (out_tok, out_lp, count, stopped))
        self.pending = [[] for _ in range(self.rows)]
        for r in range(self.rows):
            n = int(lengths[r])
            if n:
                ids = tok[r, :n].tolist()
                self.sequences[r] += ids
                self.pending[r] = ids[-1:]  # the last sampled token is not in the cache yet
        return TurnResult(tok, lp, lengths, stopped)
