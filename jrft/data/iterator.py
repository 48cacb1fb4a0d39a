"""A deterministic, resumable, process-sharded batch iterator.

The stream: epoch ``e`` visits the examples in the order ``permutation(seed, e)`` (or in order when
``shuffle`` is off); SFT packing then groups that order into packed rows. Rows ("units") of consecutive epochs
form one endless stream, cut into global batches of ``batch_size`` units (a batch may straddle an epoch
boundary, so nothing is dropped and every batch has the same number of rows).

Multi-host: every process computes the same stream and takes its own contiguous slice of each global batch
(``batch_size / process_count`` rows), so processes read disjoint rows and together exactly the global batch.
The padded length is the bucket of the longest row in the *global* batch, so all processes build arrays of
the same shape (a requirement for assembling one global array).

Position: ``state_dict()`` is ``{"epoch", "offset", "step", ...}`` (plain ints, JSON-safe: the checkpoint
stores it); ``load_state_dict`` restores it exactly, and the next batch is the one an uninterrupted
iterator would have produced.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import numpy as np

from jrft.data.batching import BATCH_KINDS, bucket_length, pack_first_fit


class BatchIterator:
    """Endless training batches over encoded examples (see the module docstring).

    Args:
      examples: encoded examples of one batch kind (:mod:`jrft.data.encode`).
      kind: ``"sft"``, ``"preference"`` or ``"prompt"``.
      batch_size: global rows per batch (all processes together).
      pad_id: the padding token id.
      buckets: int multiple or sorted list of lengths (:func:`~jrft.data.batching.bucket_length`).
      max_length: cap for int buckets, and the packing capacity.
      seed: shuffling seed (the run seed).
      shuffle: reshuffle each epoch.
      packing: pack several SFT examples per row (``kind == "sft"`` only).
      process_index, process_count: this process's slice of every global batch (default: JAX's).
    """

    def __init__(
        self,
        examples: Sequence[dict],
        *,
        kind: str,
        batch_size: int,
        pad_id: int = 0,
        buckets: int | Sequence[int] = 64,
        max_length: int | None = None,
        seed: int = 0,
        shuffle: bool = True,
        packing: bool = False,
        process_index: int | None = None,
        process_count: int | None = None,
    ):
        if not examples:
            raise ValueError("BatchIterator: no examples")
        if packing and kind != "sft":
            raise ValueError(f"packing applies to SFT batches only, not {kind!r}")
        if packing and max_length is None:
            raise ValueError("packing needs max_length (the packed row capacity)")
        if process_index is None or process_count is None:
            import jax

            process_index, process_count = jax.process_index(), jax.process_count()
        if batch_size % process_count:
            raise ValueError(f"batch_size={batch_size} is not divisible by process_count={process_count}")
        if not 0 <= process_index < process_count:
            raise ValueError(f"process_index={process_index} not in [0, {process_count})")
        self.examples = examples
        self.kind = kind
        self.unit_length, self.collate = BATCH_KINDS[kind]
        self.batch_size, self.pad_id = batch_size, pad_id
        self.buckets, self.max_length = buckets, max_length
        self.seed, self.shuffle, self.packing = seed, shuffle, packing
        self.process_index, self.process_count = process_index, process_count
        self.local_batch_size = batch_size // process_count
        self.lengths = [self.unit_length(examples, [i]) for i in range(len(examples))]
        self.epoch, self.offset, self.step = 0, 0, 0
        self.shapes_seen: set[tuple[int, int]] = set()  # (rows, padded length): one compilation each
        self._cache: tuple[int, list[list[int]]] | None = None

    # --- the stream --------------------------------------------------------------------------------------

    def order(self, epoch: int) -> np.ndarray:
        """Example indices in the order epoch ``epoch`` visits them."""
        n = len(self.examples)
        if not self.shuffle:
            return np.arange(n)
        return np.random.default_rng([self.seed, epoch]).permutation(n)

    def units(self, epoch: int) -> list[list[int]]:
        """The batch rows of epoch ``epoch``: lists of example indices (one index unless packing)."""
        if self._cache is None or self._cache[0] != epoch:
            order = self.order(epoch)
            if self.packing:
                rows = pack_first_fit(order, self.lengths, self.max_length)
            else:
                rows = [[int(i)] for i in order]
            self._cache = (epoch, rows)
        return self._cache[1]

    def next_units(self) -> list[list[int]]:
        """The next global batch of units, advancing the position."""
        out: list[list[int]] = []
        while len(out) < self.batch_size:
            units = self.units(self.epoch)
            take = units[self.offset : self.offset + self.batch_size - len(out)]
            out.extend(take)
            self.offset += len(take)
            if self.offset >= len(units):
                self.epoch, self.offset = self.epoch + 1, 0
        self.step += 1
        return out

    def __iter__(self) -> Iterator[dict]:
        return self

    def __next__(self) -> dict:
        return self.collate_units(self.next_units())

    def local_units(self, units: list[list[int]]) -> list[list[int]]:
        """This process's contiguous slice of the global batch ``units``."""
        start = self.process_index * self.local_batch_size
        return units[start : start + self.local_batch_size]

    def collate_units(self, units: list[list[int]]) -> dict:
        """This process's rows of the global batch ``units`` as padded arrays, padded to the bucket of the
        longest row of the *global* batch (every process builds the same shape). Empty units are filler
        rows (all padding)."""
        longest = max(self.unit_length(self.examples, u) for u in units if u)
        length = bucket_length(longest, self.buckets, self.max_length)
        local = self.local_units(units)
        self.shapes_seen.add((len(local), length))
        return self.collate(self.examples, local, length, self.pad_id)

    # --- position --------------------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """The exact position after the last batch returned (JSON-safe). A loop that prefetches batches
        must save the state that belongs to the last batch it trained on."""
        return {
            "epoch": self.epoch,
            "offset": self.offset,
            "step": self.step,
            "seed": self.seed,
            "num_examples": len(self.examples),
            "batch_size": self.batch_size,
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restores a position saved by :meth:`state_dict` (checked against this iterator's data)."""
        for key, mine in (
            ("seed", self.seed),
            ("num_examples", len(self.examples)),
            ("batch_size", self.batch_size),
        ):
            if key in state and int(state[key]) != mine:
                raise ValueError(
                    f"cannot resume the data iterator: the checkpoint has {key}={state[key]}, "
                    f"this run has {mine} "
                    "(the data or config changed since the checkpoint)"
                )
        self.epoch, self.offset, self.step = int(state["epoch"]), int(state["offset"]), int(state["step"])


def eval_batches(
    examples: Sequence[dict],
    *,
    process_index: int = 0,
    process_count: int = 1,
    max_batches: int | None = None,
    **layout: Any,
) -> Iterator[dict]:
    """One ordered pass for evaluation, batched as :class:`BatchIterator` batches (``layout``: its ``kind``,
    ``batch_size``, ``pad_id``, ``buckets``, ``max_length``). The last batch is filled with empty rows;
    ``valid [B]`` marks the real ones. Each process gets its slice of every global batch."""
    if not examples:
        return
    batcher = BatchIterator(
        examples, shuffle=False, process_index=process_index, process_count=process_count, **layout
    )
    n, size = len(examples), batcher.batch_size
    for b, start in enumerate(range(0, n, size)):
        if max_batches is not None and b >= max_batches:
            return
        units: list[list[int]] = [[i] for i in range(start, min(start + size, n))]
        units += [[] for _ in range(size - len(units))]
        batch = batcher.collate_units(units)
        batch["valid"] = np.asarray([1 if u else 0 for u in batcher.local_units(units)], np.int32)
        yield batch
