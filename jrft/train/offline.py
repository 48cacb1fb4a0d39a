"""``jrft sft | reward | dpo``: from a :class:`jrft.config.RunConfig` to a trained, exported model.

config -> tokenizer + model on the mesh -> data iterator -> objective -> jitted step -> shared loop
(checkpoints, resume, metrics, eval) -> ``save_pretrained`` export.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable, Iterator
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jrft.config import RunConfig
from jrft.train.checkpoint import Checkpointer
from jrft.train.loop import LoopOptions, LoopResult, train_loop
from jrft.train.metrics import MetricsLogger
from jrft.train.objectives import dpo, pairs, reward, sft
from jrft.train.optim import make_optimizer
from jrft.train.reference import FrozenParams
from jrft.train.sharding import device_batch, mesh_from_config, place_state
from jrft.train.state import create_train_state
from jrft.train.step import jit_step, make_train_step

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}


@dataclasses.dataclass
class Objective:
    """What differs between the offline objectives.

    ``prepare(batch) -> batch`` runs outside the jitted step on device batches (e.g. DPO's reference
    log-probs). ``bar_keys`` are the metrics shown in the progress bar. ``attach(dataset, mesh)``, when
    set, runs once per dataset (train and eval) before any batch is made: it adds per-example values that
    the collator carries into batches (DPO's precomputed reference log-probs). ``frozen`` holds the device
    arrays the objective keeps besides the train state (DPO's live reference parameters), ``None`` if none.
    ``data_kind`` is the batch kind the loss needs (None: the objective's usual kind). ``eval_weights`` maps a
    metric to the normaliser it is a mean over, when that is not the first one (evaluation averages batches
    weighted by it: the listwise reward model's pairwise accuracy is a mean over pairs, its loss over
    rankings).
    """

    normalizers: Callable
    loss_fn: Callable
    prepare: Callable[[dict], dict] = lambda batch: batch
    bar_keys: tuple[str, ...] = ("loss",)
    attach: Callable[[Any, Any], None] | None = None
    frozen: Any = None
    data_kind: str | None = None
    eval_weights: dict[str, str] = dataclasses.field(default_factory=dict)


def _sft(config: RunConfig, graphdef, state) -> Objective:
    loss_fn = sft.make_loss_fn(logits_chunk_size=config.train.logits_chunk_size)
    return Objective(sft.normalizers, loss_fn, bar_keys=("loss", "accuracy"))


def _reward(config: RunConfig, graphdef, state) -> Objective:
    c = config.reward
    if c.loss == "listwise":  # whole rankings [B, K, T], Plackett-Luce
        loss_fn = reward.make_listwise_loss_fn(center_coef=c.center_coefficient)
        keys = ("loss", "accuracy", "top1_accuracy")
        return Objective(
            reward.ranking_normalizers,
            loss_fn,
            bar_keys=keys,
            data_kind="ranking",
            eval_weights={"accuracy": "pairs"},
        )
    loss_fn = reward.make_loss_fn(center_coef=c.center_coefficient)
    return Objective(pairs.normalizers, loss_fn, bar_keys=("loss", "accuracy"))


def _dpo(config: RunConfig, graphdef, state) -> Objective:
    c = config.dpo
    loss_fn = dpo.make_loss_fn(
        beta=c.beta,
        loss_type=c.loss_type,
        label_smoothing=c.label_smoothing,
        simpo_gamma=c.simpo_gamma,
        orpo_lambda=c.orpo_lambda,
        sft_weight=c.sft_weight,
        logits_chunk_size=config.train.logits_chunk_size,
    )
    if c.reference_free or not dpo.needs_reference(c.loss_type):
        # No reference model in memory: DPO's reference-free case uses a uniform reference (log-probs 0).

        def prepare(batch):
            zeros = jnp.zeros(batch["chosen_tokens"].shape[:1], jnp.float32)
            return {**batch, "ref_chosen_logps": zeros, "ref_rejected_logps": zeros}

    elif c.precompute_ref_logps:
        # One pass of the reference (the starting parameters, before any step) over each dataset; the values
        # travel with the examples into every batch, so no reference parameters are kept after it.
        def attach(dataset, mesh):
            attach_reference_logps(dataset, graphdef, state.params, state.rest, mesh, config=config)

        keys = ("loss", "rewards/accuracies")
        return Objective(pairs.normalizers, loss_fn, bar_keys=keys, attach=attach)

    else:
        # The reference is the starting policy, frozen: a copy, since the train state's buffers are donated
        # (in host memory with train.offload_reference).
        frozen = FrozenParams(state.params, offload=config.train.offload_reference)
        reference = dpo.make_reference_fn(graphdef, logits_chunk_size=config.train.logits_chunk_size)

        def prepare(batch):
            return {**batch, **frozen.call(reference, state.rest, batch)}

        return Objective(
            pairs.normalizers, loss_fn, prepare, bar_keys=("loss", "rewards/accuracies"), frozen=frozen.params
        )
    return Objective(pairs.normalizers, loss_fn, prepare, bar_keys=("loss", "rewards/accuracies"))


def _host_array(x: jax.Array) -> np.ndarray:
    """A global array as a host numpy array on every process (gathered across processes if needed)."""
    if x.is_fully_addressable:
        return np.asarray(jax.device_get(x))
    from jax.experimental import multihost_utils

    return np.asarray(multihost_utils.process_allgather(x, tiled=True))


def attach_reference_logps(dataset, graphdef, params, rest, mesh, *, config: RunConfig) -> None:
    """Adds ``ref_chosen_logps`` / ``ref_rejected_logps`` (host float32) to every example of a preference
    ``dataset``: one ordered pass of the reference ``(graphdef, params, rest)`` in batches of
    ``train.batch_size`` (the same reference function as the live path).

    Because the values are attached to the examples themselves, every batch the iterator makes (any shuffle,
    any resume position, eval batches too) carries its rows' own values. The pass is deterministic, so a
    resumed run recomputes exactly the same values from the same starting parameters.
    """
    reference = dpo.make_reference_fn(graphdef, logits_chunk_size=config.train.logits_chunk_size)
    batches = dataset.eval_batches(
        batch_size=config.train.batch_size,
        buckets=config.data.buckets,
        max_length=config.data.max_length,
        process_index=jax.process_index(),
        process_count=jax.process_count(),
    )
    out: dict[str, list[np.ndarray]] = {"ref_chosen_logps": [], "ref_rejected_logps": []}
    for host_batch in batches:  # global rows in example order; filler rows only at the very end
        logps = reference(params, rest, device_batch(host_batch, mesh))
        for key in out:
            out[key].append(_host_array(logps[key]))
    for key, parts in out.items():
        values = np.concatenate(parts)[: len(dataset.examples)].astype(np.float32)
        for example, value in zip(dataset.examples, values, strict=True):
            example[key] = value


OBJECTIVES: dict[str, Callable[[RunConfig, Any, Any], Objective]] = {
    "sft": _sft,
    "reward": _reward,
    "dpo": _dpo,
}


class DeviceBatches:
    """Wraps the host data iterator: host batch -> sharded device arrays -> ``objective.prepare``.

    Passes ``state_dict`` / ``load_state_dict`` through, so the loop checkpoints the data position.
    """

    def __init__(self, host, mesh, prepare):
        self.host, self.mesh, self.prepare = host, mesh, prepare

    def __next__(self):
        return self.prepare(device_batch(next(self.host), self.mesh))

    def state_dict(self):
        return self.host.state_dict()

    def load_state_dict(self, state):
        self.host.load_state_dict(state)


def make_eval_fn(graphdef, objective: Objective, batches_fn: Callable[[], Iterator[dict]], mesh):
    """``state -> metrics``: the objective's loss and metrics averaged over one pass of the eval set
    (weighted by each batch's normaliser, so filler rows do not count, and a mean over the whole set equals
    the mean of the one big batch; see ``Objective.eval_weights``)."""

    @jax.jit
    def evaluate(params, rest, batch):
        norms = objective.normalizers(batch)
        model = nnx.merge(graphdef, params, rest)
        loss, metrics = objective.loss_fn(model, batch, norms, jax.random.key(0))
        metrics = {"loss": loss, **metrics}
        first = next(iter(norms))
        return metrics, {k: norms[objective.eval_weights.get(k, first)] for k in metrics}

    def eval_fn(state) -> dict[str, float]:
        totals: dict[str, float] = {}
        weights: dict[str, float] = {}
        for host_batch in batches_fn():
            batch = objective.prepare(device_batch(host_batch, mesh))
            metrics, batch_weights = jax.device_get(evaluate(state.params, state.rest, batch))
            for key, value in metrics.items():
                totals[key] = totals.get(key, 0.0) + float(value) * float(batch_weights[key])
                weights[key] = weights.get(key, 0.0) + float(batch_weights[key])
        return {key: value / max(weights[key], 1.0) for key, value in totals.items()}

    return eval_fn


def build_model(config: RunConfig, mesh, *, scalar_head: bool = False, path: str | None = None):
    """The run's model (``config.model``), or another checkpoint ``path`` with the same dtype/remat settings
    (PPO's value and reward models)."""
    from jrft.models import from_pretrained

    m = config.model
    return from_pretrained(
        path or m.path,
        mesh=mesh,
        dtype=DTYPES[m.dtype],
        param_dtype=DTYPES[m.param_dtype],
        remat=m.remat,
        scalar_head=scalar_head,
        seed=config.seed,
    )


def optimizer_from_config(config: RunConfig, *, total_steps: int):
    """``(optax transformation, schedule)`` of the config's ``optim`` section over ``total_steps`` updates."""
    o = config.optim
    return make_optimizer(
        lr=o.lr,
        total_steps=total_steps,
        warmup_steps=o.warmup_steps,
        schedule=o.schedule,
        min_lr_ratio=o.min_lr_ratio,
        weight_decay=o.weight_decay,
        b1=o.betas[0],
        b2=o.betas[1],
        eps=o.eps,
        max_grad_norm=o.max_grad_norm,
    )


def checkpointer_for(config: RunConfig) -> Checkpointer:
    """The run's checkpointer; refuses to silently restart over old checkpoints when resume is off."""
    checkpointer = Checkpointer(
        os.path.join(config.output_dir, "checkpoints"), keep_last=config.train.keep_last
    )
    if not config.train.resume and checkpointer.latest_step() is not None:
        raise FileExistsError(
            f"{checkpointer.directory} holds checkpoints but train.resume=false: "
            "choose a new output_dir or set train.resume=true"
        )
    return checkpointer


def _holds_reference(config: RunConfig) -> bool:
    """Whether the run keeps a frozen reference copy of the parameters (for the memory estimate)."""
    d = config.dpo
    if config.objective == "dpo":
        return not (d.reference_free or d.precompute_ref_logps or not dpo.needs_reference(d.loss_type))
    return (config.objective == "grpo" and config.grpo.beta > 0) or (
        config.objective == "ppo" and config.ppo.kl_coef > 0
    )


def memory_summary(
    config: RunConfig, mesh, state, *, rows: int, cache_rows: int = 0, cache_len: int = 0
) -> str:
    """The per-device memory estimate (``jrft.parallel.memory``) and, beside it, what the parameters really
    occupy per device and what the device reports in use (where it can)."""
    from jrft.models import ModelConfig
    from jrft.parallel.memory import actual_param_bytes_per_device, device_memory_in_use, estimate_memory

    model_cfg = ModelConfig.from_hf(config.model.path) if os.path.isdir(config.model.path) else None
    if model_cfg is None:
        return "memory estimate: skipped (model config not in a local directory)"
    nbytes = {"float32": 4, "bfloat16": 2, "float16": 2}
    micro = config.train.micro_batch_size or rows
    est = estimate_memory(
        model_cfg,
        mesh_shape=tuple(mesh.shape[a] for a in ("data", "fsdp", "tensor")),
        batch=min(micro, rows),
        seq_len=config.data.max_length,
        param_bytes=nbytes[config.model.param_dtype],
        compute_bytes=nbytes[config.model.dtype],
        opt_bytes=nbytes[config.model.param_dtype],
        remat=config.model.remat,
        cache_batch=cache_rows,
        cache_len=cache_len,
        cache_bytes=nbytes[config.model.dtype],
        logits_chunk_size=config.train.logits_chunk_size,
        reference=_holds_reference(config),
        offload_reference=config.train.offload_reference,
    )
    actual = actual_param_bytes_per_device(state.params)
    reported = device_memory_in_use()
    tail = f"; device reports {reported / 2**30:.2f} GiB in use" if reported else ""
    return f"{est.describe()}; parameters actually {actual / 2**30:.3f} GiB/device{tail}"


def export_dir(config: RunConfig) -> str:
    return config.train.export_dir or os.path.join(config.output_dir, "export")


def run_offline(config: RunConfig, *, progress: bool = True, model_eval_fn=None) -> LoopResult:
    """Trains ``config.objective`` (sft, reward or dpo) and exports the result; returns the loop's result.

    ``model_eval_fn(model) -> metrics`` (optional) is called with the current model every ``train.eval_every``
    steps and at the end, next to the eval set's loss; its metrics are logged with an ``eval/`` prefix (e.g.
    held-out exact match of greedy generations).
    """
    from transformers import AutoTokenizer

    from jrft.data import datasets_from_config, eval_batches_from_config, train_iterator_from_config

    if config.objective not in OBJECTIVES:
        raise ValueError(
            f"run_offline: objective {config.objective!r} is not offline; use {sorted(OBJECTIVES)}"
        )
    mesh = mesh_from_config(config.mesh.data, config.mesh.fsdp, config.mesh.tensor)
    tokenizer = AutoTokenizer.from_pretrained(config.model.tokenizer_path)
    train_ds, eval_ds = datasets_from_config(config, tokenizer)
    model = build_model(config, mesh, scalar_head=config.objective == "reward")
    tx, schedule = optimizer_from_config(config, total_steps=config.train.steps)
    graphdef, state = create_train_state(model, tx, seed=config.seed)
    del model
    state, shardings = place_state(state, mesh)
    objective = OBJECTIVES[config.objective](config, graphdef, state)
    if objective.data_kind is not None and train_ds.kind != objective.data_kind:
        raise ValueError(
            f"{config.objective}: these settings train on {objective.data_kind!r} batches, but "
            f"{train_ds.name} holds {train_ds.format!r} rows (reward.loss=listwise needs ranked rows: "
            "prompt, completions, ranking; use reward.loss=bradley_terry for pairs)"
        )
    if objective.attach is not None:
        for dataset in (train_ds, eval_ds):
            if dataset is not None:
                objective.attach(dataset, mesh)
    step = make_train_step(
        graphdef, objective.loss_fn, objective.normalizers, tx, grad_accum=config.train.grad_accum
    )
    jitted = jit_step(step, state_sharding=shardings)

    def step_fn(state, batch):
        state, metrics = jitted(state, batch)
        return state, {**metrics, "lr": schedule(state.step - 1)}

    host = train_iterator_from_config(
        config, train_ds, process_index=jax.process_index(), process_count=jax.process_count()
    )
    batches = DeviceBatches(host, mesh, objective.prepare)
    eval_fn = None
    if eval_ds is not None:
        eval_fn = make_eval_fn(
            graphdef,
            objective,
            lambda: eval_batches_from_config(
                config, eval_ds, process_index=jax.process_index(), process_count=jax.process_count()
            ),
            mesh,
        )
    if model_eval_fn is not None:
        loss_eval = eval_fn

        def eval_fn(state):
            metrics = dict(loss_eval(state)) if loss_eval is not None else {}
            return {**metrics, **model_eval_fn(nnx.merge(graphdef, state.params, state.rest))}

    return loop_and_export(
        config,
        step_fn,
        state,
        batches,
        graphdef,
        tokenizer,
        eval_fn=eval_fn,
        bar_keys=objective.bar_keys,
        progress=progress,
        summary=train_ds.summary() + "\n" + memory_summary(config, mesh, state, rows=config.train.batch_size),
    )


def loop_and_export(
    config: RunConfig,
    step_fn,
    state,
    batches,
    graphdef,
    tokenizer,
    *,
    eval_fn=None,
    bar_keys: tuple[str, ...] = ("loss",),
    progress: bool = True,
    summary: str | None = None,
    export_model: Callable[[Any], nnx.Module] | None = None,
) -> LoopResult:
    """The part every objective shares: the loop (checkpoints, resume, metrics, eval), then the
    transformers-format export of the final parameters (process 0 writes it).

    ``export_model(final_state) -> nnx.Module`` picks what is exported when the state holds more than one
    model (PPO: the policy, not the value model); default: ``graphdef`` merged with ``state.params/rest``.
    """
    from jrft.models import save_pretrained

    t = config.train
    checkpointer = checkpointer_for(config)
    logger = MetricsLogger(
        config.output_dir, total_steps=t.steps, progress=progress, bar_keys=bar_keys, desc=config.objective
    )
    if summary:
        logger.write(summary)
    try:
        result = train_loop(
            step_fn,
            state,
            batches,
            options=LoopOptions(
                total_steps=t.steps, log_every=t.log_every, save_every=t.save_every, eval_every=t.eval_every
            ),
            checkpointer=checkpointer,
            logger=logger,
            eval_fn=eval_fn,
            meta={"config": config.to_dict()},
        )
        if export_model is None:
            final = nnx.merge(graphdef, result.state.params, result.state.rest)
        else:
            final = export_model(result.state)
        # every process: parameters split across processes are gathered collectively; process 0 writes
        path = save_pretrained(final, export_dir(config), tokenizer)
        logger.write(f"exported {config.objective} model to {path}")
    finally:
        logger.close()
        checkpointer.close()
    return result


def param_arrays(state) -> list[np.ndarray]:
    """Every parameter of a train state as host arrays (for tests and comparisons)."""
    return [np.asarray(x) for x in jax.tree.leaves(state.params)]
