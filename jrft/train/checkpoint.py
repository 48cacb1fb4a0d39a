"""Atomic, resumable checkpoints with orbax.

A checkpoint is one step directory holding two items: ``state`` (any pytree of arrays: parameters,
optimizer state, step, rng — saved collectively by every process, each writing its own shards) and
``meta`` (a JSON dict: the data iterator's position, the config, metrics worth keeping). Orbax writes into
a temporary directory and renames it when complete, so a run killed mid-save leaves the previous checkpoint
intact and the half-written one is ignored. ``keep_last`` bounds how many are kept.

The state of a LoRA run is saved without its frozen base weights (``jrft.train.state.checkpoint_part``):
restoring onto the run's freshly built state (base loaded from ``model.path``) puts them back.

Restoring takes an *abstract* target (``jax.ShapeDtypeStruct`` with shardings), so a checkpoint written on
one mesh restores onto another.
"""

from __future__ import annotations

import os
from typing import Any

import jax
import jax.numpy as jnp
import orbax.checkpoint as ocp

from jrft.train.state import checkpoint_part, with_frozen_base


def abstract_like(tree: Any) -> Any:
    """``ShapeDtypeStruct`` (with sharding) for every array leaf of ``tree``: the restore target."""

    def to_abstract(x):
        if isinstance(x, jax.Array):
            return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding)
        return x

    return jax.tree.map(to_abstract, tree)


@jax.jit
def _all_finite(leaves: list[jax.Array]) -> jax.Array:
    checks = [jnp.isfinite(x).all() for x in leaves]
    return jnp.stack(checks).all() if checks else jnp.bool_(True)


def tree_all_finite(tree: Any) -> bool:
    """Whether every floating-point array in ``tree`` is finite: one reduction per leaf on device (where the
    arrays live, sharded as they are) and one boolean back to the host. Integer and key leaves are skipped."""
    leaves = [
        x
        for x in jax.tree.leaves(tree)
        if hasattr(x, "dtype") and hasattr(x, "shape") and jnp.issubdtype(x.dtype, jnp.inexact)
    ]
    return bool(_all_finite(leaves))


class Checkpointer:
    """Saves and restores ``(state, meta)`` pairs under ``directory/<step>``.

    Args:
      directory: where step directories live (local path or a ``gs://`` bucket).
      keep_last: how many of the newest checkpoints to keep.
      async_save: let orbax write in the background while training continues.
    """

    def __init__(self, directory: str | os.PathLike, *, keep_last: int = 3, async_save: bool = False):
        directory = str(directory)
        if "://" not in directory:
            directory = os.path.abspath(directory)
        self.directory = directory
        options = ocp.CheckpointManagerOptions(
            max_to_keep=keep_last, create=True, enable_async_checkpointing=async_save
        )
        self._manager = ocp.CheckpointManager(directory, options=options)

    def latest_step(self) -> int | None:
        """The newest complete checkpoint's step, or ``None`` when there is none."""
        return self._manager.latest_step()

    def all_steps(self) -> list[int]:
        return list(self._manager.all_steps())

    def save(self, step: int, state: Any, meta: dict[str, Any]) -> None:
        """Writes ``state`` and ``meta`` as checkpoint ``step`` (overwrites nothing that exists)."""
        if step in self._manager.all_steps():
            return
        self._manager.save(
            step,
            args=ocp.args.Composite(
                state=ocp.args.StandardSave(checkpoint_part(state)), meta=ocp.args.JsonSave(meta)
            ),
            force=True,
        )

    def restore(self, step: int | None, target: Any) -> tuple[Any, dict[str, Any]]:
        """Restores checkpoint ``step`` (``None``: the latest) onto ``target``'s shapes and shardings.

        ``target`` is a pytree of arrays or ``ShapeDtypeStruct``s with the same structure as what was saved
        (for a LoRA train state: the run's state, whose frozen base weights are returned as they are).
        """
        if step is None:
            step = self.latest_step()
            if step is None:
                raise FileNotFoundError(f"no checkpoint to restore in {self.directory}")
        part = checkpoint_part(target)
        try:
            restored = self._restore(step, part)
        except ValueError:
            if jax.tree.structure(part) == jax.tree.structure(target):
                raise
            # a LoRA checkpoint written before checkpoints left the base out: it holds the whole state
            restored = self._restore(step, target)
            return restored["state"], dict(restored["meta"])
        state = restored["state"] if target is None else with_frozen_base(restored["state"], target)
        return state, dict(restored["meta"])

    def _restore(self, step: int, target: Any) -> dict[str, Any]:
        args = ocp.args.Composite(
            state=ocp.args.StandardRestore(abstract_like(target)), meta=ocp.args.JsonRestore()
        )
        return self._manager.restore(step, args=args)

    def read_meta(self, step: int | None = None) -> dict[str, Any]:
        """The JSON meta of checkpoint ``step`` (``None``: the latest) without touching the arrays."""
        if step is None:
            step = self.latest_step()
            if step is None:
                raise FileNotFoundError(f"no checkpoint in {self.directory}")
        restored = self._manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))
        return dict(restored["meta"])

    def wait(self) -> None:
        """Blocks until a background save has finished."""
        self._manager.wait_until_finished()

    def close(self) -> None:
        self._manager.wait_until_finished()
        self._manager.close()
