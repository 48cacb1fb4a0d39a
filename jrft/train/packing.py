"""Padding-free update batches: variable-length sequences packed into fixed-length rows with segment ids.

A rollout row is ``[prompt (left-padded, Tp) | completion (right-padded, Tc)]`` (``jrft.train.rollout``) and a
preference row is a right-padded ``[T]``: every row is as long as the longest, so a batch whose completions
run from 10 to 128 tokens is mostly padding. Here the real tokens of each sequence are laid end to end into
``R`` rows of ``L`` tokens (first-fit decreasing), each sequence its own segment (``segment_ids`` 1, 2, ...;
0 = padding; positions restart at 0), so attention never crosses sequences and the forward runs over
``R * L`` instead of ``N * T`` positions.

Only the trunk's input changes. The results are mapped back to the padded layout before any loss sees them:

* rollouts (GRPO, PPO): ``pack_index [N, Tc]`` is the flat index into the micro-batch's ``[R * L]`` positions
  of the hidden state that predicts completion token ``j`` of row ``n``; the hidden states gathered there
  (``[N, Tc, D]``) go through the same LM head / value head as the padded batch's, and every loss (token-
  level, sequence-level, per-row normalisers) sees the same ``[N, Tc]`` values as without packing.
* pairs (DPO): per-token log-probs of the packed rows are summed per sequence (:func:`segment_sum` over
  ``pack_sequence``, the sequence each target token belongs to) into the ``[B]`` chosen / rejected sums.

Gradient accumulation splits a batch strided (micro-batch ``a`` holds rows ``a, a + A, ...``, see
``jrft.train.step``): sequences are packed per micro-batch (sequence ``n`` with ``n % A == a`` into packed
rows ``r`` with ``r % A == a``), so the split keeps each sequence with its packed row. A rollout's
``pack_index`` is local to its micro-batch (a forward over all rows packs them again with ``A = 1``); a pair
batch's sequence ids are the whole batch's, and ``packed_pair_logps`` finds the local ones, so the same
packed batch serves the reference forward before the step and each micro-batch inside it.

Packed shapes: ``L`` is the padded row length (already a bucket, so any sequence fits); the number of rows is
rounded up to one of at most ~8 values per batch size (:func:`packed_row_count`), so compiles stay few.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np

PACKED_KEYS = ("packed_tokens", "packed_attention_mask", "packed_positions", "packed_segment_ids")


def first_fit_decreasing(lengths: Sequence[int], capacity: int) -> list[list[int]]:
    """Indices of ``lengths`` packed into bins of ``capacity``: longest first, each into the first bin with
    room. Returns one list of indices per bin (in packing order)."""
    bins: list[list[int]] = []
    room: list[int] = []
    for i in sorted(range(len(lengths)), key=lambda k: -int(lengths[k])):
        n = int(lengths[i])
        if n > capacity:
            raise ValueError(f"a sequence of {n} tokens is longer than the packed row length {capacity}")
        for b, r in enumerate(room):
            if r >= n:
                bins[b].append(i)
                room[b] -= n
                break
        else:
            bins.append([i])
            room.append(capacity - n)
    return bins


def packed_row_count(needed: int, per_group: int, row_multiple: int = 1) -> int:
    """Rows per micro-batch for ``needed`` rows out of ``per_group`` sequences: rounded up to a multiple of
    ``ceil(per_group / 8)`` (at most ~8 shapes per batch size), then of ``row_multiple``."""
    step = max(1, math.ceil(per_group / 8))
    rows = max(1, math.ceil(needed / step) * step)
    return math.ceil(rows / row_multiple) * row_multiple


def pack_sequences(
    sequences: Sequence[np.ndarray],
    capacity: int,
    *,
    groups: int = 1,
    row_multiple: int = 1,
    pad_id: int = 0,
    extra: Mapping[str, Sequence[np.ndarray]] | None = None,
) -> dict[str, np.ndarray]:
    """Packs 1-D token arrays into ``[R, capacity]`` rows (first-fit decreasing within each micro-batch).

    Args:
      sequences: ``n`` int arrays (the real tokens of each sequence, in order).
      capacity: ``L``, the packed row length (>= the longest sequence).
      groups: micro-batches (``grad_accum``): sequence ``k`` goes to micro-batch ``k % groups``, into packed
        rows ``r`` with ``r % groups == k % groups`` (see the module docstring).
      row_multiple: ``R`` is a multiple of it (the batch's data-parallel shards).
      pad_id: fills the padding.
      extra: name -> ``n`` per-token arrays (same lengths as ``sequences``) laid out like the tokens
        (``[R, L]``, 0 on padding).

    Returns:
      ``packed_tokens``, ``packed_attention_mask`` (1 = real), ``packed_positions`` (0, 1, ... per segment),
      ``packed_segment_ids`` (1, 2, ... per row, 0 = padding), each ``[R, L]`` int32, the ``extra`` arrays,
      and ``seq_row [n]`` (the sequence's packed row *within its micro-batch*), ``seq_start [n]`` (its first
      column) and ``seq_local [n]`` (its index within its micro-batch, ``k // groups``).
    """
    n = len(sequences)
    if n % groups:
        raise ValueError(f"{n} sequences do not split into {groups} micro-batches")
    lengths = np.asarray([len(s) for s in sequences], np.int64)
    plans = [first_fit_decreasing(lengths[a::groups], capacity) for a in range(groups)]
    per_group = packed_row_count(
        max(len(p) for p in plans), n // groups, row_multiple // math.gcd(row_multiple, groups)
    )
    r_total = per_group * groups
    out = {
        "packed_tokens": np.full((r_total, capacity), pad_id, np.int32),
        "packed_attention_mask": np.zeros((r_total, capacity), np.int32),
        "packed_positions": np.zeros((r_total, capacity), np.int32),
        "packed_segment_ids": np.zeros((r_total, capacity), np.int32),
    }
    extra = dict(extra or {})
    for name, values in extra.items():
        out[name] = np.zeros((r_total, capacity), np.asarray(values[0]).dtype if n else np.int32)
    seq_row = np.zeros(n, np.int32)
    seq_start = np.zeros(n, np.int32)
    for a, plan in enumerate(plans):
        for local_row, members in enumerate(plan):
            r = local_row * groups + a  # the global packed row (strided like the sequences)
            t = 0
            for segment, m in enumerate(members, start=1):
                k = m * groups + a  # the sequence's global index
                length = int(lengths[k])
                cols = slice(t, t + length)
                out["packed_tokens"][r, cols] = sequences[k]
                out["packed_attention_mask"][r, cols] = 1
                out["packed_positions"][r, cols] = np.arange(length)
                out["packed_segment_ids"][r, cols] = segment
                for name, values in extra.items():
                    out[name][r, cols] = values[k]
                seq_row[k], seq_start[k] = local_row, t
                t += length
    out["seq_row"], out["seq_start"] = seq_row, seq_start
    out["seq_local"] = (np.arange(n) // groups).astype(np.int32)
    return out


def batch_shards(mesh) -> int:
    """How many ways the batch axis is split (data x fsdp); 1 without a mesh."""
    if mesh is None:
        return 1
    return int(np.prod([mesh.shape[a] for a in ("data", "fsdp") if a in mesh.shape]))


def padded_fraction(attention_masks: Sequence[np.ndarray]) -> float:
    """Padding positions / all positions of the arrays (an update's batches)."""
    total = sum(int(np.size(m)) for m in attention_masks)
    real = sum(int(np.sum(np.asarray(m) > 0)) for m in attention_masks)
    return 1.0 - real / max(total, 1)


# -- rollouts (GRPO, PPO) ------------------------------------------------------------------------------------


def pack_rollout(
    tokens: np.ndarray,
    attention_mask: np.ndarray,
    completion_length: int,
    *,
    groups: int = 1,
    row_multiple: int = 1,
    pad_id: int = 0,
    capacity: int | None = None,
) -> dict[str, np.ndarray]:
    """The packed forward input of rollout rows ``tokens [N, Tp + Tc]`` (attention mask alike).

    Each row's real tokens (those with ``attention_mask`` 1: its prompt, then its completion) become one
    segment. Returns the :data:`PACKED_KEYS` arrays (``[R, L]``, ``L = capacity`` or ``Tp + Tc``) and
    ``pack_index [N, Tc]`` int32: the flat index into the micro-batch's ``[R * L]`` positions of the position
    that predicts completion token ``j`` (the last real token before it: the padded rows' position
    ``Tp - 1 + j`` when a row's real tokens are contiguous, as sampled rollouts' are); 0 where the completion
    has no real token (masked out by every loss).
    """
    tokens, attention_mask = np.asarray(tokens), np.asarray(attention_mask) > 0
    n, t = tokens.shape
    tc = completion_length
    length = t if capacity is None else capacity
    packed = pack_sequences(
        [row[m] for row, m in zip(tokens, attention_mask, strict=True)],
        length,
        groups=groups,
        row_multiple=row_multiple,
        pad_id=pad_id,
    )
    rank = np.cumsum(attention_mask, axis=1) - 1  # [N, T] a real column's index within its sequence
    cols = np.arange(t - tc, t)  # the completion's columns
    real = attention_mask[:, cols]  # [N, Tc]
    base = packed["seq_row"][:, None].astype(np.int64) * length + packed["seq_start"][:, None]
    index = base + rank[:, cols] - 1  # the previous real token predicts a real completion token
    out = {k: packed[k] for k in PACKED_KEYS}
    out["pack_index"] = np.where(real, index, 0).astype(np.int32)
    return out


def completion_hidden_packed(
    model, batch: Mapping[str, jax.Array], *, dropout_key: jax.Array | None = None
) -> tuple[jax.Array, jax.Array]:
    """``([N, Tc, D] hidden, [N, Tc] targets)`` of packed rollout rows: the trunk runs on the packed rows,
    then the states that predict each completion token (and the tokens themselves) are gathered back into
    the padded completion layout. ``dropout_key``: a training forward's (LoRA dropout)."""
    tokens = batch["packed_tokens"]  # [R, L]
    hidden = model.hidden(
        tokens,
        batch["packed_attention_mask"],
        batch["packed_positions"],
        segment_ids=batch["packed_segment_ids"],
        dropout_key=dropout_key,
    )  # [R, L, D]
    r, length, d = hidden.shape
    index = batch["pack_index"]  # [N, Tc]
    flat = hidden.reshape(r * length, d)  # [R*L, D]
    targets = jnp.take(tokens.reshape(-1), jnp.minimum(index + 1, r * length - 1))  # [N, Tc]
    return jnp.take(flat, index, axis=0), targets  # [N, Tc, D], [N, Tc]


# -- pairs (DPO) ---------------------------------------------------------------------------------------------

# [B]-shaped entries of a preference batch that a packed batch keeps as they are.
PAIR_ROW_KEYS = ("group", "margin", "valid", "ref_chosen_logps", "ref_rejected_logps", "label")


def pack_pairs(
    batch: Mapping[str, np.ndarray], *, groups: int = 1, row_multiple: int = 1, pad_id: int = 0
) -> dict[str, np.ndarray]:
    """A host preference batch (``chosen_*`` / ``rejected_*`` ``[B, T]``, see ``jrft.data.batching``) as
    packed rows: the chosen and rejected sequences of every pair, each a segment.

    Returns the :data:`PACKED_KEYS` arrays, ``packed_loss_mask [R, L]`` (the sequences' loss masks, 0 on
    each segment's first token, which no position predicts), ``pack_sequence [R, L]`` int32 (the sequence
    of each token: chosen ``i`` -> ``i``, rejected ``i`` -> ``B + i``; ``2B`` on padding), ``pack_pairs [R]``
    (``B``, so that a micro-batch finds its local indices: ``packed_pair_logps``), the batch's ``[B]``
    entries unchanged, and ``valid [B]`` (all ones unless the batch had it)."""
    b = batch["chosen_tokens"].shape[0]
    if b % groups:
        raise ValueError(f"{b} pairs do not split into {groups} micro-batches")
    local = b // groups
    # Sequence k of the packed list goes to micro-batch k % A (pack_sequences); there, its index m = k // A
    # is chosen for m < B/A and rejected otherwise, of pair ``(m % (B/A)) * A + k % A``: both sequences of a
    # pair land in that pair's micro-batch (the strided split puts pair i in micro-batch i % A).
    seqs, masks, ids = [], [], []
    for k in range(2 * b):
        a, m = k % groups, k // groups
        pair, side = (m % local) * groups + a, "chosen" if m < local else "rejected"
        real = batch[f"{side}_attention_mask"][pair] > 0
        seqs.append(np.asarray(batch[f"{side}_tokens"][pair])[real])
        mask = np.asarray(batch[f"{side}_loss_mask"][pair], np.int32)[real].copy()
        mask[:1] = 0  # nothing predicts a sequence's first token (the padded batch skips column 0 too)
        masks.append(mask)
        ids.append(np.full(int(real.sum()), pair + (b if m >= local else 0) + 1, np.int32))  # 0: padding
    packed = pack_sequences(
        seqs,
        batch["chosen_tokens"].shape[1],
        groups=groups,
        row_multiple=row_multiple,
        pad_id=pad_id,
        extra={"packed_loss_mask": masks, "pack_sequence": ids},
    )
    out = {k: packed[k] for k in (*PACKED_KEYS, "packed_loss_mask")}
    out["pack_sequence"] = np.where(packed["pack_sequence"] > 0, packed["pack_sequence"] - 1, 2 * b)
    out["pack_pairs"] = np.full(out["packed_tokens"].shape[0], b, np.int32)
    for key in PAIR_ROW_KEYS:
        if key in batch:
            out[key] = batch[key]
    out.setdefault("valid", np.ones(b, np.int32))
    return out


def segment_sum(values: jax.Array, segments: jax.Array, num_segments: int) -> jax.Array:
    """``[R, L]`` values summed by ``segments [R, L]`` (ids ``>= num_segments`` are dropped): ``[S]``."""
    return jax.ops.segment_sum(
        values.reshape(-1), segments.reshape(-1), num_segments=num_segments + 1, mode="drop"
    )[:num_segments]
