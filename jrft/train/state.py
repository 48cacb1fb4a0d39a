"""The train state: one pytree holding everything a step changes, so it can be jitted, sharded and saved.

A flax.nnx model is split once into a static ``graphdef`` (kept outside the state, it never changes) and
its variables: trainable parameters (``nnx.Param``; with LoRA only the adapters) and any other variables
(``rest``: e.g. a frozen buffer, or the frozen base weights under LoRA). Steps rebuild the model with
``nnx.merge(graphdef, params, rest)`` inside ``jit``.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import nnx, struct

from jrft.models.lora import LoRAParam, adapters_only, has_adapters


@struct.dataclass
class TrainState:
    """Attributes:
    step: int32 scalar, optimizer steps taken.
    params: ``nnx.State`` of the trainable parameters.
    rest: ``nnx.State`` of the model's other variables (not differentiated).
    opt_state: the optax state for ``params``.
    rng: ``uint32[2]`` key data; steps derive per-step keys with ``fold_in(rng, step)``.
    """

    step: jax.Array
    params: Any
    rest: Any
    opt_state: Any
    rng: jax.Array

    def key(self, salt: int = 0) -> jax.Array:
        """A fresh PRNG key for this step (and ``salt``), deterministic in ``(rng, step, salt)``."""
        base = jax.random.wrap_key_data(self.rng)
        return jax.random.fold_in(jax.random.fold_in(base, self.step), salt)


def trainable_filter(model: nnx.Module):
    """What a step differentiates: every ``nnx.Param``, or, when the model holds LoRA adapters
    (``jrft.models.lora.LoRAParam``), only those and a scalar head (a reward / value model's fresh head must
    learn; PEFT's ``modules_to_save``). Everything else (the frozen base) goes to ``rest``."""
    if not has_adapters(model):
        return nnx.Param
    return nnx.Any(LoRAParam, nnx.All(nnx.Param, nnx.PathContains("scalar_head")))


def split_model(model: nnx.Module) -> tuple[nnx.GraphDef, Any, Any]:
    """``(graphdef, params, rest)`` of an nnx model; ``params`` are its trainable variables
    (:func:`trainable_filter`: all ``nnx.Param`` without LoRA, the adapters with it)."""
    return nnx.split(model, trainable_filter(model), ...)


def create_train_state(
    model: nnx.Module, optimizer: optax.GradientTransformation, *, seed: int
) -> tuple[nnx.GraphDef, TrainState]:
    """Splits ``model`` and initialises the optimizer; returns ``(graphdef, state)``.

    The optimizer state is created with ``jit`` so it inherits the parameters' shardings.
    """
    graphdef, params, rest = split_model(model)
    opt_state = jax.jit(optimizer.init)(params)
    step = jnp.zeros((), jnp.int32)
    rng = jax.random.key_data(jax.random.key(seed))
    state = TrainState(step=step, params=params, rest=rest, opt_state=opt_state, rng=rng)
    # Commit every leaf where it is: an uncommitted input (fresh scalars, optimizer zeros) makes the first
    # jitted step compile twice (once for it, once for the committed state the step returns). Runners on a
    # mesh then move the state onto its explicit shardings (jrft.train.placement.place_state).
    return graphdef, jax.tree.map(lambda x: jax.device_put(x, x.sharding), state)


def _is_state(x) -> bool:
    return isinstance(x, TrainState)


def checkpoint_part(tree: Any) -> Any:
    """What a checkpoint holds of ``tree`` (a :class:`TrainState` or a pytree of them, e.g. PPO's pair): all
    of it, except that a LoRA train state (params = adapters only) leaves out the frozen base weights (the
    ``nnx.Param`` variables of its ``rest``). They never change, so a resume reloads them from
    ``model.path``: a checkpoint is then adapter-sized (adapters, their optimizer state, step, rng)."""

    def one(x):
        if _is_state(x) and adapters_only(x.params):
            return x.replace(rest=x.rest.filter(nnx.Not(nnx.Param)))
        return x

    return jax.tree.map(one, tree, is_leaf=_is_state)


def with_frozen_base(restored: Any, live: Any) -> Any:
    """``restored`` (a :func:`checkpoint_part`) completed with the frozen base weights of ``live`` (the
    freshly built state of the same run)."""

    def one(r, x):
        if _is_state(r) and adapters_only(r.params):
            return r.replace(rest=nnx.merge_state(x.rest.filter(nnx.Param), r.rest))
        return r

    return jax.tree.map(one, restored, live, is_leaf=_is_state)
