"""One generic, pure train step with gradient accumulation; the objectives supply only their loss.

An objective is two functions:
  ``normalizers(batch) -> dict``: global counts computed on the *whole* batch before it is split
      (e.g. ``{"tokens": number of loss tokens}`` for SFT, ``{"pairs": B}`` for DPO);
  ``loss_fn(model, micro_batch, normalizers, key) -> (loss, metrics)``: the micro-batch's *contribution*
      to the full-batch loss and metrics (sums divided by the global counts).
Because every contribution is a sum divided by a global count, adding micro-batch contributions gives
exactly the full-batch value: gradient accumulation equals the full batch, whatever the split.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from jrft.train.placement import on_mesh
from jrft.train.state import TrainState

Batch = Mapping[str, jax.Array]
LossFn = Callable[
    [nnx.Module, Batch, Mapping[str, jax.Array], jax.Array], tuple[jax.Array, dict[str, jax.Array]]
]
NormalizersFn = Callable[[Batch], dict[str, jax.Array]]


def split_micro_batches(batch: Batch, grad_accum: int) -> Batch:
    """``[B, ...] -> [grad_accum, B / grad_accum, ...]``; micro-batch ``i`` holds rows ``i, i + A, ...``.

    Strided rather than contiguous so that a batch sharded over its leading axis stays sharded the same way
    inside every micro-batch (each device keeps its own rows).
    """

    def split(x):
        if x.shape[0] % grad_accum:
            raise ValueError(f"batch size {x.shape[0]} is not divisible by grad_accum={grad_accum}")
        x = x.reshape(x.shape[0] // grad_accum, grad_accum, *x.shape[1:])  # [B/A, A, ...]
        return jnp.swapaxes(x, 0, 1)  # [A, B/A, ...]

    return jax.tree.map(split, batch)


def make_train_step(
    graphdef: nnx.GraphDef,
    loss_fn: LossFn,
    normalizers: NormalizersFn,
    optimizer: optax.GradientTransformation,
    *,
    grad_accum: int = 1,
) -> Callable[[TrainState, Batch], tuple[TrainState, dict[str, jax.Array]]]:
    """Builds the pure ``step(state, batch) -> (state, metrics)`` (not yet jitted; see :func:`jit_step`).

    Metrics: the objective's metrics plus ``loss``, ``grad_norm`` (before clipping) and ``step``.
    """
    if grad_accum < 1:
        raise ValueError(f"grad_accum must be >= 1, got {grad_accum}")

    def micro_grads(state: TrainState, micro: Batch, norms, index):
        def objective(params):
            model = nnx.merge(graphdef, params, state.rest)
            return loss_fn(model, micro, norms, state.key(index))

        (loss, metrics), grads = jax.value_and_grad(objective, has_aux=True)(state.params)
        return grads, {"loss": loss, **metrics}

    def step(state: TrainState, batch: Batch):
        norms = normalizers(batch)
        if grad_accum == 1:
            grads, metrics = micro_grads(state, batch, norms, 0)
        else:
            micro = split_micro_batches(batch, grad_accum)

            def body(carry, xs):
                grads_sum, metrics_sum = carry
                index, mb = xs
                grads, metrics = micro_grads(state, mb, norms, index)
                return (
                    jax.tree.map(jnp.add, grads_sum, grads),
                    jax.tree.map(jnp.add, metrics_sum, metrics),
                ), None

            zeros = jax.tree.map(jnp.zeros_like, state.params)
            metric_shapes = jax.eval_shape(
                lambda: micro_grads(state, jax.tree.map(lambda x: x[0], micro), norms, 0)
            )
            metric_zeros = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), metric_shapes[1])
            (grads, metrics), _ = jax.lax.scan(body, (zeros, metric_zeros), (jnp.arange(grad_accum), micro))
        updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        metrics = {**metrics, "grad_norm": optax.tree.norm(grads)}
        new_state = state.replace(step=state.step + 1, params=params, opt_state=opt_state)
        return new_state, metrics

    return step


def jit_step(
    step: Callable[[TrainState, Batch], tuple[TrainState, dict[str, jax.Array]]],
    *,
    mesh: Any = None,
    state_sharding: Any = None,
    batch_sharding: Any = None,
    donate: bool = True,
) -> on_mesh:
    """``jax.jit`` with explicit input/output shardings, called and lowered inside ``mesh`` (so the model's
    logical sharding constraints bind: ``jrft.train.placement.on_mesh``); the old state's buffers are
    donated.

    ``state_sharding`` / ``batch_sharding`` are pytrees of ``NamedSharding`` (or ``None`` to let XLA
    choose, e.g. on one device). ``mesh`` is the run's mesh (``None``: no mesh, e.g. one device). Metrics
    come back replicated.
    """
    kwargs: dict[str, Any] = {}
    if state_sharding is not None or batch_sharding is not None:
        kwargs["in_shardings"] = (state_sharding, batch_sharding)
        kwargs["out_shardings"] = (state_sharding, None)
    return on_mesh(jax.jit(step, donate_argnums=(0,) if donate else (), **kwargs), mesh)
