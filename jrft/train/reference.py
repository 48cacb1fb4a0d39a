"""Frozen models: only evaluated, never trained: the reference policy (DPO, GRPO with ``beta > 0``, PPO with
``kl_coef > 0``), kept on the device or offloaded to host memory (``train.offload_reference``), and PPO's
reward model.

A reference is a full second copy of the policy's parameters that is only read, once per batch or rollout.
Offloaded, it lives in ``pinned_host`` memory with the same sharding as the policy (each device's host holds
that device's shards) and is copied to the device inside the jitted reference forward
(``jax.device_put(x, sharding.with_memory_kind("device"))``): device memory is freed for the whole step
except during the reference forward itself, at the price of one host-to-device transfer per call.

Usage (``fn`` is any jitted ``(params, rest, *args) -> out`` forward, e.g.
``jrft.train.logprobs.make_completion_forward``)::

    reference = FrozenModel(state.params, state.rest, offload=config.train.offload_reference)
    ref = reference.call(forward, batch)
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
from flax import nnx

HOST = "pinned_host"


def frozen_forward(graphdef: nnx.GraphDef, fn: Callable) -> Callable:
    """Jitted ``(params, rest, batch) -> fn(model, batch)`` with no gradients: the forward of a model that is
    only evaluated (reference and old log-probs, values, reward scores); what :meth:`FrozenModel.call` takes.
    """

    @jax.jit
    def forward(params, rest, batch):
        return jax.lax.stop_gradient(fn(nnx.merge(graphdef, params, rest), batch))

    return forward


def host_memory_supported(device=None) -> bool:
    """Whether ``device`` (default: the first local one) has a ``pinned_host`` memory space."""
    device = device or jax.local_devices()[0]
    return HOST in {m.kind for m in device.addressable_memories()}


def memory_kinds(tree) -> set[str | None]:
    """The memory kinds of the arrays of a pytree (``{"device"}`` or ``{"pinned_host"}`` normally)."""
    return {x.sharding.memory_kind for x in jax.tree.leaves(tree)}


class FrozenModel:
    """A frozen model's variables: ``params`` (a copy, never aliased with the originals, so donating the
    train state leaves it intact) and ``rest`` (its other nnx variables).

    Args:
      params: the parameter pytree to freeze, placed on the mesh (``jrft.train.placement.place_state``).
      rest: the model's other variables (not copied: small and never donated separately).
      offload: keep the copy in ``pinned_host`` memory (same sharding) instead of device memory.
      copy: copy ``params`` on the device (needed when they belong to a train state whose buffers are
        donated); ``False`` for a model nobody else holds (PPO's reward model).
    """

    def __init__(self, params, rest, *, offload: bool = False, copy: bool = True):
        self.offload, self.rest = offload, rest
        self.device_shardings = jax.tree.map(lambda x: x.sharding.with_memory_kind("device"), params)
        if not offload:
            self.params = jax.tree.map(jnp.copy, params) if copy else params
        else:
            if not host_memory_supported():
                kinds = sorted(m.kind for m in jax.local_devices()[0].addressable_memories())
                raise ValueError(
                    f"train.offload_reference: this backend ({jax.default_backend()}) has no {HOST!r} memory "
                    f"(memory kinds: {kinds}); set train.offload_reference=false"
                )
            host = jax.tree.map(lambda s: s.with_memory_kind(HOST), self.device_shardings)
            # A device -> host copy per shard; may_alias=False: never the train state's (donated) buffers.
            self.params = jax.device_put(params, host, may_alias=False)
        self._calls: dict[Callable, Callable] = {}

    def call(self, fn: Callable, *args):
        """``fn(params, rest, *args)`` with the frozen parameters on the device (copied there inside one
        jitted program when offloaded; the device copy is a temporary of that program)."""
        if not self.offload:
            return fn(self.params, self.rest, *args)
        if fn not in self._calls:
            self._calls[fn] = from_host(fn, self.device_shardings)
        return self._calls[fn](self.params, self.rest, *args)


def from_host(fn: Callable, device_shardings) -> Callable:
    """Jitted ``(host_params, rest, *args) -> fn(params on the device, rest, *args)``: the program an
    offloaded frozen model runs, whose first step copies the parameters to ``device_shardings``."""

    @jax.jit
    def on_device(host_params, rest, *more):
        return fn(jax.device_put(host_params, device_shardings), rest, *more)

    return on_device
