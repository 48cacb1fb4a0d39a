"""Run builders: the layer of ``jrft.train`` that reads a :class:`jrft.config.RunConfig`.

Everything else in ``jrft.train`` is the engine (state, steps, loop, checkpoints, metrics, log-probs,
reference, rollouts and rounds, objectives): it takes explicit values and never reads a config.
:func:`~jrft.train.runs.setup.setup_run` builds every run; :data:`RUNNERS` maps each objective to its runner.
"""

from __future__ import annotations

from collections.abc import Callable

from jrft.config import ConfigError, RunConfig
from jrft.train.lock import locked
from jrft.train.loop import LoopResult
from jrft.train.runs.grpo import run_grpo
from jrft.train.runs.offline import run_offline
from jrft.train.runs.ppo import run_ppo
from jrft.train.runs.resume import check_resume

RUNNERS: dict[str, Callable[..., LoopResult]] = {
    "sft": run_offline,
    "reward": run_offline,
    "dpo": run_offline,
    "kto": run_offline,
    "grpo": run_grpo,
    "ppo": run_ppo,
}


def run_config(config: RunConfig, *, progress: bool = True, allow_config_change: bool = False) -> LoopResult:
    """Trains ``config.objective`` with its runner from :data:`RUNNERS` and exports the result, holding the
    lock of ``config.output_dir`` throughout (process 0 only; not for ``gs://`` directories, which cannot be
    locked). A resume first compares the config with the checkpoint's (:mod:`jrft.train.runs.resume`).

    Raises:
      ConfigError: no ``model.path``.
      RunLockedError: another run holds ``output_dir``; the message names it.
      ConfigDriftError: resuming would change the model, tokenizer, data or objective (and
        ``allow_config_change`` is false); the message lists the keys.
    """
    import jax

    if not str(config.model.path or "").strip():
        raise ConfigError(
            "model.path: no model given; set model.path to a directory holding config.json or a hub model id",
            "model.path",
        )
    lockable = "://" not in config.output_dir and jax.process_index() == 0
    with locked(config.output_dir, enabled=lockable):
        check_resume(config, allow_changes=allow_config_change)
        return RUNNERS[config.objective](config, progress=progress)


__all__ = ["RUNNERS", "run_config", "run_grpo", "run_offline", "run_ppo"]
