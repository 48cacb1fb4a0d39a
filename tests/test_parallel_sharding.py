"""Meshes, the logical-axis rules, and sharded forward == single-device forward on 8 fake CPU devices."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from jax.sharding import AxisType, NamedSharding, PartitionSpec

from jrft.models import from_pretrained
from jrft.models.testing import mixed_padding_batch, save_tiny_hf_model
from jrft.parallel import (
    LOGICAL_RULES,
    logical_to_spec,
    make_mesh,
    shard_model,
    state_shardings,
    with_logical_constraint,
)


def test_make_mesh_fills_minus_one_and_uses_auto_axes():
    assert jax.device_count() == 8
    mesh = make_mesh(data=-1, tensor=2)
    assert dict(mesh.shape) == {"data": 4, "fsdp": 1, "tensor": 2}
    assert all(t == AxisType.Auto for t in mesh.axis_types)
    assert dict(make_mesh(data=2, fsdp=-1, tensor=2).shape)["fsdp"] == 2
    assert dict(make_mesh(data=1, devices=jax.devices()[:1]).shape) == {"data": 1, "fsdp": 1, "tensor": 1}
    assert make_mesh(data=-1, devices=jax.devices()[2:6]).devices.size == 4


def test_make_mesh_errors():
    with pytest.raises(ValueError, match="not divisible"):
        make_mesh(data=-1, tensor=3)
    with pytest.raises(ValueError, match="multiply to 4"):
        make_mesh(data=2, fsdp=2, tensor=1)
    with pytest.raises(ValueError, match="at most one"):
        make_mesh(data=-1, fsdp=-1)


def test_rules_table_and_divisibility():
    assert 18 <= len(LOGICAL_RULES) <= 25
    mesh = make_mesh(data=1, fsdp=2, tensor=4)
    assert logical_to_spec(("layers", "embed", "heads", "head_dim")) == PartitionSpec(
        None, "fsdp", "tensor", None
    )
    assert logical_to_spec(("batch", "seq", "act_embed"), (8, 5, 64), mesh) == PartitionSpec(
        "fsdp", None, None
    )
    full = make_mesh(data=2, fsdp=2, tensor=2)
    assert logical_to_spec(("batch", "act_heads"), (8, 4), full) == PartitionSpec(("data", "fsdp"), "tensor")
    # 2 kv heads cannot split over tensor=4: replicated on that axis instead of failing
    assert logical_to_spec(("embed", "kv_heads"), (64, 2), mesh) == PartitionSpec("fsdp", None)
    assert logical_to_spec(("batch",), (6,), make_mesh(data=2, fsdp=2, tensor=2)) == PartitionSpec("data")
    with pytest.raises(KeyError, match="no sharding rule"):
        logical_to_spec(("nonsense",))


def test_with_logical_constraint_is_noop_without_mesh():
    x = jnp.ones((4, 3, 2))
    assert with_logical_constraint(x, ("batch", "seq", "act_embed")) is x


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return save_tiny_hf_model("qwen2", tmp_path_factory.mktemp("qwen2"), seed=2)


def _forward(model, tokens, mask):
    return model(tokens, mask)


@pytest.mark.parametrize("shape", [(8, 1, 1), (2, 4, 1), (2, 2, 2), (1, 2, 4)])
def test_sharded_forward_equals_single_device(checkpoint, shape):
    tokens, mask = mixed_padding_batch(128, seed=4, lengths=(9, 4, 7, 9, 2, 5, 8, 6))
    reference = np.asarray(jax.jit(_forward)(from_pretrained(checkpoint), tokens, mask))

    data, fsdp, tensor = shape
    mesh = make_mesh(data=data, fsdp=fsdp, tensor=tensor)
    model = from_pretrained(checkpoint, mesh=mesh)
    wq, w_up, embed = model.layers.wq[...], model.layers.w_up[...], model.embed[...]
    assert wq.sharding.spec == PartitionSpec(
        None, "fsdp" if fsdp > 1 else None, "tensor" if tensor > 1 else None, None
    )
    assert w_up.sharding.spec == PartitionSpec(
        None, "fsdp" if fsdp > 1 else None, "tensor" if tensor > 1 else None
    )
    if fsdp * tensor > 1:  # each device really holds a slice
        assert w_up.addressable_shards[0].data.size == w_up.size // (fsdp * tensor)
        assert embed.addressable_shards[0].data.size == embed.size // (fsdp * tensor)
    batch = NamedSharding(mesh, PartitionSpec(("data", "fsdp")))
    with jax.set_mesh(mesh):
        out = jax.jit(_forward)(model, jax.device_put(tokens, batch), jax.device_put(mask, batch))
    batch_axes = logical_to_spec(("batch",), (8,), mesh)[0]
    assert batch_axes is not None and out.sharding.spec[0] == batch_axes  # activations stay batch-sharded
    valid = mask.astype(bool)
    np.testing.assert_array_less(np.abs(np.asarray(out) - reference)[valid], 1e-5)


def test_sharded_train_step_and_optimizer_state_shardings(checkpoint):
    tokens, mask = mixed_padding_batch(128, seed=5, lengths=(9, 4, 7, 9))

    def loss(model):
        logits = model(tokens, mask)
        return jnp.mean(
            jax.nn.logsumexp(logits, -1) - jnp.take_along_axis(logits, tokens[..., None], -1)[..., 0]
        )

    ref_grads = nnx.jit(nnx.grad(loss))(from_pretrained(checkpoint))
    mesh = make_mesh(data=2, fsdp=2, tensor=2)
    model = from_pretrained(checkpoint, mesh=mesh)
    optimizer = nnx.Optimizer(model, optax.adam(1e-3), wrt=nnx.Param)
    opt_shardings = state_shardings(nnx.state(optimizer), mesh)
    mu_wq = opt_shardings["opt_state"][0]["mu"]["layers"]["wq"].get_value()
    assert mu_wq.spec == PartitionSpec(None, "fsdp", "tensor", None)  # moments follow their parameter
    with jax.set_mesh(mesh):
        grads = nnx.jit(nnx.grad(loss))(model)
    np.testing.assert_allclose(
        np.asarray(grads.layers.wq[...]), np.asarray(ref_grads.layers.wq[...]), atol=1e-5, rtol=1e-4
    )


def test_shard_model_moves_an_existing_model(checkpoint):
    model = from_pretrained(checkpoint)
    mesh = make_mesh(data=1, fsdp=4, tensor=2)
    shard_model(model, mesh)
    assert model.layers.w_down[...].sharding.spec == PartitionSpec(None, "tensor", "fsdp")
    assert model.lm_head[...].sharding.spec == PartitionSpec("fsdp", "tensor")


def test_save_sharded_model_and_reload_on_another_mesh(checkpoint, tmp_path):
    from jrft.models import save_pretrained

    model = from_pretrained(checkpoint, mesh=make_mesh(data=2, fsdp=2, tensor=2))
    save_pretrained(model, tmp_path / "out")
    other = from_pretrained(tmp_path / "out", mesh=make_mesh(data=1, fsdp=8, tensor=1))
    assert other.layers.w_gate[...].sharding.spec == PartitionSpec(None, "fsdp", None)
    for name in ("wq", "w_gate", "bk"):
        np.testing.assert_array_equal(
            np.asarray(getattr(other.layers, name)[...]), np.asarray(getattr(model.layers, name)[...])
        )
