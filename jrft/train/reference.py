"""The frozen reference model's parameters (DPO, GRPO with ``beta > 0``, PPO with ``kl_coef > 0``), kept on
the device or offloaded to host memory (``train.offload_reference``).

A reference is a full second copy of the policy's parameters that is only read, once per batch or rollout.
Offloaded, it lives in ``pinned_host`` memory with the same sharding as the policy (each device's host holds
that device's shards) and is copied to the device inside the jitted reference forward
(``jax.device_put(x, sharding.with_memory_kind("device"))``): device memory is freed for the whole step
except during the reference forward itself, at the price of one host-to-device transfer per call.

Usage (``fn`` is any jitted ``(params, *args) -> out`` reference forward, e.g. ``grpo.make_logps_fn``)::

    reference = FrozenParams(state.params, offload=config.train.offload_reference)
    ref_logps = reference.call(logps_fn, state.rest, batch)
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp

HOST = "pinned_host"


def host_memory_supported(device=None) -> bool:
    """Whether ``device`` (default: the first local one) has a ``pinned_host`` memory space."""
    device = device or jax.local_devices()[0]
    return HOST in {m.kind for m in device.addressable_memories()}


def memory_kinds(tree) -> set[str | None]:
    """The memory kinds of the arrays of a pytree (``{"device"}`` or ``{"pinned_host"}`` normally)."""
    return {x.sharding.memory_kind for x in jax.tree.leaves(tree)}


class FrozenParams:
    """A frozen copy of ``params`` (never aliased with them, so donating the train state leaves it intact).

    Args:
      params: the parameter pytree to freeze, placed on the mesh (``jrft.train.sharding.place_state``).
      offload: keep the copy in ``pinned_host`` memory (same sharding) instead of device memory.
    """

    def __init__(self, params, *, offload: bool = False):
        self.offload = offload
        self.device_shardings = jax.tree.map(lambda x: x.sharding.with_memory_kind("device"), params)
        if not offload:
            self.params = jax.tree.map(jnp.copy, params)
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
        """``fn(params, *args)`` with the frozen parameters on the device (copied there inside one jitted
        program when offloaded; the device copy is a temporary of that program)."""
        if not self.offload:
            return fn(self.params, *args)
        if fn not in self._calls:
            shardings = self.device_shardings

            @jax.jit
            def on_device(host_params, *rest):
                return fn(jax.device_put(host_params, shardings), *rest)

            self._calls[fn] = on_device
        return self._calls[fn](self.params, *args)
