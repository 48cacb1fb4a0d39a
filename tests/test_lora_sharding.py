"""LoRA adapters on a mesh: their logical axes map through the one rules table, and a sharded forward with
adapters equals the single-device one."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import tiny_lora_llama_hf
from flax import nnx
from jax.sharding import PartitionSpec as P

from jrft.models import Decoder, ModelConfig
from jrft.models.lora import LoRAParam, LoRASpec
from jrft.parallel import make_mesh, shard_model
from jrft.parallel.sharding import state_shardings

CFG = ModelConfig.from_hf(tiny_lora_llama_hf())


def _model():
    model = Decoder(CFG, rngs=nnx.Rngs(0), lora=LoRASpec(rank=4, scale=2.0))
    for i, (path, var) in enumerate(nnx.to_flat_state(nnx.state(model, LoRAParam))):
        if str(path[-1]).endswith("_b"):
            var.set_value(0.05 * jax.random.normal(jax.random.key(i), var.get_value().shape))
    return model


def test_adapter_specs_and_sharded_forward_equals_single_device():
    tokens = jnp.asarray(np.random.default_rng(0).integers(1, 32, size=(4, 8)), jnp.int32)
    expected = np.asarray(_model()(tokens))
    mesh = make_mesh(data=2, fsdp=2, tensor=2)
    specs = state_shardings(nnx.state(_model(), LoRAParam), mesh)["lora"]
    assert specs["wq_a"].get_value().spec == P(None, "fsdp", None)  # [L, D, r]: D over fsdp, rank whole
    assert specs["wq_b"].get_value().spec == P(None, None, "tensor")  # [L, r, H*Dh]: heads over tensor
    assert specs["w_down_a"].get_value().spec == P(None, "tensor", None)  # [L, F, r]
    model = shard_model(_model(), mesh)
    graphdef, state = nnx.split(model)

    @jax.jit
    def forward(state, tokens):
        return nnx.merge(graphdef, state)(tokens)

    with jax.set_mesh(mesh):
        out = forward(state, tokens)
    np.testing.assert_allclose(np.asarray(out), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("quant", ["int8", pytest.param("nf4", marks=pytest.mark.slow)])  # one shared path
def test_quantized_base_shards_and_its_forward_equals_single_device(quant):
    """A quantized base places its codes like the float weights (nf4's packed input dim still over fsdp) and
    the sharded forward, with LoRA dropout too (a training forward's key), equals the single-device one."""
    tokens = jnp.asarray(np.random.default_rng(0).integers(1, 32, size=(4, 8)), jnp.int32)
    key = jax.random.key(5)

    def model():
        m = Decoder(
            CFG, rngs=nnx.Rngs(0), lora=LoRASpec(rank=4, scale=2.0, dropout=0.2), base_quantization=quant
        )
        nnx.update(m, nnx.state(_model(), LoRAParam))
        return m

    expected = [np.asarray(model()(tokens)), np.asarray(model()(tokens, dropout_key=key))]
    assert not np.allclose(expected[0], expected[1], atol=1e-4)  # the key does drop
    mesh = make_mesh(data=2, fsdp=2, tensor=2)
    specs = state_shardings(nnx.state(model(), nnx.Param), mesh)["layers"]
    assert specs["wq"].get_value().spec == P(None, "fsdp", "tensor", None)  # [L, D (nf4: D / 2), H, Dh]
    graphdef, state = nnx.split(shard_model(model(), mesh))

    @jax.jit
    def forward(state, tokens, key):
        return nnx.merge(graphdef, state)(tokens, dropout_key=key)

    with jax.set_mesh(mesh):
        out = [forward(state, tokens, None), forward(state, tokens, key)]
    for got, want in zip(out, expected, strict=True):
        np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5, atol=1e-5)
