"""Offline objectives as the engine sees them (:class:`Objective`), and their evaluation over an eval set."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterator
from typing import Any

import jax
from flax import nnx

from jrft.train.placement import device_batch, on_mesh


@dataclasses.dataclass
class Objective:
    """What differs between the offline objectives (SFT, reward model, DPO).

    ``normalizers`` and ``loss_fn`` are the step's contract (:mod:`jrft.train.step`). ``prepare(batch) ->
    batch`` runs outside the jitted step on device batches (e.g. DPO's reference log-probs). ``bar_keys``
    are the metrics shown in the progress bar. ``attach(dataset, mesh)``, when set, runs once per dataset
    (train and eval) before any batch is made: it adds per-example values that the collator carries into
    batches (DPO's precomputed reference log-probs). ``frozen`` holds the device arrays the objective keeps
    besides the train state (DPO's live reference parameters), ``None`` if none. ``data_kind`` is the batch
    kind the loss needs (None: the objective's usual kind). ``eval_weights`` maps a metric to the normaliser
    it is a mean over, when that is not the first one (evaluation averages batches weighted by it: the
    listwise reward model's pairwise accuracy is a mean over pairs, its loss over rankings).
    """

    normalizers: Callable
    loss_fn: Callable
    prepare: Callable[[dict], dict] = lambda batch: batch
    bar_keys: tuple[str, ...] = ("loss",)
    attach: Callable[[Any, Any], None] | None = None
    frozen: Any = None
    data_kind: str | None = None
    eval_weights: dict[str, str] = dataclasses.field(default_factory=dict)


def make_eval_fn(graphdef, objective: Objective, batches_fn: Callable[[], Iterator[dict]], mesh):
    """``state -> metrics``: the objective's loss and metrics averaged over one pass of the eval set
    (weighted by each batch's normaliser, so filler rows do not count, and a mean over the whole set equals
    the mean of the one big batch; see ``Objective.eval_weights``)."""

    def evaluate(params, rest, batch):
        norms = objective.normalizers(batch)
        model = nnx.merge(graphdef, params, rest)
        loss, metrics = objective.loss_fn(model, batch, norms, None)  # no key: no dropout
        metrics = {"loss": loss, **metrics}
        first = next(iter(norms))
        return metrics, {k: norms[objective.eval_weights.get(k, first)] for k in metrics}

    evaluate = on_mesh(jax.jit(evaluate), mesh)

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
