"""The end of every run: the shared loop (checkpoints, resume, metrics, eval) inside the run's mesh, then the
transformers-format export; and ``jrft export``'s rebuild of a run from one of its checkpoints."""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

import jax
from flax import nnx

from jrft.config import RunConfig
from jrft.parallel.memory import describe_measured_peak
from jrft.train.checkpoint import tree_all_finite
from jrft.train.loop import LoopOptions, LoopResult, NonFiniteError, train_loop
from jrft.train.metrics import MetricsLogger
from jrft.train.runs.resume import check_lora_base, checkpoint_meta
from jrft.train.runs.setup import Run, checkpointer_for, export_dir, setup_run


def loop_and_export(
    run: Run,
    step_fn,
    state,
    batches,
    *,
    eval_fn=None,
    bar_keys: tuple[str, ...] = ("loss",),
    progress: bool = True,
    summary: str | None = None,
    export_model: Callable[[Any], nnx.Module] | None = None,
) -> LoopResult:
    """The part every objective shares: the loop (checkpoints, resume, metrics, eval), then the
    transformers-format export of the final parameters (every process joins the gather; process 0 writes).
    Both run inside ``jax.set_mesh(run.mesh)``, so every program they call binds its sharding constraints.

    ``state`` is what the loop trains (``run.state``, or PPO's pair of states). ``export_model(final_state)
    -> nnx.Module`` picks what is exported when the state holds more than one model (PPO: the policy, not
    the value model); default: ``run.graphdef`` merged with ``state.params/rest``.
    """
    from jrft.models import save_pretrained

    config, t = run.config, run.config.train
    checkpointer = checkpointer_for(config)
    logger = MetricsLogger(
        config.output_dir,
        total_steps=t.steps,
        progress=progress,
        bar_keys=bar_keys,
        desc=config.objective,
        report_to=config.report_sinks,
        config=config.to_dict(),
    )
    if summary:
        logger.write(summary)
    try:
        with jax.set_mesh(run.mesh):
            result = train_loop(
                step_fn,
                state,
                batches,
                options=LoopOptions(
                    total_steps=t.steps,
                    log_every=t.log_every,
                    save_every=t.save_every,
                    eval_every=t.eval_every,
                ),
                checkpointer=checkpointer,
                logger=logger,
                eval_fn=eval_fn,
                meta=checkpoint_meta(config),
            )
            if export_model is None:
                final = nnx.merge(run.graphdef, result.state.params, result.state.rest)
            else:
                final = export_model(result.state)
            path = save_pretrained(final, export_dir(config), run.tokenizer)
        logger.write(f"exported {config.objective} model to {path}")
        logger.write(describe_measured_peak())
    finally:
        logger.close()
        checkpointer.close()
    return result


def export_checkpoint(run_dir: str, out: str, *, step: int | None = None) -> str:
    """Exports checkpoint ``step`` (default: the latest) of the run in ``run_dir`` to ``out``: the run is
    rebuilt on one device from the config stored in the checkpoint (``model.path`` must still be
    reachable), the trained parameters restored and written with ``jrft.models.save_pretrained``."""
    from jrft.config import MeshConfig, config_from_dict
    from jrft.models import save_pretrained
    from jrft.train.checkpoint import Checkpointer
    from jrft.train.runs.setup import mesh_from_config

    checkpointer = Checkpointer(os.path.join(run_dir, "checkpoints"))
    try:
        meta = checkpointer.read_meta(step)
        step = step if step is not None else checkpointer.latest_step()
        config: RunConfig = config_from_dict(meta["config"])
        check_lora_base(config, meta, where=f"checkpoint step {step} in {checkpointer.directory}")
        if config.objective == "ppo":
            raise NotImplementedError(
                "jrft export: PPO checkpoints hold policy and value states; exporting one mid-run is not "
                "built yet (the run exports its policy when it finishes)"
            )
        one_device = mesh_from_config(MeshConfig(data=1, fsdp=1, tensor=1))
        run = setup_run(config, scalar_head=config.objective == "reward", data=False, mesh=one_device)
        state, _ = checkpointer.restore(step, run.state)
    finally:
        checkpointer.close()
    if not tree_all_finite(state.params):
        raise NonFiniteError(
            f"checkpoint step {step} in {checkpointer.directory} holds NaN/inf parameters; not exporting it"
        )
    return save_pretrained(nnx.merge(run.graphdef, state.params, state.rest), out, run.tokenizer)
