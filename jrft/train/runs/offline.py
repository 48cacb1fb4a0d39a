"""``jrft sft | reward | dpo | kto``: from a :class:`jrft.config.RunConfig` to a trained, exported model.

config -> :func:`~jrft.train.runs.setup.setup_run` (mesh, tokenizer, data, model, optimizer, placed state)
-> the objective's :class:`~jrft.train.evaluation.Objective` -> jitted step -> shared loop (checkpoints,
resume, metrics, eval) -> ``save_pretrained`` export.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jrft.config import RunConfig
from jrft.models.lora import LoRAParam, adapters_only, zero_adapters
from jrft.parallel.distributed import host_array
from jrft.train.evaluation import Objective, make_eval_fn
from jrft.train.loop import LoopResult
from jrft.train.objectives import dpo, kto, pairs, reward, sft
from jrft.train.packing import batch_shards, pack_pairs, padded_fraction
from jrft.train.placement import DeviceBatches, device_batch, on_mesh
from jrft.train.reference import FrozenModel
from jrft.train.runs.export import loop_and_export
from jrft.train.runs.setup import memory_summary, setup_run
from jrft.train.step import jit_step, make_train_step

# The fields of an objective's config section that its ``make_loss_fn`` takes under the same name (the
# others are set in offline_loss: logits_chunk_size from train, reward's center_coefficient -> center_coef).
LOSS_OPTIONS: dict[str, tuple[str, ...]] = {
    "dpo": (
        "beta",
        "loss_type",
        "label_smoothing",
        "simpo_gamma",
        "orpo_lambda",
        "sft_weight",
        "discopop_tau",
    ),
    "kto": ("beta", "desirable_weight", "undesirable_weight"),
}


def _loss_options(config: RunConfig, objective: str) -> dict[str, Any]:
    section = getattr(config, objective)
    return {name: getattr(section, name) for name in LOSS_OPTIONS[objective]}


def offline_loss(config: RunConfig) -> tuple[Callable, Callable]:
    """``(normalizers, loss_fn)`` of the config's offline objective (``jrft.train.step``'s contract), for
    the runner and for ``jrft compile``."""
    chunk = config.train.logits_chunk_size
    if config.objective == "sft":
        return sft.normalizers, sft.make_loss_fn(logits_chunk_size=chunk)
    if config.objective == "reward":
        c = config.reward
        if c.loss == "listwise":  # whole rankings [B, K, T], Plackett-Luce
            return reward.ranking_normalizers, reward.make_listwise_loss_fn(
                center_coef=c.center_coefficient, logits_chunk_size=chunk
            )
        return pairs.normalizers, reward.make_loss_fn(
            center_coef=c.center_coefficient, sft_coef=c.sft_coef, logits_chunk_size=chunk
        )
    if config.objective == "kto":
        return kto.normalizers, kto.make_loss_fn(**_loss_options(config, "kto"), logits_chunk_size=chunk)
    return pairs.normalizers, dpo.make_loss_fn(**_loss_options(config, "dpo"), logits_chunk_size=chunk)


def _sft(config: RunConfig, graphdef, state) -> Objective:
    return Objective(*offline_loss(config), bar_keys=("loss", "accuracy"))


def _reward(config: RunConfig, graphdef, state) -> Objective:
    if config.reward.loss == "listwise":
        keys = ("loss", "accuracy", "top1_accuracy")
        return Objective(
            *offline_loss(config), bar_keys=keys, data_kind="ranking", eval_weights={"accuracy": "pairs"}
        )
    return Objective(*offline_loss(config), bar_keys=("loss", "accuracy"))


def _dpo(config: RunConfig, graphdef, state) -> Objective:
    c = config.dpo
    normalizers, loss_fn = offline_loss(config)
    return _against_reference(
        config,
        graphdef,
        state,
        normalizers,
        loss_fn,
        reference_free=c.reference_free or not dpo.needs_reference(c.loss_type),
        precompute=c.precompute_ref_logps,
        keys=("loss", "rewards/accuracies"),
    )


def _kto(config: RunConfig, graphdef, state) -> Objective:
    normalizers, loss_fn = offline_loss(config)
    objective = _against_reference(
        config,
        graphdef,
        state,
        normalizers,
        loss_fn,
        reference_free=False,
        precompute=config.kto.precompute_ref_logps,
        keys=("loss", "kl"),
    )
    return dataclasses.replace(objective, eval_weights=kto.EVAL_WEIGHTS)


def _against_reference(
    config: RunConfig, graphdef, state, normalizers, loss_fn, *, reference_free, precompute, keys
) -> Objective:
    """A pair-layout objective (DPO, KTO) whose batches get the reference's ``ref_chosen_logps`` /
    ``ref_rejected_logps``: zeros (reference-free), precomputed once per dataset, from the base with the
    adapters off (LoRA), or from a frozen copy of the starting policy."""
    if reference_free:
        # No reference model in memory: DPO's reference-free case uses a uniform reference (log-probs 0).

        def prepare(batch):
            zeros = jnp.zeros(pairs.valid_rows(batch).shape, jnp.float32)  # [B] (padded or packed rows)
            return {**batch, "ref_chosen_logps": zeros, "ref_rejected_logps": zeros}

    elif precompute:
        # One pass of the reference (the starting parameters, before any step) over each dataset; the values
        # travel with the examples into every batch, so no reference parameters are kept after it.
        # (LoRA: the base with the adapters off, as on the live path, also when lora.init_from set them)
        params = zero_adapters(state.params) if adapters_only(state.params) else state.params

        def attach(dataset, mesh):
            attach_reference_logps(dataset, graphdef, params, state.rest, mesh, config=config)

        return Objective(normalizers, loss_fn, bar_keys=keys, attach=attach)

    elif adapters_only(state.params):
        # LoRA: the reference is the same forward with the adapters off, inside the step over the state's own
        # base weights (a reference run before the step could not hold them: the state's buffers are
        # donated), so the base is held once and no reference parameters exist besides it.
        return Objective(normalizers, lora_reference_loss(config, graphdef, loss_fn), bar_keys=keys)

    else:
        # The reference is the starting policy, frozen: a copy, since the train state's buffers are donated
        # (in host memory with train.offload_reference).
        frozen = FrozenModel(state.params, state.rest, offload=config.train.offload_reference)
        reference = dpo.make_reference_fn(graphdef, logits_chunk_size=config.train.logits_chunk_size)

        def prepare(batch):
            return {**batch, **frozen.call(reference, batch)}

        return Objective(normalizers, loss_fn, prepare, bar_keys=keys, frozen=frozen.params)
    return Objective(normalizers, loss_fn, prepare, bar_keys=keys)


def lora_reference_loss(config: RunConfig, graphdef, loss_fn):
    """``loss_fn`` of a pair objective (DPO, KTO) under LoRA with the reference computed inside the step:
    the same model's forward with its adapters zeroed, over the batch's pairs (used by the runner and by
    ``jrft compile``)."""
    reference = dpo.make_reference_fn(graphdef, logits_chunk_size=config.train.logits_chunk_size)

    def loss_with_reference(model, batch, norms, key):
        _, adapters, rest = nnx.split(model, LoRAParam, ...)
        return loss_fn(model, {**batch, **reference(zero_adapters(adapters), rest, batch)}, norms, key)

    return loss_with_reference


def attach_reference_logps(dataset, graphdef, params, rest, mesh, *, config: RunConfig) -> None:
    """Adds ``ref_chosen_logps`` / ``ref_rejected_logps`` (host float32) to every example of a preference
    ``dataset``: one ordered pass of the reference ``(graphdef, params, rest)`` in batches of
    ``train.batch_size`` (the same reference function as the live path).

    Because the values are attached to the examples themselves, every batch the iterator makes (any shuffle,
    any resume position, eval batches too) carries its rows' own values. The pass is deterministic, so a
    resumed run recomputes exactly the same values from the same starting parameters.
    """
    reference = on_mesh(
        dpo.make_reference_fn(graphdef, logits_chunk_size=config.train.logits_chunk_size), mesh
    )
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
            out[key].append(host_array(logps[key]))
    for key, parts in out.items():
        values = np.concatenate(parts)[: len(dataset.examples)].astype(np.float32)
        for example, value in zip(dataset.examples, values, strict=True):
            example[key] = value


OBJECTIVES: dict[str, Callable[[RunConfig, Any, Any], Objective]] = {
    "sft": _sft,
    "reward": _reward,
    "dpo": _dpo,
    "kto": _kto,
}


# Objectives whose updates can run on packed rows (their losses read pair_sequence_logps).
PACKABLE = ("dpo", "kto")


class PairBatches:
    """Host preference batches, packed (``jrft.train.packing.pack_pairs``, one packing per micro-batch) with
    ``train.pack_rows``; ``last_padded_fraction``: padding positions / all positions of the last batch.
    ``state_dict`` / ``load_state_dict`` pass through (the loop checkpoints the data position)."""

    def __init__(self, host, config: RunConfig, mesh):
        self.pack = config.train.pack_rows
        if self.pack and jax.process_count() > 1:
            raise ValueError("train.pack_rows: packed update rows need a single-process run")
        self.host, self.groups, self.mesh = host, config.train.grad_accum, mesh
        self.last_padded_fraction = 0.0

    def __next__(self):
        batch = next(self.host)
        if self.pack:
            batch = pack_pairs(batch, groups=self.groups, row_multiple=batch_shards(self.mesh))
            masks = [batch["packed_attention_mask"]]
        else:
            masks = [batch["chosen_attention_mask"], batch["rejected_attention_mask"]]
        self.last_padded_fraction = padded_fraction(masks)
        return batch

    def state_dict(self):
        return self.host.state_dict()

    def load_state_dict(self, state):
        self.host.load_state_dict(state)


def run_offline(config: RunConfig, *, progress: bool = True, model_eval_fn=None) -> LoopResult:
    """Trains ``config.objective`` (sft, reward or dpo) and exports the result; returns the loop's result.

    ``model_eval_fn(model) -> metrics`` (optional) is called with the current model every ``train.eval_every``
    steps and at the end, next to the eval set's loss; its metrics are logged with an ``eval/`` prefix (e.g.
    held-out exact match of greedy generations).
    """
    from jrft.data import eval_batches_from_config, train_iterator_from_config

    if config.objective not in OBJECTIVES:
        raise ValueError(
            f"run_offline: objective {config.objective!r} is not offline; use {sorted(OBJECTIVES)}"
        )
    run = setup_run(config, scalar_head=config.objective == "reward")
    mesh, graphdef, train_ds, eval_ds = run.mesh, run.graphdef, run.train_ds, run.eval_ds
    objective = OBJECTIVES[config.objective](config, graphdef, run.state)
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
        graphdef, objective.loss_fn, objective.normalizers, run.tx, grad_accum=config.train.grad_accum
    )
    jitted = jit_step(step, mesh=mesh, state_sharding=run.shardings)

    def step_fn(state, batch):
        state, metrics = jitted(state, batch)
        return state, {**metrics, "lr": run.schedule(state.step - 1)}

    where = dict(process_index=jax.process_index(), process_count=jax.process_count())
    host_batches = train_iterator_from_config(config, train_ds, **where)
    if config.train.pack_rows and config.objective not in PACKABLE:
        raise ValueError(f"train.pack_rows: {config.objective} batches are not packed (only {PACKABLE})")
    if config.objective in PACKABLE:
        host_batches = PairBatches(host_batches, config, mesh)
        train_step = step_fn

        def step_fn(state, batch):
            state, metrics = train_step(state, batch)
            return state, {**metrics, "padded_fraction": host_batches.last_padded_fraction}

    batches = DeviceBatches(host_batches, mesh, objective.prepare)
    eval_fn = None
    if eval_ds is not None:
        eval_fn = make_eval_fn(
            graphdef, objective, lambda: eval_batches_from_config(config, eval_ds, **where), mesh
        )
    if model_eval_fn is not None:
        loss_eval = eval_fn

        def eval_fn(state):
            metrics = dict(loss_eval(state)) if loss_eval is not None else {}
            return {**metrics, **model_eval_fn(nnx.merge(graphdef, state.params, state.rest))}

    return loop_and_export(
        run,
        step_fn,
        run.state,
        batches,
        eval_fn=eval_fn,
        bar_keys=objective.bar_keys,
        progress=progress,
        summary=train_ds.summary() + "\n" + memory_summary(config, mesh, run.state),
    )
