"""Placing host batches and train states on the mesh (explicit shardings for the jitted steps)."""

from __future__ import annotations

from collections.abc import Mapping
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


def mesh_from_config(data: int = -1, fsdp: int = 1, tensor: int = 1) -> Mesh:
    """The run's mesh. With no ``-1`` axis and fewer devices asked for than exist, the first
    ``data * fsdp * tensor`` devices are used (e.g. ``mesh.data=1`` for a single-device run)."""
    from jrft.parallel import make_mesh

    sizes = (data, fsdp, tensor)
    if -1 not in sizes:
        wanted = data * fsdp * tensor
        if wanted < jax.device_count():
            return make_mesh(data=data, fsdp=fsdp, tensor=tensor, devices=jax.devices()[:wanted])
    return make_mesh(data=data, fsdp=fsdp, tensor=tensor)
