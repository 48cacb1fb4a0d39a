"""The training loop shared by every objective.

It knows nothing about losses or models: it calls ``step_fn(state, batch) -> (state, metrics)`` on batches
from a resumable iterator, logs, evaluates, checkpoints, resumes, and stops on non-finite metrics.

Resume contract: a checkpoint holds the whole ``state`` pytree (parameters, optimizer state, rng, ...) and,
in its JSON meta, the loop's step and the iterator's ``state_dict()``. Restarting the same command restores
both, so a run killed at any point and restarted ends with the same parameters as one never killed —
provided ``step_fn`` is a deterministic function of ``(state, batch)`` (keep the rng in the state).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterator, Mapping
from typing import Any, Protocol

from jrft.train.checkpoint import Checkpointer, tree_all_finite
from jrft.train.metrics import MetricsLogger, all_finite, mean_metrics, to_python


class ResumableIterator(Protocol):
    """A batch iterator whose exact position can be saved and restored."""

    def __next__(self) -> Any: ...

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: Mapping[str, Any]) -> None: ...


class NonFiniteError(RuntimeError):
    """A metric (usually the loss), or the parameters / optimizer state about to be checkpointed, became NaN
    or infinite; the last good (finite) checkpoint is kept."""


def last_good_message(step: int | None, checkpointer: Checkpointer | None) -> str:
    """``Last good checkpoint: step N in DIR`` or why there is none; every saved checkpoint is finite."""
    if checkpointer is None:
        return "No checkpoint: checkpointing is off"
    if step is None:
        return f"No good checkpoint: none was saved in {checkpointer.directory}"
    return f"Last good checkpoint: step {step} in {checkpointer.directory}"


@dataclasses.dataclass(frozen=True)
class LoopOptions:
    """How long to train and how often to log, evaluate and save.

    Attributes:
      total_steps: optimizer steps to run in total (a resumed run runs the remainder).
      log_every: metrics are averaged over this many steps, then logged.
      save_every: checkpoint every this many steps (and always at the end); ``None`` or 0: only at the end.
      eval_every: call ``eval_fn`` every this many steps (and at the end); ``None`` or 0: only at the end.
      guard_metrics: the metrics whose becoming NaN/inf stops the run (others, such as the mean of a reward
        that applied to no completion, may legitimately be NaN).
    """

    total_steps: int
    log_every: int = 10
    save_every: int | None = None
    eval_every: int | None = None
    guard_metrics: tuple[str, ...] = ("loss", "grad_norm")

    def __post_init__(self):
        if self.total_steps < 0:
            raise ValueError(f"total_steps must be >= 0, got {self.total_steps}")
        if self.log_every < 1:
            raise ValueError(f"log_every must be >= 1, got {self.log_every}")


@dataclasses.dataclass
class LoopResult:
    state: Any
    step: int
    resumed_from: int | None
    last_metrics: dict[str, float]
    eval_metrics: dict[str, float]


def _due(step: int, every: int | None) -> bool:
    return bool(every) and step % every == 0


def restore_if_any(
    checkpointer: Checkpointer | None, state: Any, batches: ResumableIterator
) -> tuple[Any, int, int | None]:
    """Restores the latest checkpoint into ``(state, batches)``; returns ``(state, step, resumed_from)``."""
    if checkpointer is None or checkpointer.latest_step() is None:
        return state, 0, None
    step = checkpointer.latest_step()
    state, meta = checkpointer.restore(step, state)
    if "data" in meta and meta["data"] is not None:
        batches.load_state_dict(meta["data"])
    return state, int(meta.get("step", step)), step


def train_loop(
    step_fn: Callable[[Any, Any], tuple[Any, Mapping[str, Any]]],
    state: Any,
    batches: ResumableIterator | Iterator[Any],
    *,
    options: LoopOptions,
    checkpointer: Checkpointer | None = None,
    logger: MetricsLogger | None = None,
    eval_fn: Callable[[Any], Mapping[str, Any]] | None = None,
    meta: Mapping[str, Any] | None = None,
) -> LoopResult:
    """Runs ``step_fn`` until ``options.total_steps``; see the module docstring for the resume contract.

    Args:
      step_fn: ``(state, batch) -> (state, metrics)``; metrics are scalars (arrays or Python numbers).
      state: the initial state (also the restore target: same structure, shapes and shardings).
      batches: the batch iterator; with a checkpointer it must be resumable (``state_dict``).
      options: steps and intervals.
      checkpointer: saves/restores; ``None`` disables both.
      logger: where metrics go; ``None`` logs nowhere.
      eval_fn: ``state -> metrics``, logged with an ``eval/`` prefix.
      meta: extra JSON (e.g. the config) stored in every checkpoint.

    Raises:
      NonFiniteError: when a metric becomes NaN/inf, or the state is not finite when it is due to be saved
        (finite loss and grad norm do not rule out an update that blows the parameters up); nothing after
        the last good checkpoint is saved.
    """
    state, step, resumed_from = restore_if_any(checkpointer, state, batches)
    if logger is not None and resumed_from is not None:
        dropped = logger.drop_after(step)  # those steps run again: no step is logged twice
        logger.write(
            f"resumed from checkpoint at step {resumed_from}"
            + (f" ({dropped} later records dropped)" if dropped else "")
        )
        logger.advance(step)
    history: list[Mapping[str, Any]] = []
    last: dict[str, float] = {}
    eval_metrics: dict[str, float] = {}
    last_saved = resumed_from

    def check(metrics: Mapping[str, Any], at_step: int) -> None:
        guarded = {k: to_python(v) for k, v in metrics.items() if k in options.guard_metrics}
        ok, bad = all_finite(guarded)
        if not ok:
            raise NonFiniteError(
                f"metric {bad!r} became non-finite at step {at_step}; stopping. "
                f"{last_good_message(last_saved, checkpointer)}"
            )

    def save(at_step: int) -> None:
        nonlocal last_saved
        if checkpointer is None or at_step == last_saved:
            return
        for entry in history:
            check(entry, at_step)
        if not tree_all_finite(state):
            raise NonFiniteError(
                f"the parameters or optimizer state are NaN/inf at step {at_step} although the guarded "
                f"metrics {list(options.guard_metrics)} were finite (an update blew them up: a learning rate "
                f"far too large?); not checkpointing them, stopping. "
                f"{last_good_message(last_saved, checkpointer)}"
            )
        data_state = batches.state_dict() if hasattr(batches, "state_dict") else None
        checkpointer.save(at_step, state, {"step": at_step, "data": data_state, **dict(meta or {})})
        last_saved = at_step

    while step < options.total_steps:
        batch = next(batches)
        state, metrics = step_fn(state, batch)
        step += 1
        history.append(metrics)
        if logger is not None:
            logger.advance()
        if _due(step, options.log_every) or step == options.total_steps:
            last = mean_metrics(history)
            history = []
            check(last, step)
            if logger is not None:
                logger.log(step, last)
        if eval_fn is not None and (_due(step, options.eval_every) or step == options.total_steps):
            eval_metrics = {k: to_python(v) for k, v in eval_fn(state).items()}
            if logger is not None:
                logger.log(step, eval_metrics, prefix="eval/")
        if _due(step, options.save_every) or step == options.total_steps:
            save(step)
    if checkpointer is not None:
        checkpointer.wait()
    return LoopResult(
        state=state, step=step, resumed_from=resumed_from, last_metrics=last, eval_metrics=eval_metrics
    )
