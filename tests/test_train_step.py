"""The generic step: gradient accumulation equals the full batch; the state round-trips nnx."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from jrft.train.state import create_train_state
from jrft.train.step import jit_step, make_train_step, split_micro_batches


class Toy(nnx.Module):
    def __init__(self, rngs):
        self.dense = nnx.Linear(3, 2, rngs=rngs)

    def __call__(self, x):
        return self.dense(x)


def normalizers(batch):
    return {"count": jnp.sum(batch["mask"])}


def loss_fn(model, batch, norms, key):
    err = jnp.sum((model(batch["x"]) - batch["y"]) ** 2, axis=-1)  # [B]
    noise = jax.random.uniform(key, ())  # per-micro-batch key must not change the loss's gradient
    loss = jnp.sum(err * batch["mask"]) / norms["count"]
    return loss + 0.0 * noise, {"masked_rows": jnp.sum(1.0 - batch["mask"]) / norms["count"]}


def _batch():
    rng = np.random.default_rng(0)
    return {
        "x": jnp.asarray(rng.normal(size=(8, 3)), jnp.float32),
        "y": jnp.asarray(rng.normal(size=(8, 2)), jnp.float32),
        "mask": jnp.asarray([1, 1, 0, 1, 1, 1, 0, 1], jnp.float32),
    }


@pytest.mark.parametrize("grad_accum", [2, 4, 8])
def test_grad_accumulation_equals_full_batch(grad_accum):
    tx = optax.sgd(0.1)
    results = []
    for accum in (1, grad_accum):
        graphdef, state = create_train_state(Toy(nnx.Rngs(0)), tx, seed=0)
        step = jit_step(make_train_step(graphdef, loss_fn, normalizers, tx, grad_accum=accum))
        state, metrics = step(state, _batch())
        results.append((state, metrics))
    (s1, m1), (s2, m2) = results
    for a, b in zip(jax.tree.leaves(s1.params), jax.tree.leaves(s2.params), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(m1["loss"], m2["loss"], rtol=1e-6)
    np.testing.assert_allclose(m1["masked_rows"], m2["masked_rows"], rtol=1e-6)
    assert int(s2.step) == 1


def test_state_merges_back_into_a_model():
    graphdef, state = create_train_state(Toy(nnx.Rngs(1)), optax.adam(1e-3), seed=3)
    model = nnx.merge(graphdef, state.params, state.rest)
    assert model(jnp.ones((1, 3))).shape == (1, 2)
    assert state.key(0).dtype == jax.random.key(0).dtype


def test_micro_batch_split_is_strided_and_checks_divisibility():
    x = jnp.arange(6)
    np.testing.assert_array_equal(split_micro_batches({"x": x}, 3)["x"], [[0, 3], [1, 4], [2, 5]])
    with pytest.raises(ValueError, match="not divisible by grad_accum=4"):
        split_micro_batches({"x": x}, 4)
