"""What a GRPO round and a PPO round share, as functions: their options, the rollout's split into
mini-batches, the metrics of a round, and the table of sample completions.

Mini-batches (:func:`mini_batches`): each epoch (PPO) or iteration (GRPO) passes over a fresh permutation of
the rollout's rows, split into ``num_mini_batches`` parts; one mini-batch is all rows in order. Shuffled
rather than contiguous so that each optimizer step sees an unbiased sample of the rollout: contiguous slices
hold whole prompt groups, so every step would see only a fraction of the prompts, and every epoch the same
split (TRL shuffles its GRPO generation batch for the same reason). The permutation is a function of the
state's rng, its step and the epoch, so a resumed run shuffles the same way.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import numpy as np

from jrft.parallel.distributed import gather_rows
from jrft.train.packing import batch_shards, pack_rollout, padded_fraction
from jrft.train.placement import device_batch
from jrft.train.rollout import Rollout, append_completions


@dataclasses.dataclass(frozen=True)
class RoundOptions:
    """Where and how a GRPO or PPO round runs (the same for both).

    Attributes:
      mesh: the run's mesh; state_sharding: the jit shardings of the round's state (the update runs inside
        the mesh).
      pad_token_id: fills rollout rows.
      grad_accum: micro-batches per mini-batch.
      completions_path: JSONL table of sample completions (None: not written).
      logits_chunk_size: log-probs over LM-head chunks of this many positions (0 = off).
      offload_reference: keep the frozen reference in host memory.
      gather_sampler_weights: the sampler gathers the fsdp-sharded weights once per call
        (``jrft.sampling.generate``'s ``gather_weights``).
      pack_rows: the update's forward runs on packed rows (``jrft.train.packing``), not padded ones.
    """

    mesh: Any
    state_sharding: Any
    pad_token_id: int
    grad_accum: int = 1
    completions_path: str | None = None
    logits_chunk_size: int = 0
    offload_reference: bool = False
    gather_sampler_weights: bool = False
    pack_rows: bool = False


def mini_batches(state, n: int, num_mini_batches: int, epoch: int) -> list[np.ndarray]:
    """Row indices of each mini-batch of one pass over ``n`` rows (see the module docstring); ``state`` is
    the train state whose ``rng`` and ``step`` seed the permutation."""
    if num_mini_batches == 1:
        return [np.arange(n)]
    seed = [*np.asarray(jax.device_get(state.rng)).tolist(), int(state.step), epoch]
    order = np.random.default_rng(seed).permutation(n)
    return np.array_split(order, num_mini_batches)


def take_rows(batch: Mapping[str, jax.Array], rows: np.ndarray) -> dict[str, jax.Array]:
    """The mini-batch of ``rows`` (all rows in order: the batch itself, no copy)."""
    n = next(iter(batch.values())).shape[0]
    if len(rows) == n and np.array_equal(rows, np.arange(n)):
        return dict(batch)
    return {k: v[rows] for k, v in batch.items()}


class UpdateInputs:
    """The model inputs of a round's forwards: the rollout's padded rows (``tokens``, ``attention_mask``), or
    with ``options.pack_rows`` packed rows (``jrft.train.packing.pack_rollout``); either way the objectives
    see ``[N, Tc]`` completion values. Remembers the attention masks of what the updates ran on, for
    ``padded_fraction`` (padding positions / all positions of the update's batches)."""

    def __init__(self, rollout: Rollout, options: RoundOptions):
        if options.pack_rows and jax.process_count() > 1:
            raise ValueError("train.pack_rows: packed update rows need a single-process run")
        self.rollout, self.options = rollout, options
        self.masks: list[np.ndarray] = []
        self._full: dict[str, jax.Array] | None = None
        self._full_mask: np.ndarray | None = None

    def _host(self, rows: np.ndarray, groups: int) -> dict[str, np.ndarray]:
        r, o = self.rollout, self.options
        if not o.pack_rows:
            return {"tokens": r.tokens[rows], "attention_mask": r.attention_mask[rows]}
        return pack_rollout(
            r.tokens[rows],
            r.attention_mask[rows],
            r.completion_mask.shape[1],
            groups=groups,
            row_multiple=batch_shards(o.mesh),
            pad_id=o.pad_token_id,
        )

    def full(self) -> dict[str, jax.Array]:
        """Inputs over all rows in order (old / reference log-probs, values, reward-model scores)."""
        if self._full is None:
            host = self._host(np.arange(self.rollout.num_rows), 1)
            self._full_mask = host.get("packed_attention_mask")
            self._full = device_batch(host, self.options.mesh)
        return self._full

    def mini(self, rows: np.ndarray) -> dict[str, jax.Array]:
        """Inputs of one update over ``rows`` (packed per micro-batch, see ``jrft.train.packing``)."""
        groups = self.options.grad_accum
        everything = len(rows) == self.rollout.num_rows and np.array_equal(rows, np.arange(len(rows)))
        if not self.options.pack_rows:
            return take_rows(self.full(), rows)
        if everything and groups == 1:  # the packing of all rows is this update's
            full = self.full()
            self.masks.append(self._full_mask)
            return full
        host = self._host(rows, groups)
        self.masks.append(host["packed_attention_mask"])
        return device_batch(host, self.options.mesh)

    def padded_fraction(self) -> float:
        if not self.options.pack_rows:  # every pass takes each row once: the rollout's own fraction
            return padded_fraction([self.rollout.attention_mask])  # (multi-host: this process's rows)
        return padded_fraction(self.masks)


def round_metrics(rollout: Rollout, update_metrics: Sequence[Mapping[str, Any]], sample_s: float) -> dict:
    """The metrics every round reports: the mean of its optimizer steps' metrics (host values), and the
    completion lengths, truncated fraction and sampling speed over all processes' rows (collective)."""
    metrics = {k: float(np.mean([m[k] for m in update_metrics])) for k in update_metrics[0]}
    lengths = gather_rows(rollout.completion_mask.sum(axis=1))
    metrics.update(
        {
            "completion_length": float(lengths.mean()),
            "truncated_fraction": float(gather_rows(rollout.truncated).mean()),
            "rollout_tokens_per_s": float(lengths.sum()) / max(sample_s, 1e-9),
        }
    )
    return metrics


@dataclasses.dataclass
class CompletionLog:
    """The JSONL table of sample completions: the first ``max_rows`` rows of every ``every``-th round
    (``every`` 0 or no ``path``: never), written by process 0."""

    path: str | None
    every: int
    max_rows: int

    def write(self, rollout: Rollout, round_index: int, extra: Mapping[str, np.ndarray] | None = None):
        if not self.path or not self.every or round_index % self.every or jax.process_index() != 0:
            return
        append_completions(self.path, rollout, round_index=round_index, max_rows=self.max_rows, extra=extra)
