"""Putting things on the run's mesh: host batches and train states (explicit shardings for the jitted
programs), and running jitted programs inside the mesh so logical sharding constraints bind.

Why :func:`on_mesh`: the model's activations carry logical sharding constraints
(``jrft.parallel.with_logical_constraint``), which only bind while a mesh is set (``jax.set_mesh``). A
program traced without one silently drops them: every activation is then replicated, which on a TPU slice
multiplies activation memory by the number of devices (an 8-way fsdp Llama-3-1B step needed 37.9 GiB of
temporaries per chip without the mesh, 8.6 GiB with it). Every jitted program of a run is called and lowered
through :func:`on_mesh`.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding

from jrft.parallel import logical_to_spec, state_shardings


def batch_sharding(mesh: Mesh, shape: tuple[int, ...]) -> NamedSharding:
    """Leading (batch) axis over the mesh's ``batch`` rule (data x fsdp), the rest replicated."""
    axes = ("batch",) + (None,) * (len(shape) - 1)
    return NamedSharding(mesh, logical_to_spec(axes, shape, mesh))


def device_batch(batch: Mapping[str, Any], mesh: Mesh) -> dict[str, jax.Array]:
    """Host numpy batch (this process's rows) -> global arrays sharded over the batch axis.

    Non-array entries (prompt strings, extra columns) are left out: they stay on the host.
    """
    out = {}
    for key, value in batch.items():
        if not isinstance(value, np.ndarray):
            continue
        global_shape = (value.shape[0] * jax.process_count(), *value.shape[1:])
        sharding = batch_sharding(mesh, global_shape)
        out[key] = jax.make_array_from_process_local_data(sharding, value, global_shape)
    return out


class DeviceBatches:
    """Wraps a host batch iterator: host batch -> sharded device arrays -> ``prepare(batch)``.

    Passes ``state_dict`` / ``load_state_dict`` through, so the loop checkpoints the data position.
    """

    def __init__(self, host, mesh: Mesh, prepare: Callable[[dict], dict] = lambda batch: batch):
        self.host, self.mesh, self.prepare = host, mesh, prepare

    def __next__(self):
        return self.prepare(device_batch(next(self.host), self.mesh))

    def state_dict(self):
        return self.host.state_dict()

    def load_state_dict(self, state):
        self.host.load_state_dict(state)


def place_state(state: Any, mesh: Mesh) -> tuple[Any, Any]:
    """Puts every leaf of a train state on its sharding (logical names of nnx Variables; the rest
    replicated). Returns ``(placed_state, shardings)``; the shardings are the jit in/out shardings."""
    shardings = state_shardings(state, mesh)
    return jax.tree.map(_place, state, shardings), shardings


def _place(x: Any, sharding: NamedSharding) -> Any:
    """``device_put``, except that a committed single-process array bound for a sharding that spans several
    processes goes through the host (JAX refuses the device-to-device cross-host copy): every process
    holds the same value there (fresh optimizer zeros, the step, the seed's rng), and ``device_put`` of a
    host array checks exactly that."""
    if isinstance(x, jax.Array) and x.is_fully_addressable and not sharding.is_fully_addressable:
        return jax.device_put(np.asarray(x), sharding)
    return jax.device_put(x, sharding)


class on_mesh:  # noqa: N801 (used like a function: ``on_mesh(jax.jit(f), mesh)``)
    """A jitted function that is called and lowered inside ``jax.set_mesh(mesh)`` (see the module doc).

    ``on_mesh(jitted, mesh)(*args)`` runs it; ``.lower(*args)`` lowers it (for AOT compilation); ``.fn``
    is the jitted function itself. ``mesh=None`` is the identity (one device, nothing to bind).
    """

    def __init__(self, fn: Callable, mesh: Mesh | None):
        self.fn, self.mesh = fn, mesh

    def __call__(self, *args, **kwargs):
        if self.mesh is None:
            return self.fn(*args, **kwargs)
        with jax.set_mesh(self.mesh):
            return self.fn(*args, **kwargs)

    def lower(self, *args, **kwargs):
        if self.mesh is None:
            return self.fn.lower(*args, **kwargs)
        with jax.set_mesh(self.mesh):
            return self.fn.lower(*args, **kwargs)
