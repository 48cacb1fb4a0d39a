"""One SFT, DPO and GRPO step on 8 fake CPU devices under several (data, fsdp, tensor) meshes equals the
single-device step, and parameters / optimizer state are really sharded."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from jrft.config import MeshConfig
from jrft.models import Decoder, ModelConfig
from jrft.models.testing import tiny_hf_config
from jrft.train.objectives import dpo, grpo, pairs, sft
from jrft.train.optim import make_optimizer
from jrft.train.placement import device_batch, place_state
from jrft.train.runs.setup import mesh_from_config
from jrft.train.state import create_train_state
from jrft.train.step import jit_step, make_train_step

MESHES = [(8, 1, 1), (1, 8, 1), (2, 2, 2), (1, 2, 4)]
CFG = tiny_hf_config("llama", vocab_size=64, hidden_size=64, intermediate_size=128, num_key_value_heads=4)


def _sft_batch(rng, b=8, t=16):
    tokens = rng.integers(3, 64, size=(b, t)).astype(np.int32)
    attn = np.ones_like(tokens)
    attn[::3, t - 5 :] = 0  # some right padding
    loss = attn.copy()
    loss[:, :4] = 0
    return {"tokens": tokens, "attention_mask": attn, "loss_mask": loss}


def _objectives(rng, graphdef, state):
    s = _sft_batch(rng)
    c, r = _sft_batch(rng), _sft_batch(rng)
    pair = {f"chosen_{k}": v for k, v in c.items()} | {f"rejected_{k}": v for k, v in r.items()}
    ref = dpo.make_reference_fn(graphdef)(state.params, state.rest, pair)
    pair.update({k: np.asarray(v) for k, v in ref.items()})
    g = _sft_batch(rng)
    rollout = {
        "tokens": g["tokens"],
        "attention_mask": g["attention_mask"],
        "completion_mask": g["loss_mask"][:, -8:],
        "advantages": rng.normal(size=(8,)).astype(np.float32),
        "old_logps": (-2.0 + 0.1 * rng.normal(size=(8, 8))).astype(np.float32),
    }
    grpo_loss = grpo.make_loss_fn(
        temperature=1.0,
        clip_eps_low=0.2,
        clip_eps_high=0.28,
        beta=0.0,
        kl_estimator="k3",
        aggregation="dapo",
        importance_level="token",
        max_completion_length=8,
    )
    return {
        "sft": (sft.make_loss_fn(), sft.normalizers, s),
        "dpo": (dpo.make_loss_fn(beta=0.1), pairs.normalizers, pair),
        "grpo": (grpo_loss, grpo.normalizers, rollout),
    }


def _run(mesh_shape, objective, optimizer="adamw"):
    mesh = mesh_from_config(MeshConfig(*mesh_shape))
    with jax.set_mesh(mesh):
        model = Decoder(ModelConfig.from_hf(CFG), rngs=nnx.Rngs(0))
    if optimizer == "sgd":  # the update is the gradient: equal steps <=> equal gradients
        tx = optax.sgd(0.1)
    else:  # Adam's first step is ~lr * sign(g): it amplifies float noise in near-zero gradients
        tx, _ = make_optimizer(lr=1e-3, total_steps=10, schedule="constant", weight_decay=0.1)
    graphdef, state = create_train_state(model, tx, seed=0)
    state, shardings = place_state(state, mesh)
    loss_fn, norms, batch = _objectives(np.random.default_rng(0), graphdef, state)[objective]
    step = jit_step(make_train_step(graphdef, loss_fn, norms, tx), state_sharding=shardings)
    state, metrics = step(state, device_batch(batch, mesh))
    return state, metrics


# SFT on the (1, 2, 4) mesh (fsdp x tensor) in the default suite; every other objective/mesh pair
# (same machinery, ~12 s of compiles each) with -m slow.
@pytest.mark.parametrize(
    "objective, shape",
    [
        (objective, shape)
        if (objective, shape) == ("sft", (1, 2, 4))
        else pytest.param(objective, shape, marks=pytest.mark.slow)
        for objective in ("sft", "dpo", "grpo")
        for shape in MESHES
    ],
)
def test_sharded_step_equals_single_device(objective, shape):
    ref_state, ref_metrics = _run((1, 1, 1), objective, "sgd")
    ref = [np.asarray(x) for x in jax.tree.leaves(ref_state.params)]
    state, metrics = _run(shape, objective, "sgd")
    for key in ("loss", "grad_norm"):
        np.testing.assert_allclose(metrics[key], ref_metrics[key], rtol=1e-5, atol=1e-6, err_msg=str(shape))
    for a, b in zip(jax.tree.leaves(state.params), ref, strict=True):
        np.testing.assert_allclose(np.asarray(a), b, rtol=1e-5, atol=1e-5, err_msg=str(shape))


def _device_bytes(tree):
    per_device = {}
    for x in jax.tree.leaves(tree):
        for shard in x.addressable_shards:
            per_device[shard.device] = per_device.get(shard.device, 0) + shard.data.nbytes
    return per_device


@pytest.mark.parametrize(
    "shape",
    [
        (1, 2, 4),
        pytest.param((1, 8, 1), marks=pytest.mark.slow),
        pytest.param((2, 2, 2), marks=pytest.mark.slow),
    ],
)
def test_params_and_optimizer_state_are_really_sharded(shape):
    state, _ = _run(shape, "sft")
    data, fsdp, tensor = shape
    shards = fsdp * tensor
    for part in (state.params, state.opt_state):
        total = sum(x.nbytes for x in jax.tree.leaves(part) if x.ndim >= 2)
        matrices = jax.tree.map(lambda x: x if x.ndim >= 2 else jnp.zeros((1, 1)), part)
        per_device = _device_bytes(matrices)
        assert len(per_device) == 8
        # every matrix is split over fsdp x tensor (replicated over data): per device ~ total / shards
        assert max(per_device.values()) <= 1.3 * total / shards, (shape, max(per_device.values()), total)
