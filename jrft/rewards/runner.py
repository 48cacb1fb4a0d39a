"""The host-side reward runner: every reward function once per batch, concurrently, timed out and isolated.

How each function runs:

- plain functions: each in its own daemon thread. Python threads cannot be killed, so a function still
  running at the timeout is *abandoned*: its completions get ``None`` (a counted failure) and the runner
  returns on time; the thread keeps running in the background until the function returns by itself, and
  its late result is discarded. Abandoned threads are counted (``RewardRunner.abandoned_threads``) and
  logged. Put functions that may hang in the process pool instead.
- ``async def`` functions: awaited concurrently in one event loop on one daemon thread (each under
  ``asyncio.wait_for``); a coroutine that blocks the loop synchronously is abandoned like a thread.
- functions named in ``processes`` (or all, with ``processes=True``): each call in a worker process of a
  :class:`~jrft.rewards.workers.WorkerPool`. A worker that passes the timeout is killed (with its children)
  and replaced, so nothing keeps running; one that exits (``os._exit``), crashes (a segfault) or passes its
  memory cap (``worker_memory_mb``) is replaced too, and the failure is counted under the function's name.
  Use it for CPU-heavy functions (no GIL contention) or untrusted ones; :meth:`RewardRunner.from_config`
  puts every user function (``module:function`` / ``file.py:function``) there unless its entry says
  ``process: false``.

Faults — raising, passing the timeout, returning NaN/inf or a non-number, returning the wrong number of
values, a crashed worker — give ``None`` for the affected completions, are counted in ``failures`` (in
completions) and logged once per function per batch with one example completion; the batch goes on.
``fail_fast=True`` raises :class:`RewardFunctionError` naming the function instead.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import math
import numbers
import threading
import time
import warnings
import weakref
from collections.abc import Callable, Collection, Mapping, Sequence
from typing import Any

import numpy as np

from jrft.rewards.combine import COMBINERS
from jrft.rewards.protocol import (
    RewardSignatureError,
    TrainerState,
    check_signature,
    is_async,
    reward_name,
    select_arguments,
)
from jrft.rewards.registry import build_reward
from jrft.rewards.workers import LOG_HOOK, WorkerPool, function_payload

logger = logging.getLogger(__name__)

_EXAMPLE_CHARS = 200
_GRACE_SECONDS = 2.0


class RewardFunctionError(RuntimeError):
    """A reward function failed and the runner was built with ``fail_fast=True``."""


@dataclasses.dataclass(frozen=True)
class RewardResult:
    """One batch's rewards.

    Attributes:
      rewards: ``[N]`` float64, the combined reward; NaN where no function applied.
      per_function: name -> ``[N]`` float64 raw values; NaN for ``None`` and for failures.
      failures: name -> number of completions whose value failed (see the module docstring).
      metrics: flat dict for logging: ``rewards/{name}/{mean,std,frac_none,failures,seconds}`` (mean and std
        over applicable values), ``rewards/{mean,std,frac_nan}`` of the combined reward, and with a group size
        ``rewards/frac_zero_std_groups`` (groups whose combined rewards are all equal: no GRPO signal).
      errors: name -> one example error message for functions that failed in this batch.
      extra: column -> ``[N]`` values the functions gave ``log_extra`` (a column for the completions table).
        The means of what they gave ``log_metric`` are in ``metrics`` under the names they chose.
    """

    rewards: np.ndarray
    per_function: dict[str, np.ndarray]
    failures: dict[str, int]
    metrics: dict[str, float]
    errors: dict[str, str]
    extra: dict[str, list] = dataclasses.field(default_factory=dict)


class _Logs:
    """What the functions of one batch hand to ``log_metric`` / ``log_extra`` (from threads: locked)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.metrics: dict[str, list[float]] = {}
        self.extra: dict[str, list] = {}

    def log_metric(self, name: str, value: float) -> None:
        with self._lock:
            self.metrics.setdefault(str(name), []).append(float(value))

    def log_extra(self, column: str, values: Sequence[Any]) -> None:
        with self._lock:
            self.extra.setdefault(str(column), []).extend(list(values))

    def merge(self, logs: Mapping[str, list]) -> None:
        """Adds what a worker process's hooks collected."""
        for name, value in logs.get("metrics", ()):
            self.log_metric(name, value)
        for column, values in logs.get("extra", ()):
            self.log_extra(column, values)

    def columns(self) -> dict[str, list]:
        with self._lock:
            return {column: list(values) for column, values in self.extra.items()}

    def means(self) -> dict[str, float]:
        with self._lock:
            return {name: float(np.mean(values)) for name, values in self.metrics.items() if values}


class _Outcome:
    """One function's call result, written by the thread that ran it and read once by the runner.

    The lock makes the hand-over atomic: once the runner has taken its snapshot (at the deadline), a late
    result from an abandoned thread is dropped instead of changing what the runner already reported.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._closed = False
        self.values: Any = None
        self.error: str | None = None
        self.seconds = math.nan
        self.done = False

    def finish(self, values: Any = None, error: str | None = None, seconds: float = math.nan) -> None:
        with self._lock:
            if not self._closed:
                self.values, self.error, self.seconds, self.done = values, error, seconds, True

    def snapshot(self) -> tuple[bool, Any, str | None, float]:
        with self._lock:
            self._closed = True
            return self.done, self.values, self.error, self.seconds


def _unique_names(functions: Sequence[Callable[..., Any]], names: Sequence[str] | None) -> list[str]:
    raw = list(names) if names is not None else [reward_name(f) for f in functions]
    if len(raw) != len(functions):
        raise ValueError(f"RewardRunner: {len(raw)} names for {len(functions)} functions")
    out, seen = [], {}
    for name in raw:
        seen[name] = seen.get(name, 0) + 1
        out.append(name if seen[name] == 1 else f"{name}_{seen[name]}")
    return out


def to_values(result: Any, n: int) -> tuple[np.ndarray, int, str | None]:
    """A function's return value as ``[n]`` float64 (NaN for None/bad), the failed count, and a message."""
    if isinstance(result, np.ndarray):
        result = result.tolist()
    if isinstance(result, str | bytes) or not isinstance(result, Sequence):
        return (
            np.full(n, np.nan),
            n,
            f"returned {type(result).__name__}, expected a list of {n} floats or None",
        )
    if len(result) != n:
        return np.full(n, np.nan), n, f"returned {len(result)} values for {n} completions"
    values = np.full(n, np.nan)
    bad: list[str] = []
    for i, v in enumerate(result):
        if v is None:
            continue
        if isinstance(v, numbers.Real | np.bool_) and math.isfinite(float(v)):
            values[i] = float(v)
        else:
            bad.append(f"[{i}]={v!r}")
    message = f"returned non-finite or non-numeric value(s) {', '.join(bad[:3])}" if bad else None
    return values, len(bad), message


class RewardRunner:
    """Runs reward functions on a batch and combines them.

    Args:
      functions: callables following the contract in :mod:`jrft.rewards.protocol`, or strings: a built-in's
        name (default options) or a ``module:function`` / ``file.py:function`` spec.
      weights: one weight per function (default 1.0 each).
      timeout: seconds each batch may take; every function must return within it.
      combine: ``"sum_then_normalize"`` or ``"normalize_then_sum"`` (see :mod:`jrft.rewards.combine`).
      group_size: G, completions per prompt (contiguous); required by ``normalize_then_sum``.
      fail_fast: raise :class:`RewardFunctionError` on the first failing function instead of recording
        ``None``.
      processes: ``True`` to run every non-async function in worker processes, or the names of those to.
      names: metric names (default: ``fn.name`` / ``__name__``; duplicates get ``_2``, ``_3``).
      eps: added to the group std in ``normalize_then_sum``.
      startup_timeout: seconds the constructor waits for worker processes to start.
      worker_memory_mb: data-segment limit (``RLIMIT_DATA``: heap and private writable mappings) of each
        worker process; past it allocations fail with ``MemoryError`` inside the worker, instead of the
        machine's OOM killer picking the trainer. ``None`` for no limit.
    """

    def __init__(
        self,
        functions: Sequence[Callable[..., Any] | str],
        *,
        weights: Sequence[float] | None = None,
        timeout: float = 60.0,
        combine: str = "sum_then_normalize",
        group_size: int | None = None,
        fail_fast: bool = False,
        processes: bool | Collection[str] = False,
        names: Sequence[str] | None = None,
        eps: float = 1e-6,
        startup_timeout: float = 60.0,
        worker_memory_mb: int | None = 16384,
    ) -> None:
        if not functions:
            raise ValueError("RewardRunner: give at least one reward function")
        self.functions = [build_reward(f).function if isinstance(f, str) else f for f in functions]
        self.names = _unique_names(self.functions, names)
        self._signatures = [
            check_signature(f, where=f"reward function {n!r}")
            for f, n in zip(self.functions, self.names, strict=True)
        ]
        weights = [1.0] * len(self.functions) if weights is None else [float(w) for w in weights]
        if len(weights) != len(self.functions) or not all(math.isfinite(w) for w in weights):
            raise ValueError(
                f"RewardRunner.weights: need {len(self.functions)} finite numbers, got {weights}"
            )
        self.weights = np.asarray(weights, dtype=np.float64)
        if timeout <= 0:
            raise ValueError(f"RewardRunner.timeout must be > 0 seconds, got {timeout}")
        self.timeout = float(timeout)
        if combine not in COMBINERS:
            raise ValueError(f"RewardRunner.combine must be one of {sorted(COMBINERS)}, got {combine!r}")
        if combine == "normalize_then_sum" and group_size is None:
            raise ValueError("RewardRunner.group_size is required by combine='normalize_then_sum'")
        if group_size is not None and group_size < 1:
            raise ValueError(f"RewardRunner.group_size must be >= 1, got {group_size}")
        self.combine, self.group_size, self.fail_fast, self.eps = combine, group_size, fail_fast, eps
        self._in_process = self._process_set(processes)
        self._payloads = {
            n: function_payload(f, n)
            for f, n in zip(self.functions, self.names, strict=True)
            if n in self._in_process
        }
        self._slots = {name: slot for slot, name in enumerate(self._payloads)}  # a worker per function
        self._pool = WorkerPool(len(self._payloads), memory_mb=worker_memory_mb) if self._payloads else None
        if self._pool is not None:
            self._finalizer = weakref.finalize(self, self._pool.close)
            # Workers start in parallel (~1 s, Python + imports); wait here so the first batch's timeout is
            # not spent on start-up. A worker replaced after a kill starts in the background.
            self._pool.wait_ready(startup_timeout)
        self.abandoned_threads = 0
        # Passed to every function as ``trainer_state`` (TRL's); the training loop updates it each step.
        self.trainer_state = TrainerState()

    def set_trainer_state(self, *, global_step: int, epoch: float = 0.0, max_steps: int = 0) -> None:
        """What the next batches' ``trainer_state`` says (called by the trainer before each step)."""
        self.trainer_state = TrainerState(int(global_step), float(epoch), int(max_steps))

    def _process_set(self, processes: bool | Collection[str]) -> set[str]:
        if processes is True:
            return {n for f, n in zip(self.functions, self.names, strict=True) if not is_async(f)}
        if not processes:
            return set()
        unknown = sorted(set(processes) - set(self.names))
        if unknown:
            raise ValueError(
                f"RewardRunner.processes: unknown function name(s) {unknown}; names: {self.names}"
            )
        return set(processes)

    @classmethod
    def from_config(cls, entries: Sequence[str | Mapping[str, Any]], **options: Any) -> RewardRunner:
        """Build from config entries (see :func:`jrft.rewards.registry.build_reward`) plus runner options."""
        built = [build_reward(entry, where=f"rewards[{i}]") for i, entry in enumerate(entries)]
        processes = options.pop("processes", False)
        if processes is False and any(b.process for b in built):
            processes = [b.label for b in built if b.process]
        return cls(
            [b.function for b in built],
            weights=[b.weight for b in built],
            names=[b.label for b in built],
            processes=processes,
            **options,
        )

    def close(self) -> None:
        """Stop the worker processes (also done when the runner is garbage-collected)."""
        if self._pool is not None:
            self._finalizer()

    def __enter__(self) -> RewardRunner:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    # ---------------------------------------------------------------- one batch

    def _check_batch(self, kwargs: dict[str, Any]) -> int:
        n = len(kwargs["completions"])
        for key, value in kwargs.items():
            if value is None:
                continue
            if isinstance(value, str) or not hasattr(value, "__len__"):
                raise ValueError(
                    f"RewardRunner: argument {key!r} must be a list with one entry per completion"
                )
            if len(value) != n:
                raise ValueError(
                    f"RewardRunner: argument {key!r} has {len(value)} entries for {n} completions"
                )
        if self.group_size is not None and n % self.group_size:
            raise ValueError(
                f"RewardRunner: {n} completions is not a multiple of group_size {self.group_size}"
            )
        return n

    def _run_sync(self, i: int, args: dict[str, Any], outcome: _Outcome) -> None:
        start = time.monotonic()
        try:
            values = self.functions[i](**args)
        except BaseException as err:  # SystemExit too: a reward function must not end the run
            outcome.finish(error=f"{type(err).__name__}: {err}", seconds=time.monotonic() - start)
            return
        outcome.finish(values, seconds=time.monotonic() - start)

    def _run_process(
        self, i: int, args: dict[str, Any], outcome: _Outcome, deadline: float, logs: _Logs
    ) -> None:
        start = time.monotonic()
        try:
            name = self.names[i]
            status, value = self._pool.call(self._payloads[name], args, deadline - start, self._slots[name])
        except Exception as err:
            outcome.finish(error=f"{type(err).__name__}: {err}", seconds=time.monotonic() - start)
            return
        if status == "ok":
            value, collected = value
            logs.merge(collected)
            outcome.finish(value, seconds=time.monotonic() - start)
        else:
            outcome.finish(error=value[0], seconds=time.monotonic() - start)

    def _run_async(self, jobs: list[tuple[int, dict[str, Any], _Outcome]], deadline: float) -> None:
        async def one(i: int, args: dict[str, Any], outcome: _Outcome) -> None:
            start = time.monotonic()
            try:
                values = await asyncio.wait_for(self.functions[i](**args), deadline - start)
            except asyncio.TimeoutError:
                error = f"TimeoutError: no result after {self.timeout:g} s (coroutine cancelled)"
                outcome.finish(error=error, seconds=time.monotonic() - start)
            except Exception as err:
                outcome.finish(error=f"{type(err).__name__}: {err}", seconds=time.monotonic() - start)
            else:
                outcome.finish(values, seconds=time.monotonic() - start)

        async def everything() -> None:
            await asyncio.gather(*(one(*job) for job in jobs))

        asyncio.run(everything())

    def _launch(
        self, kwargs: dict[str, Any], deadline: float, logs: _Logs
    ) -> tuple[list[_Outcome], list[tuple[bool, Any]]]:
        """Start every function; returns the outcomes and ``(ends_by_itself, thread)`` pairs to join.

        Process-pool threads and the event-loop thread end by themselves just after the deadline (the worker
        is killed, the coroutines are cancelled), so they get a short grace before being called abandoned.
        """
        outcomes = [_Outcome() for _ in self.functions]
        threads, async_jobs = [], []
        for i, (fn, name) in enumerate(zip(self.functions, self.names, strict=True)):
            try:
                args = select_arguments(self._signatures[i], kwargs, where=f"reward function {name!r}")
                # Each function gets its own (shallow) lists, so one that mutates its arguments in place
                # cannot change what the others, running at the same time, see.
                args = {k: list(v) if isinstance(v, list) else v for k, v in args.items()}
            except RewardSignatureError as err:  # a missing column: a failure like any other
                outcomes[i].finish(error=f"{type(err).__name__}: {err}", seconds=0.0)
                continue
            if name in self._in_process:
                # the hooks cannot cross the pipe: the worker passes its own and returns what they got
                args.update({k: LOG_HOOK for k in ("log_metric", "log_extra") if k in args})
                target, targs = self._run_process, (i, args, outcomes[i], deadline, logs)
            elif is_async(fn):
                async_jobs.append((i, args, outcomes[i]))
                continue
            else:
                target, targs = self._run_sync, (i, args, outcomes[i])
            thread = threading.Thread(target=target, args=targs, name=f"jrft-reward-{name}", daemon=True)
            threads.append((name in self._in_process, thread))
        if async_jobs:
            loop_thread = threading.Thread(target=self._run_async, args=(async_jobs, deadline), daemon=True)
            threads.append((True, loop_thread))
        for _, thread in threads:
            thread.start()
        return outcomes, threads

    def __call__(
        self,
        *,
        prompts: Sequence[Any],
        completions: Sequence[Any],
        completion_ids: Sequence[Any] | None = None,
        **columns: Any,
    ) -> RewardResult:
        """Score one batch (see the class docstring); columns are ``[N]`` lists aligned with completions."""
        kwargs = {
            "prompts": list(prompts),
            "completions": list(completions),
            "completion_ids": completion_ids,
        }
        kwargs.update({k: list(v) if isinstance(v, np.ndarray) else v for k, v in columns.items()})
        n = self._check_batch(kwargs)
        logs = _Logs()
        kwargs.update(trainer_state=self.trainer_state, log_metric=logs.log_metric, log_extra=logs.log_extra)
        deadline = time.monotonic() + self.timeout
        outcomes, threads = self._launch(kwargs, deadline, logs)
        for ends_by_itself, thread in threads:
            grace = _GRACE_SECONDS if ends_by_itself else 0.0
            thread.join(max(0.0, deadline + grace - time.monotonic()))
        # Threads still alive now are abandoned (they cannot be killed); outcomes not done count as timeouts.
        stuck = sum(thread.is_alive() for _, thread in threads)
        if stuck:
            self.abandoned_threads += stuck
            logger.warning(
                "%d reward thread(s) still running after the %g s timeout were abandoned (threads cannot be "
                "killed; %d abandoned so far); for functions that can hang set 'process: true' on their "
                "reward entry (RewardRunner(processes=[name]) in code) to run them in a killable worker",
                stuck,
                self.timeout,
                self.abandoned_threads,
            )
        return self._collect(outcomes, kwargs["completions"], n, logs)

    def _collect(self, outcomes: list[_Outcome], completions: list[Any], n: int, logs: _Logs) -> RewardResult:
        per_function, failures, errors, metrics = {}, {}, {}, {}
        for name, outcome in zip(self.names, outcomes, strict=True):
            done, result, error, seconds = outcome.snapshot()
            if not done:
                error, seconds = f"TimeoutError: no result after {self.timeout:g} s", self.timeout
            if error is not None:
                values, failed, message = np.full(n, np.nan), n, error
            else:
                values, failed, message = to_values(result, n)
            if message is not None:
                errors[name] = message
                self._report(name, message, failed, n, completions)
            per_function[name], failures[name] = values, failed
            metrics.update(reward_stats(f"rewards/{name}", values))
            metrics[f"rewards/{name}/failures"] = float(failed)
            metrics[f"rewards/{name}/seconds"] = seconds
        stacked = np.stack([per_function[name] for name in self.names])  # [F, N]
        rewards = COMBINERS[self.combine](stacked, self.weights, self.group_size or n, self.eps)
        metrics.update(reward_stats("rewards", rewards, none_key="frac_nan"))
        if self.group_size is not None and n:
            grouped = rewards.reshape(-1, self.group_size)  # [P, G]
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN groups count as "no signal"
                flat = ~(np.nanmax(grouped, axis=1) > np.nanmin(grouped, axis=1))
            metrics["rewards/frac_zero_std_groups"] = float(np.mean(flat))
        # Snapshot of the hooks: a late call from an abandoned thread does not change this batch's result.
        metrics.update(logs.means())
        columns = logs.columns()
        extra = {column: values for column, values in columns.items() if len(values) == n}
        for column, values in columns.items():
            if len(values) != n:
                logger.warning(
                    "log_extra column %r got %d values for %d completions: dropped", column, len(values), n
                )
        return RewardResult(rewards, per_function, failures, metrics, errors, extra)

    def _report(self, name: str, message: str, failed: int, n: int, completions: list[Any]) -> None:
        if self.fail_fast:
            raise RewardFunctionError(f"reward function {name!r} failed: {message}")
        example = repr(completions[0])[:_EXAMPLE_CHARS] if completions else "''"
        logger.warning(
            "reward function %r failed for %d/%d completions: %s; example completion: %s",
            name,
            failed,
            n,
            message,
            example,
        )


def reward_stats(prefix: str, values: np.ndarray, none_key: str = "frac_none") -> dict[str, float]:
    """Metrics of ``[N]`` float rewards with NaN for "no reward": ``{prefix}/mean`` and ``{prefix}/std`` over
    the non-NaN values (NaN when there are none) and ``{prefix}/{none_key}``, the fraction that is NaN."""
    valid = values[~np.isnan(values)]
    return {
        f"{prefix}/mean": float(valid.mean()) if valid.size else math.nan,
        f"{prefix}/std": float(valid.std()) if valid.size else math.nan,
        f"{prefix}/{none_key}": float(1.0 - valid.size / values.size) if values.size else 0.0,
    }
