"""Argument checks shared by the loss modules: dtype promotion, shape checks and registry look-ups.

Every check runs at trace time on static shapes, so a mismatch raises a ``ValueError`` that names the
function and the offending arguments before anything is computed.
"""

from collections.abc import Callable, Mapping
from typing import TypeVar

import jax
import jax.numpy as jnp
from jax.sharding import AxisType, PartitionSpec

F = TypeVar("F", bound=Callable)


def as_float(x) -> jnp.ndarray:
    """Casts ``x`` to float32 for loss math (float64 is kept, so x64 gradient checks stay precise)."""
    x = jnp.asarray(x)
    return x if x.dtype == jnp.float64 else x.astype(jnp.float32)


def as_mask(mask, like: jnp.ndarray) -> jnp.ndarray:
    """Returns ``mask`` as a boolean array, or all-True of ``like``'s shape when ``mask`` is None."""
    if mask is None:
        return jnp.ones(jnp.shape(like), dtype=bool)
    return jnp.asarray(mask) != 0


def check_same_shape(fn: str, **arrays) -> None:
    """Raises a ValueError naming ``fn`` and every argument unless all non-None arrays share one shape."""
    shapes = {name: tuple(jnp.shape(a)) for name, a in arrays.items() if a is not None}
    if len(set(shapes.values())) > 1:
        listed = ", ".join(f"{name}{list(shape)}" for name, shape in shapes.items())
        raise ValueError(f"{fn}: arguments must have the same shape, got {listed}")


def check_rank(fn: str, name: str, x, rank: int, layout: str) -> None:
    """Raises a ValueError unless ``x`` has ``rank`` dims; ``layout`` ("[batch, seq]") is for the message."""
    if jnp.ndim(x) != rank:
        raise ValueError(f"{fn}: {name} must be {layout}, got shape {list(jnp.shape(x))}")


def lookup(registry: Mapping[str, F], name: str, what: str) -> F:
    """Returns ``registry[name]``, or raises a ValueError listing the valid names for ``what``."""
    try:
        return registry[name]
    except (KeyError, TypeError):
        valid = ", ".join(sorted(registry))
        raise ValueError(f"unknown {what} {name!r}; valid: {valid}") from None


def per_token(advantages, like, fn: str):
    """Broadcasts ``[B]`` advantages to ``[B, T]``; checks that ``[B, T]`` ones match ``like``."""
    advantages = as_float(advantages)
    if advantages.ndim == 1 and advantages.shape[0] == jnp.shape(like)[0]:
        return jnp.broadcast_to(advantages[:, None], jnp.shape(like))
    if advantages.shape != jnp.shape(like):
        raise ValueError(
            f"{fn}: advantages must be [batch] or [batch, seq] = {list(jnp.shape(like))}, "
            f"got {list(advantages.shape)}"
        )
    return advantages


def replicate_if_explicit(x) -> jnp.ndarray:
    """Replicates ``x`` when it is sharded over *Explicit* mesh axes, else returns it unchanged.

    Under explicit sharding a reshape that splits a sharded axis (``[P * G] -> [P, G]``) is rejected unless
    the output sharding is spelled out; the arrays reshaped here are small (one value per sequence), so
    replicating them is free and keeps the functions mesh-agnostic.
    """
    sharding = getattr(jax.typeof(x), "sharding", None)
    mesh = getattr(sharding, "mesh", None)
    if mesh is None or AxisType.Explicit not in tuple(getattr(mesh, "axis_types", ())):
        return x
    if all(axis is None for axis in sharding.spec):
        return x
    return jax.sharding.reshard(x, PartitionSpec())
