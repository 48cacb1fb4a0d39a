"""Where training metrics go: a JSONL file, TensorBoard event files, Weights & Biases, and the console (a
progress bar, or one line per logged step without it).

Only the main process (``jax.process_index() == 0``) writes; the others get a logger that does nothing,
so multi-host runs print and write once.
"""

from __future__ import annotations

import json
import math
import os
import secrets
import time
from collections.abc import Mapping
from typing import Any

import jax
import numpy as np


def to_python(value: Any) -> Any:
    """Scalars from numpy/JAX become plain floats/ints so they serialise as JSON."""
    if isinstance(value, (jax.Array, np.ndarray, np.generic)):
        arr = np.asarray(value)
        if arr.size == 1:
            item = arr.reshape(()).item()
            return item
        return arr.tolist()
    return value


def mean_metrics(history: list[Mapping[str, Any]]) -> dict[str, float]:
    """Mean of each scalar metric over ``history`` (keys missing from some entries average the rest)."""
    sums: dict[str, float] = {}
    counts: dict[str, int] = {}
    for entry in history:
        for key, value in entry.items():
            value = to_python(value)
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                sums[key] = sums.get(key, 0.0) + float(value)
                counts[key] = counts.get(key, 0) + 1
    return {key: sums[key] / counts[key] for key in sums}


def all_finite(metrics: Mapping[str, Any]) -> tuple[bool, str | None]:
    """``(True, None)`` when every scalar metric is finite, else ``(False, name_of_first_bad_metric)``."""
    for key, value in metrics.items():
        value = to_python(value)
        if isinstance(value, float) and not math.isfinite(value):
            return False, key
    return True, None


REPORT_TO = ("jsonl", "tensorboard", "wandb")


class MetricsLogger:
    """Writes metrics to the sinks of ``report_to`` and to the console.

    Sinks: ``jsonl`` (``<directory>/metrics.jsonl``), ``tensorboard`` (``<directory>/tensorboard``),
    ``wandb`` (Weights & Biases, ``pip install 'jrft[wandb]'``; project from ``$WANDB_PROJECT``, else
    ``jrft``; run files under ``<directory>/wandb``; ``WANDB_MODE=offline`` works without an account; a
    resumed run continues the same W&B run, whose id is kept in ``<directory>/wandb_run_id``). The console
    shows a tqdm progress bar or, with ``progress=False``, one line per logged step (``bar_keys`` and
    ``eval/`` metrics).

    Args:
      directory: the run's output directory (created).
      total_steps: for the progress bar's ETA.
      tensorboard: write TensorBoard event files (kept for callers that predate ``report_to``).
      progress: show a console progress bar (else a line per logged step).
      bar_keys: metric names shown in the progress bar / console lines (the ones present).
      desc: the progress bar's label.
      report_to: the sinks (default: jsonl and tensorboard, or jsonl alone with ``tensorboard=False``).
      config: the run's config as plain data, recorded by W&B.
    """

    def __init__(
        self,
        directory: str | os.PathLike,
        *,
        total_steps: int,
        tensorboard: bool = True,
        progress: bool = True,
        bar_keys: tuple[str, ...] = ("loss",),
        desc: str = "train",
        initial_step: int = 0,
        filename: str = "metrics.jsonl",
        report_to: tuple[str, ...] | None = None,
        config: Mapping[str, Any] | None = None,
    ):
        self.enabled = jax.process_index() == 0
        self.bar_keys = bar_keys
        self.total_steps = total_steps
        self._start = time.time()
        self._bar = None
        self._jsonl = None
        self._tb = None
        self._wandb = None
        if report_to is None:
            report_to = ("jsonl", "tensorboard") if tensorboard else ("jsonl",)
        unknown = sorted(set(report_to) - set(REPORT_TO))
        if unknown:
            raise ValueError(f"MetricsLogger: unknown report_to {unknown}; choose from {list(REPORT_TO)}")
        if not self.enabled:
            return
        os.makedirs(directory, exist_ok=True)
        if "jsonl" in report_to:
            self._jsonl = open(os.path.join(directory, filename), "a", encoding="utf-8")  # noqa: SIM115
        if "tensorboard" in report_to:
            from tensorboardX import SummaryWriter

            self._tb = SummaryWriter(os.path.join(directory, "tensorboard"))
        if "wandb" in report_to:
            self._wandb = _start_wandb(os.fspath(directory), config)
        if progress:
            from tqdm.auto import tqdm

            self._bar = tqdm(total=total_steps, initial=initial_step, desc=desc, dynamic_ncols=True)

    def log(self, step: int, metrics: Mapping[str, Any], *, prefix: str = "") -> None:
        """Records ``metrics`` for ``step``; names get ``prefix`` (e.g. ``eval/``)."""
        if not self.enabled:
            return
        record = {f"{prefix}{k}": to_python(v) for k, v in metrics.items()}
        elapsed = time.time() - self._start
        if self._jsonl is not None:
            record_line = {"step": int(step), "time": round(elapsed, 3), **record}
            self._jsonl.write(json.dumps(_json_safe(record_line), allow_nan=False) + "\n")
            self._jsonl.flush()
        scalars = {k: v for k, v in record.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
        if self._tb is not None:
            for key, value in scalars.items():
                self._tb.add_scalar(key, value, int(step))
        if self._wandb is not None:
            self._wandb.log(_json_safe(scalars), step=int(step))
        shown = {k: scalars[k] for k in self.bar_keys if k in scalars}
        if self._bar is not None:
            if shown:
                self._bar.set_postfix({k: f"{v:.4g}" for k, v in shown.items()}, refresh=False)
        else:  # no progress bar: one console line per logged step
            if prefix:
                shown = {k: v for k, v in scalars.items() if k.startswith(prefix)}
            print(console_line(int(step), self.total_steps, shown, elapsed), flush=True)

    def drop_after(self, step: int) -> int:
        """Removes the records of steps after ``step`` (a run resumed from its checkpoint at ``step`` logs
        those steps again; the old ones belong to the discarded continuation). Returns how many went."""
        if not self.enabled or self._jsonl is None:
            return 0
        path = self._jsonl.name
        self._jsonl.close()
        with open(path, encoding="utf-8") as f:
            lines = f.readlines()
        kept = [line for line in lines if _step_of(line) is None or _step_of(line) <= step]
        if len(kept) != len(lines):
            tmp = path + ".tmp"
            with open(tmp, "w", encoding="utf-8") as f:
                f.writelines(kept)
            os.replace(tmp, path)
        self._jsonl = open(path, "a", encoding="utf-8")  # noqa: SIM115
        return len(lines) - len(kept)

    def advance(self, n: int = 1) -> None:
        if self._bar is not None:
            self._bar.update(n)

    def write(self, message: str) -> None:
        """Prints a line without breaking the progress bar (main process only)."""
        if not self.enabled:
            return
        if self._bar is not None:
            self._bar.write(message)
        else:
            print(message, flush=True)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
        if self._jsonl is not None:
            self._jsonl.close()
        if self._tb is not None:
            self._tb.close()
        if self._wandb is not None:
            self._wandb.finish()


def console_line(step: int, total: int, metrics: Mapping[str, float], elapsed: float) -> str:
    """``step 10/100 | loss 0.4312 | rewards/mean 0.25 | 12.3 s``: the console's line for a logged step."""
    parts = [f"step {step}/{total}"] + [f"{k} {v:.4g}" for k, v in metrics.items()]
    return " | ".join([*parts, f"{elapsed:.1f} s"])


def _start_wandb(directory: str, config: Mapping[str, Any] | None):
    """A W&B run for ``directory``: the same run again when the directory already names one (a resume)."""
    try:
        import wandb
    except ImportError:
        raise ImportError("report_to: wandb needs the wandb package: pip install 'jrft[wandb]'") from None
    id_file = os.path.join(directory, "wandb_run_id")
    run_id = open(id_file).read().strip() if os.path.exists(id_file) else secrets.token_hex(4)
    with open(id_file, "w") as f:
        f.write(run_id)
    return wandb.init(
        project=os.environ.get("WANDB_PROJECT", "jrft"),
        name=os.path.basename(os.path.normpath(directory)),
        dir=directory,
        id=run_id,
        resume="allow",
        config=dict(config or {}),
    )


def _json_safe(value: Any) -> Any:
    """NaN and infinities as null (metrics.jsonl is strict JSON)."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_json_safe(v) for v in value]
    return value


def _step_of(line: str) -> int | None:
    try:
        step = json.loads(line).get("step")
    except (ValueError, AttributeError):
        return None
    return step if isinstance(step, int) else None
