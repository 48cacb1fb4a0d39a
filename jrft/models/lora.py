"""Low-rank adapters (LoRA, Hu et al. 2021, arXiv:2106.09685) on the decoder's stacked projections.

A targeted projection ``y = x W`` becomes ``y = x W + scale * (x A) B`` with ``A [in, r]`` and ``B [r, out]``;
B starts at zero, so the first forward equals the base model. Adapters are stacked like the weights they adapt
(``A [L, in, r]``, ``B [L, r, out]``, scanned with the layers) and are :class:`LoRAParam` variables: the
train state then takes ONLY them as ``params`` (``jrft.train.state.split_model``) and the base weights sit
in ``rest``, never differentiated and without optimizer state. The reference model of DPO / GRPO / PPO is
the same forward with zero adapters (:func:`zero_adapters`), so the base weights are held once.

Own code rather than qwix: qwix adds adapters by intercepting the ``dot_general`` / ``einsum`` calls of
``nnx.Linear`` / ``nnx.Einsum`` modules by module path; jrft's decoder has no per-projection module (the
layer body is a pure function of stacked arrays, scanned over layers), so there is nothing for it to hook.

Shapes: L layers, D hidden, H heads, K kv heads, Dh head dim, F MLP width, r rank. ``in`` / ``out`` are the
flattened ``[in, out]`` of a projection (``wq``: ``[D, H*Dh]``; ``wo``: ``[H*Dh, D]``).
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jrft.models.config import ModelConfig

# transformers' / PEFT's projection names -> the decoder's stacked weight names.
MODULE_WEIGHTS = {
    "q_proj": "wq",
    "k_proj": "wk",
    "v_proj": "wv",
    "o_proj": "wo",
    "gate_proj": "w_gate",
    "up_proj": "w_up",
    "down_proj": "w_down",
}


# Folded into a train step's key before LoRA dropout draws from it (the step's key serves other draws too).
_DROPOUT_SALT = 0x4C6F5241  # "LoRA"


class LoRAParam(nnx.Param):
    """An adapter matrix: the only trainable variables of a model that has adapters."""


@dataclasses.dataclass(frozen=True)
class LoRASpec:
    """What adapters a ``Decoder`` holds: ``rank`` r > 0, ``scale`` (alpha / r or alpha / sqrt(r)),
    ``modules`` (names out of ``MODULE_WEIGHTS``), ``init`` of A (``default``: Kaiming-uniform as in PEFT,
    bound 1 / sqrt(in); ``gaussian``: std 1 / r). B is always zero at start. ``dropout``: the rate at which
    training forwards (those given a ``dropout_key``) drop the adapter path's input."""

    rank: int
    scale: float
    modules: tuple[str, ...] = tuple(MODULE_WEIGHTS)
    init: str = "default"
    dropout: float = 0.0

    @classmethod
    def from_config(cls, lora) -> LoRASpec | None:
        """From a ``jrft.config.LoRAConfig``; ``None`` when its rank is 0 (no adapters)."""
        if lora.rank == 0:
            return None
        return cls(
            rank=lora.rank, scale=lora.scale, modules=lora.modules, init=lora.init, dropout=lora.dropout
        )


def adapter_shapes(
    cfg: ModelConfig, spec: LoRASpec
) -> dict[str, tuple[tuple[int, ...], tuple, tuple, tuple]]:
    """``{weight: (A shape, A axes, B shape, B axes)}`` of every adapted weight (logical axes for the
    sharding rules: the flattened head axes take the ``heads`` / ``kv_heads`` rule)."""
    L, D, F, r = cfg.num_layers, cfg.hidden_size, cfg.intermediate_size, spec.rank
    q, kv = cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim
    dims = {
        "wq": (D, "embed", q, "heads"),
        "wk": (D, "embed", kv, "kv_heads"),
        "wv": (D, "embed", kv, "kv_heads"),
        "wo": (q, "heads", D, "embed"),
        "w_gate": (D, "embed", F, "mlp"),
        "w_up": (D, "embed", F, "mlp"),
        "w_down": (F, "mlp", D, "embed"),
    }
    out = {}
    for module in spec.modules:
        w = MODULE_WEIGHTS[module]
        n_in, in_axis, n_out, out_axis = dims[w]
        out[w] = (
            (L, n_in, r),
            ("layers", in_axis, "lora_rank"),
            (L, r, n_out),
            ("layers", "lora_rank", out_axis),
        )
    return out


def adapter_param_count(cfg: ModelConfig, spec: LoRASpec) -> int:
    """How many adapter parameters ``spec`` adds to a model of ``cfg``: ``L x r x (in + out)`` per adapted
    projection (for the memory estimate: the only parameters with gradients and optimizer state)."""
    return sum(math.prod(a) + math.prod(b) for a, _, b, _ in adapter_shapes(cfg, spec).values())


def init_a(shape: tuple[int, ...], init: str, key: jax.Array, dtype) -> jax.Array:
    """A fresh ``A [L, in, r]``: PEFT's Kaiming-uniform (``a=sqrt(5)``: bound 1/sqrt(in)) or normal 1/r."""
    if init == "gaussian":
        return (jax.random.normal(key, shape, jnp.float32) / shape[-1]).astype(dtype)
    bound = 1.0 / math.sqrt(shape[1])
    return jax.random.uniform(key, shape, jnp.float32, -bound, bound).astype(dtype)


class LoRAStack(nnx.Module):
    """The stacked adapters: attributes ``<weight>_a [L, in, r]`` and ``<weight>_b [L, r, out]``."""

    def __init__(self, cfg: ModelConfig, spec: LoRASpec, *, rngs: nnx.Rngs, param_dtype):
        self.spec = spec
        for w, (a_shape, a_axes, b_shape, b_axes) in adapter_shapes(cfg, spec).items():
            a = init_a(a_shape, spec.init, rngs.params(), param_dtype)
            setattr(self, f"{w}_a", LoRAParam(a, out_sharding=a_axes, eager_sharding=False))
            b = jnp.zeros(b_shape, param_dtype)
            setattr(self, f"{w}_b", LoRAParam(b, out_sharding=b_axes, eager_sharding=False))

    def weights(self) -> tuple[str, ...]:
        return tuple(MODULE_WEIGHTS[m] for m in self.spec.modules)

    def arrays(self, dtype, dropout_key: jax.Array | None = None) -> dict[str, tuple[jax.Array, ...]]:
        """``{weight: (A, scale * B)}`` in ``dtype``, for the scanned layer body (:func:`low_rank`). With a
        ``dropout_key`` (a training forward) and ``spec.dropout > 0``: ``(A, scale * B, keys [L], keep [L])``,
        one key per layer and weight and the keep probability ``1 - dropout``."""
        s = self.spec.scale
        out = {
            w: (getattr(self, f"{w}_a")[...].astype(dtype), (s * getattr(self, f"{w}_b")[...]).astype(dtype))
            for w in self.weights()
        }
        if dropout_key is None or self.spec.dropout == 0:
            return out
        dropout_key = jax.random.fold_in(dropout_key, _DROPOUT_SALT)  # apart from the step's other draws
        for i, (w, (a, b)) in enumerate(out.items()):
            layers = a.shape[0]
            keys = jax.random.split(jax.random.fold_in(dropout_key, i), layers)  # [L]
            out[w] = (a, b, keys, jnp.full((layers,), 1.0 - self.spec.dropout, jnp.float32))
        return out


def low_rank(h: jax.Array, adapter: tuple[jax.Array, ...]) -> jax.Array:
    """The adapter path ``(h A)(scale B)`` of one layer: ``h [N, in]`` -> ``[N, out]``; with a dropout key
    and keep probability in ``adapter`` (a training forward), ``h`` is first dropped elementwise and the kept
    values scaled by ``1 / keep`` (PEFT's ``B(A(dropout(x)))``; inverted dropout)."""
    a, b, *drop = adapter
    if drop:
        key, keep = drop
        kept = jax.random.bernoulli(key, keep, h.shape)  # [N, in]
        h = jnp.where(kept, h / keep.astype(h.dtype), jnp.zeros((), h.dtype))
    return (h @ a) @ b  # [N, r] then [N, out]


def merged_layer_arrays(model) -> dict[str, jax.Array]:
    """``model.layers.arrays`` with each adapted weight replaced by ``W + scale * A B`` (param dtype, the
    weight's own shape): a transient copy of the adapted weights (for the sampler's decode step and export).
    Quantized weights (``base_quantization`` int8 or nf4) come dequantized, their scales dropped. Without
    adapters or quantization: the base arrays themselves."""
    from jrft.models.quant import QUANT_WEIGHTS, dequantize_stacked

    p = model.layers.arrays(model.config)
    for w, n_in in QUANT_WEIGHTS.items():
        if f"{w}_scale" in p:
            p[w] = dequantize_stacked(p[w], p.pop(f"{w}_scale"), n_in, model.param_dtype)
    if getattr(model, "lora", None) is None:
        return p
    for w, (a, b) in model.lora.arrays(jnp.float32).items():
        delta = jnp.einsum("lir,lro->lio", a, b)  # [L, in, out] float32
        p[w] = (p[w].astype(jnp.float32) + delta.reshape(p[w].shape)).astype(p[w].dtype)
    return p


def zero_adapters(params):
    """``params`` with every :class:`LoRAParam` zeroed (same shapes and shardings; other variables copied):
    with them the forward is the base model, the reference of DPO / GRPO / PPO under LoRA (the size of the
    adapters, not a copy of the base). Works on concrete arrays and inside ``jit``."""

    def one(v):
        if isinstance(v, LoRAParam):
            return v.replace(jnp.zeros_like(v.get_value()))
        return v.replace(jnp.copy(v.get_value())) if isinstance(v, nnx.Variable) else jnp.copy(v)

    return jax.tree.map(one, params, is_leaf=lambda x: isinstance(x, nnx.Variable))


def adapters_only(params) -> bool:
    """Whether a train state's ``params`` are LoRA adapters (the base weights then sit in its ``rest``)."""
    leaves = jax.tree.leaves(params, is_leaf=lambda x: isinstance(x, nnx.Variable))
    return any(isinstance(v, LoRAParam) for v in leaves)


def has_adapters(model: nnx.Module) -> bool:
    """Whether ``model`` holds :class:`LoRAParam` variables."""
    return len(jax.tree.leaves(nnx.state(model, LoRAParam))) > 0


def host_init(name: str, shape: tuple[int, ...], spec: LoRASpec, seed: int, dtype) -> np.ndarray:
    """The fresh value of adapter variable ``name`` (``lora/<weight>_a`` or ``..._b``) for a loaded model,
    deterministic in ``(seed, name)``."""
    if name.endswith("_b"):
        return np.zeros(shape, dtype)
    import zlib

    key = jax.random.fold_in(jax.random.key(seed), zlib.crc32(name.encode()))
    return np.asarray(init_a(shape, spec.init, key, jnp.float32)).astype(dtype)
