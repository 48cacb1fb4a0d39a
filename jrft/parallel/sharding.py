"""Logical axis names -> mesh axes: the ONE rules table, and helpers to shard parameters and activations.

Layers name their axes logically (``("layers", "embed", "heads", "head_dim")``); only this module knows how
those names map onto the ``(data, fsdp, tensor)`` mesh (MaxText's scheme). Parameter axes and activation axes
use different names because they shard differently: a weight's ``embed`` axis is split over ``fsdp``
(ZeRO-3), while an activation's batch axis takes ``fsdp`` and its ``act_embed`` axis stays whole.

A mesh axis is dropped from a dimension it does not divide (e.g. 2 kv heads on a tensor axis of 4 are
replicated), so any model runs on any mesh; ``logical_to_spec`` says what it chose.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import jax
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

AxisRule = str | tuple[str, ...] | None

LOGICAL_RULES: Mapping[str, AxisRule] = {
    # parameters
    "vocab": "tensor",
    "embed": "fsdp",
    "heads": "tensor",
    "kv_heads": "tensor",
    "head_dim": None,
    "mlp": "tensor",
    "layers": None,
    "norm": None,
    "scalar": None,
    "lora_rank": None,  # LoRA adapters' rank axis: small, kept whole
    # activations
    "batch": ("data", "fsdp"),
    "seq": None,
    "act_embed": None,
    "act_heads": "tensor",
    "act_kv_heads": "tensor",
    "act_head_dim": None,
    "act_mlp": "tensor",
    "act_vocab": "tensor",
    # KV cache [layers, batch, kv_heads, cache_seq, head_dim]
    "cache_batch": ("data", "fsdp"),
    "cache_kv_heads": "tensor",
    "cache_seq": None,
}


def _axis_sizes(mesh) -> dict[str, int]:
    return dict(mesh.shape)  # Mesh and AbstractMesh: ordered {axis name: size}


def logical_to_spec(
    axes: Sequence[str | None],
    shape: Sequence[int] | None = None,
    mesh: Mesh | None = None,
    rules: Mapping[str, AxisRule] | None = None,
) -> PartitionSpec:
    """Maps logical axis names to a ``PartitionSpec``.

    Args:
      axes: one logical name (or None) per dimension.
      shape: the array's shape; with ``mesh``, mesh axes that do not divide a dimension are dropped.
      mesh: the mesh (to check divisibility); mesh axes it lacks or of size 1 are dropped too.
      rules: overrides ``LOGICAL_RULES``.
    """
    rules = LOGICAL_RULES if rules is None else rules
    sizes = _axis_sizes(mesh) if mesh is not None else None
    used: set[str] = set()
    spec = []
    for dim, name in enumerate(axes):
        if name is None:
            spec.append(None)
            continue
        if name not in rules:
            raise KeyError(f"logical axis {name!r} has no sharding rule; known: {sorted(rules)}")
        rule = rules[name]
        mesh_axes = (rule,) if isinstance(rule, str) else tuple(rule or ())
        kept, size = [], 1
        for ax in mesh_axes:
            if ax in used or (sizes is not None and sizes.get(ax, 1) == 1):
                continue  # an axis used twice, absent, or of size 1 (nothing to split)
            ax_size = sizes[ax] if sizes is not None else 1
            if shape is not None and sizes is not None and shape[dim] % (size * ax_size):
                continue
            kept.append(ax)
            size *= ax_size
        used.update(kept)
        spec.append(None if not kept else kept[0] if len(kept) == 1 else tuple(kept))
    return PartitionSpec(*spec)


def logical_axes_of(variable: nnx.Variable) -> tuple[str | None, ...] | None:
    """The logical axis names stored on an nnx Variable (flax keeps them as ``out_sharding`` metadata)."""
    meta = variable.get_metadata()
    axes = meta.get("out_sharding", meta.get("sharding_names"))
    return tuple(axes) if axes is not None else None


def state_shardings(state, mesh: Mesh, rules: Mapping[str, AxisRule] | None = None):
    """A ``NamedSharding`` for every Variable of an nnx State (params, optimizer moments...); unnamed ones
    are replicated. Returns the same tree with each Variable's value replaced by its sharding, usable as jit
    ``in_shardings``/``out_shardings`` or with ``jax.device_put``."""

    def one(x):
        if isinstance(x, nnx.Variable):
            axes = logical_axes_of(x)
            shape = getattr(x.get_value(), "shape", ())
            spec = logical_to_spec(axes, shape, mesh, rules) if axes else PartitionSpec()
            return x.replace(NamedSharding(mesh, spec))
        return NamedSharding(mesh, PartitionSpec())

    return jax.tree.map(one, state, is_leaf=lambda x: isinstance(x, nnx.Variable))


def shard_model(model: nnx.Module, mesh: Mesh, rules: Mapping[str, AxisRule] | None = None) -> nnx.Module:
    """Moves every Variable of ``model`` onto its sharding over ``mesh``, in place; returns the model."""
    state = nnx.state(model)
    shardings = state_shardings(state, mesh, rules)
    nnx.update(model, jax.device_put(state, shardings))
    return model


def with_logical_constraint(
    x: jax.Array, axes: Sequence[str | None], rules: Mapping[str, AxisRule] | None = None
) -> jax.Array:
    """``with_sharding_constraint`` by logical names, under the current mesh (``with jax.set_mesh(mesh)``).

    A no-op when no mesh is set, so single-device code pays nothing.
    """
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty:
        return x
    return jax.lax.with_sharding_constraint(x, logical_to_spec(axes, x.shape, mesh, rules))
