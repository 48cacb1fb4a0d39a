"""Where training metrics go: a JSONL file, TensorBoard event files, and the console progress bar.

Only the main process (``jax.process_index() == 0``) writes; the others get a logger that does nothing,
so multi-host runs print and write once.
"""

from __future__ import annotations

import json
import math
import os
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


class MetricsLogger:
    """Writes metrics to ``<directory>/metrics.jsonl`` and TensorBoard, and drives a tqdm progress bar.

    Args:
      directory: the run's output directory (created).
      total_steps: for the progress bar's ETA.
      tensorboard: also write TensorBoard event files under ``<directory>/tensorboard``.
      progress: show a console progress bar.
      bar_keys: metric names shown in the progress bar (the first few present are shown).
      desc: the progress bar's label.
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
    ):
        self.enabled = jax.process_index() == 0
        self.bar_keys = bar_keys
        self._start = time.time()
        self._bar = None
        self._jsonl = None
        self._tb = None
        if not self.enabled:
            return
        os.makedirs(directory, exist_ok=True)
        self._jsonl = open(os.path.join(directory, filename), "a", encoding="utf-8")  # noqa: SIM115
        if tensorboard:
            from tensorboardX import SummaryWriter

            self._tb = SummaryWriter(os.path.join(directory, "tensorboard"))
        if progress:
            from tqdm.auto import tqdm

            self._bar = tqdm(total=total_steps, initial=initial_step, desc=desc, dynamic_ncols=True)

    def log(self, step: int, metrics: Mapping[str, Any], *, prefix: str = "") -> None:
        """Records ``metrics`` for ``step``; names get ``prefix`` (e.g. ``eval/``)."""
        if not self.enabled:
            return
        record = {f"{prefix}{k}": to_python(v) for k, v in metrics.items()}
        record_line = {"step": int(step), "time": round(time.time() - self._start, 3), **record}
        self._jsonl.write(json.dumps(_json_safe(record_line), allow_nan=False) + "\n")
        self._jsonl.flush()
        if self._tb is not None:
            for key, value in record.items():
                if isinstance(value, (int, float)) and not isinstance(value, bool):
                    self._tb.add_scalar(key, value, int(step))
        if self._bar is not None:
            shown = {k: record[k] for k in self.bar_keys if isinstance(record.get(k), (int, float))}
            if shown:
                self._bar.set_postfix({k: f"{v:.4g}" for k, v in shown.items()}, refresh=False)

    def drop_after(self, step: int) -> int:
        """Removes the records of steps after ``step`` (a run resumed from its checkpoint at ``step`` logs
        those steps again; the old ones belong to the discarded continuation). Returns how many went."""
        if not self.enabled:
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
