"""Device meshes with the three jrft axes: ``data`` (pure data parallel), ``fsdp`` (data parallel with
parameters sharded, ZeRO-3 style) and ``tensor`` (Megatron-style tensor parallelism over heads / MLP / vocab).

Axis types are ``Auto`` on purpose: in this JAX version ``jax.make_mesh`` defaults to ``Explicit`` axes, where
every op's output sharding is part of its type and mismatches must be resolved by hand. jrft instead shards
parameters (and batches) with ``NamedSharding``s, jits with in/out shardings, adds a few logical activation
constraints and lets GSPMD propagate the rest — the ``Auto`` model.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import jax
import numpy as np
from jax.sharding import AxisType, Mesh

MESH_AXES: tuple[str, ...] = ("data", "fsdp", "tensor")


def mesh_shape(n_devices: int, data: int = -1, fsdp: int = 1, tensor: int = 1) -> tuple[int, int, int]:
    """Resolves one ``-1`` axis from the device count; checks the product equals ``n_devices``."""
    sizes = {"data": data, "fsdp": fsdp, "tensor": tensor}
    free = [name for name, size in sizes.items() if size == -1]
    if len(free) > 1:
        raise ValueError(f"make_mesh: at most one axis may be -1, got {free}")
    bad = {name: size for name, size in sizes.items() if size != -1 and size < 1}
    if bad:
        raise ValueError(f"make_mesh: axis sizes must be >= 1 or -1, got {bad}")
    fixed = math.prod(size for size in sizes.values() if size != -1)
    if free:
        if n_devices % fixed:
            raise ValueError(
                f"make_mesh: {n_devices} devices are not divisible by the fixed axes {sizes} "
                f"(product {fixed})"
            )
        sizes[free[0]] = n_devices // fixed
    elif fixed != n_devices:
        raise ValueError(
            f"make_mesh: axis sizes {sizes} multiply to {fixed}, but there are {n_devices} devices"
        )
    return sizes["data"], sizes["fsdp"], sizes["tensor"]


def make_mesh(
    data: int = -1, fsdp: int = 1, tensor: int = 1, devices: Sequence[jax.Device] | None = None
) -> Mesh:
    """A ``(data, fsdp, tensor)`` mesh with ``Auto`` axis types.

    Args:
      data, fsdp, tensor: axis sizes; one of them may be -1 (filled from the device count).
      devices: devices to use (default: all of ``jax.devices()``, in the order ``jax.make_mesh`` picks,
        which keeps the ``tensor`` axis on nearby devices).

    Example:
      >>> mesh = make_mesh(data=-1, tensor=2)  # 8 devices -> (4, 1, 2)
    """
    devices = list(jax.devices() if devices is None else devices)
    shape = mesh_shape(len(devices), data, fsdp, tensor)
    axis_types = (AxisType.Auto,) * len(MESH_AXES)
    if len(devices) == len(jax.devices()) and set(devices) == set(jax.devices()):
        return jax.make_mesh(shape, MESH_AXES, axis_types=axis_types)
    return Mesh(np.asarray(devices).reshape(shape), MESH_AXES, axis_types=axis_types)
