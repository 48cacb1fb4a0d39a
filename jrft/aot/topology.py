"""TPU topologies without a TPU: names, device-less devices and the HBM of one chip.

libtpu (the ``jax[tpu]`` extra) builds compile-only TPU devices on any host
(``jax.experimental.topologies.get_topology_desc``); a mesh over them lets the real TPU compiler compile
and size a program here (``jrft.aot.compile``).

Names. Two forms are accepted (case and surrounding spaces ignored):

- the topology form libtpu takes, ``GEN:AxB`` for ``v5e`` / ``v6e`` (chips on a 2-D torus) and
  ``GEN:AxBxC`` for ``v4`` / ``v5p`` (3-D), e.g. ``v5e:2x4``, ``v6e:2x4``, ``v4:2x2x1``, ``v5p:2x2x1``;
- Cloud's accelerator-type form ``GEN-N``: ``v5e-8``, ``v6e-8``, ``v4-8``, ``v5p-8`` (``v5litepod-N`` is an
  alias of ``v5e-N``). N counts chips on v5e / v6e (one TensorCore per chip) but TensorCores on v4 / v5p
  (two per chip, used as one "megacore" device): ``v5p-8`` and ``v4-8`` are 4 chips, ``2x2x1``. This is
  Cloud's naming (and MaxText's table, ``accelerator_to_spec_map.py``); libtpu itself only takes ``v4-N``.
  ``GEN-N`` maps to the usual slice shape: the smallest dimension doubles, the last among equals
  (``v5p-16`` 2x2x2, ``v5p-32`` 2x2x4, ``v5p-64`` 2x4x4; ``v5e-16`` 4x4, ``v5e-32`` 4x8); shapes outside
  that sequence (``v5p-384`` = 4x4x12) are given in the topology form.

v4 and v5p devices are built as megacores (``chip_config_name="megacore"``: one device per chip, as JAX
runs them on a TPU VM); without it libtpu 0.0.42 gives v4 one device per TensorCore, each with half the
HBM. Slices of fewer than 4 chips (``v5e:1x1``) get a matching ``chips_per_host_bounds`` (libtpu's
default, 2x2x1, does not divide them).
"""

from __future__ import annotations

import functools
import math
import os
import re
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

# generation -> (number of torus dimensions, TensorCores counted per chip in the "GEN-N" name)
GENERATIONS: dict[str, tuple[int, int]] = {"v4": (3, 2), "v5e": (2, 1), "v5p": (3, 2), "v6e": (2, 1)}
_ALIASES = {"v5litepod": "v5e"}

# device_kind (as libtpu names its devices) -> generation
DEVICE_KINDS: dict[str, str] = {"TPU v4": "v4", "TPU v5 lite": "v5e", "TPU v5": "v5p", "TPU v6 lite": "v6e"}

GIB = 1024**3

# Published HBM per chip (Cloud TPU system architecture pages): the fallback when the compiler cannot be
# asked. The compiler keeps part of it for itself; what it reports usable is in COMPILER_HBM_BYTES.
PUBLISHED_HBM_BYTES: dict[str, int] = {"v4": 32 * GIB, "v5e": 16 * GIB, "v5p": 95 * GIB, "v6e": 32 * GIB}

# Usable HBM per chip in GiB as the TPU compiler states it ("... exceeds available HBM (15.75G)"), measured
# 2026-12-02 with jax 0.10.2 / libtpu 0.0.42.1 by ``chip_hbm_bytes``'s probe: v5e 15.75, v5p 95.74,
# v6e 31.25, v4 30.75 as a megacore (15.25 per TensorCore when v4 is built one device per core). For
# reference and tests only: ``chip_hbm_bytes`` asks the compiler (once per device kind and process).
COMPILER_HBM_GIB: dict[str, float] = {"v4": 30.75, "v5e": 15.75, "v5p": 95.74, "v6e": 31.25}

_ACCEPTED = (
    "accepted: v5e:AxB, v6e:AxB, v4:AxBxC, v5p:AxBxC (e.g. v5e:2x4, v5p:2x2x1) or v5e-N, v6e-N, v4-N, v5p-N "
    "(e.g. v5e-8; N = chips on v5e/v6e, TensorCores = 2 x chips on v4/v5p)"
)
_TOPOLOGY_FORM = re.compile(r"^(?P<gen>[a-z0-9]+):(?P<dims>[0-9]+(?:x[0-9]+)*)$")
_COUNT_FORM = re.compile(r"^(?P<gen>[a-z0-9]+)-(?P<count>[0-9]+)$")


def _bad(name: str, why: str) -> ValueError:
    return ValueError(f"bad TPU topology {name!r}: {why}; {_ACCEPTED}")


def _shape_for_chips(chips: int, ndim: int) -> tuple[int, ...]:
    """Cloud's slice shape for a power-of-two chip count: start from 1x1 (2-D) or 2x2x1 (3-D, at least 4
    chips) and double the smallest dimension, the last among equals."""
    dims = [1, 1] if ndim == 2 else [2, 2, 1]
    while math.prod(dims) < chips:
        smallest = min(dims)
        last = max(i for i, d in enumerate(dims) if d == smallest)
        dims[last] *= 2
    return tuple(dims)


def parse_topology(name: str) -> str:
    """The canonical topology name (``"v5e:2x4"``) of ``name``, for ``get_topology_desc``.

    Args:
      name: ``v5e:2x4``, ``v6e:2x4``, ``v4:2x2x1``, ``v5p:2x2x1`` or ``v5e-8``, ``v6e-8``, ``v4-8``,
        ``v5p-8`` (see the module docstring for what N counts).

    Raises:
      ValueError: one line naming the accepted forms.

    Example:
      >>> parse_topology("v5p-8")
      'v5p:2x2x1'
    """
    if not isinstance(name, str):
        raise _bad(str(name), "not a string")
    text = name.strip().lower()
    if m := _TOPOLOGY_FORM.match(text):
        gen = _ALIASES.get(m["gen"], m["gen"])
        if gen not in GENERATIONS:
            raise _bad(name, f"unknown TPU generation {m['gen']!r}")
        dims = tuple(int(d) for d in m["dims"].split("x"))
        ndim = GENERATIONS[gen][0]
        if len(dims) != ndim:
            raise _bad(name, f"{gen} takes {ndim} dimensions, got {len(dims)}")
        if min(dims) < 1:
            raise _bad(name, "dimensions must be >= 1")
        return f"{gen}:{'x'.join(map(str, dims))}"
    if m := _COUNT_FORM.match(text):
        gen = _ALIASES.get(m["gen"], m["gen"])
        if gen not in GENERATIONS:
            raise _bad(name, f"unknown TPU generation {m['gen']!r}")
        ndim, cores = GENERATIONS[gen]
        count = int(m["count"])
        chips, rest = divmod(count, cores)
        minimum = 4 if ndim == 3 else 1
        if rest or chips < minimum or chips & (chips - 1):
            unit = "TensorCores (2 per chip)" if cores == 2 else "chips"
            raise _bad(name, f"N counts {unit} and must give a power of two >= {minimum} chips")
        return f"{gen}:{'x'.join(map(str, _shape_for_chips(chips, ndim)))}"
    raise _bad(name, "unrecognised form")


def _topology_kwargs(canonical: str) -> dict:
    gen, dims_text = canonical.split(":")
    dims = [int(d) for d in dims_text.split("x")] + [1] * (3 - GENERATIONS[gen][0])
    kwargs: dict = {}
    if GENERATIONS[gen][1] == 2:
        kwargs["chip_config_name"] = "megacore"
    host = (2, 2, 1)
    if any(d % h for d, h in zip(dims, host, strict=True)):
        kwargs["chips_per_host_bounds"] = tuple(min(d, h) for d, h in zip(dims, host, strict=True))
    return kwargs


@functools.cache
def _devices(canonical: str) -> tuple:
    from jax.experimental import topologies

    # libtpu takes /tmp/libtpu_lockfile for the life of any process that initialised it (every JAX process
    # on a host with libtpu installed, TPU or not): without this a second process on the host cannot build
    # a compile-only topology ("Internal error when accessing libtpu multi-process lockfile"). Set only
    # here, when a device-less topology is asked for, so a training process's own backend is unaffected.
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
    try:
        topo = topologies.get_topology_desc(
            platform="tpu", topology_name=canonical, **_topology_kwargs(canonical)
        )
    except jax.errors.JaxRuntimeError as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        if first.startswith("INVALID_ARGUMENT"):
            raise ValueError(f"bad TPU topology {canonical!r}: libtpu says {first}") from e
        raise RuntimeError(f"cannot build TPU topology {canonical!r} (libtpu: {first})") from e
    except (ImportError, NotImplementedError) as e:
        raise RuntimeError(
            f"cannot build TPU topology {canonical!r}: compiling for TPU needs libtpu "
            f"(pip install 'jax[tpu]'): {e}"
        ) from e
    return tuple(topo.devices)


def topology_devices(name: str) -> list:
    """The device-less TPU devices of topology ``name`` (any accepted form), one per chip; cached per
    name. Build a mesh over them with ``jrft.parallel.make_mesh(..., devices=topology_devices(name))``."""
    return list(_devices(parse_topology(name)))


def generation_of(device) -> str:
    """``"v5e"`` etc. for a TPU device (by its ``device_kind``); ValueError for others."""
    kind = getattr(device, "device_kind", "")
    if getattr(device, "platform", None) != "tpu" or kind not in DEVICE_KINDS:
        raise ValueError(f"not a known TPU device: {device!r} (kind {kind!r}; known {sorted(DEVICE_KINDS)})")
    return DEVICE_KINDS[kind]


_SIZE = r"\(?\s*([0-9]+(?:\.[0-9]+)?)\s*([KMGT]?)i?B?\s*\)?"
_AVAILABLE = re.compile(r"available HBM\s*" + _SIZE)
_UNITS = {"": 1, "K": 1024, "M": 1024**2, "G": 1024**3, "T": 1024**4}


def parse_size(value: str, unit: str) -> int:
    """``("15.75", "G")`` -> bytes (the compiler's sizes are binary: G = GiB)."""
    return round(float(value) * _UNITS[unit])


def available_hbm_in(message: str) -> int | None:
    """The ``available HBM (X)`` a TPU compiler out-of-memory message names, in bytes (None if absent)."""
    m = _AVAILABLE.search(message)
    return parse_size(m[1], m[2]) if m else None


def _probe_hbm(device) -> int | None:
    """Compiles, for one chip, a program needing 1 TiB of temporaries; the compiler's refusal names the
    usable HBM (to 0.01 GiB). Takes well under a second."""
    from jax.sharding import Mesh, NamedSharding, PartitionSpec

    mesh = Mesh(np.asarray([device]), ("chip",))
    x = jax.ShapeDtypeStruct((2**19,), jnp.float32, sharding=NamedSharding(mesh, PartitionSpec()))

    def huge(x):  # [2^19, 2^19] float32 = 1 TiB, kept whole by the barrier
        return jax.lax.optimization_barrier(jnp.outer(x, x)).sum()

    try:
        jax.jit(huge).lower(x).compile()
    except jax.errors.JaxRuntimeError as e:
        return available_hbm_in(str(e))
    return None


_HBM_CACHE: dict[tuple[str, bool], int] = {}


def _compiler_or_published_hbm(device, per_core: bool) -> int:
    key = (device.device_kind, per_core)
    if key not in _HBM_CACHE:
        probed = _probe_hbm(device)
        if probed is None:
            probed = PUBLISHED_HBM_BYTES[generation_of(device)] // (2 if per_core else 1)
        _HBM_CACHE[key] = probed
    return _HBM_CACHE[key]


def _as_devices(name_or_devices) -> list:
    if isinstance(name_or_devices, str):
        return topology_devices(name_or_devices)
    if isinstance(name_or_devices, jax.sharding.Mesh):
        return list(name_or_devices.devices.flat)
    if isinstance(name_or_devices, Sequence | np.ndarray):
        return list(np.asarray(name_or_devices, dtype=object).flat)
    return [name_or_devices]  # one device


def chip_hbm_bytes(name_or_devices) -> int:
    """Usable HBM of one chip (one device) of a TPU topology, in bytes.

    Args:
      name_or_devices: a topology name, a mesh, a list of devices or one device (all of one kind).

    Order: a real device's ``memory_stats()["bytes_limit"]``; else the TPU compiler's own figure (a probe
    compile whose out-of-memory error names "available HBM", once per device kind and process); else the
    published per-chip HBM (``PUBLISHED_HBM_BYTES``, which overstates what the compiler lets a program use
    by 0.25-0.75 GiB).
    """
    devices = _as_devices(name_or_devices)
    if not devices:
        raise ValueError("chip_hbm_bytes: no devices")
    device = devices[0]
    try:
        limit = (device.memory_stats() or {}).get("bytes_limit")
    except (jax.errors.JaxRuntimeError, NotImplementedError, AttributeError):
        limit = None  # compile-only devices have no memory stats
    if limit:
        return int(limit)
    if device.platform != "tpu":
        raise ValueError(f"chip_hbm_bytes: no HBM figure for a {device.platform} device ({device!r})")
    per_core = any(getattr(d, "core_on_chip", 0) for d in devices)  # v4 built one device per TensorCore
    return _compiler_or_published_hbm(device, per_core)
