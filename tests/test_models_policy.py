"""Remat policies and the dtype policy (parameter dtype vs compute dtype; float32 logits and scores)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jrft.models import REMAT_POLICIES, Decoder, ModelConfig
from jrft.models.testing import mixed_padding_batch, tiny_hf_config

CONFIG = ModelConfig.from_hf(tiny_hf_config("qwen3", attention_bias=True))


def _grads(remat):
    model = Decoder(CONFIG, rngs=nnx.Rngs(0), remat=remat)
    tokens, mask = mixed_padding_batch(128, lengths=(8, 5))

    def loss(m):
        return jnp.mean(m(tokens, mask) ** 2)

    return jax.jit(nnx.grad(loss))(model)


FAST = ("full", "save_attn_out")  # the others run with -m slow


@pytest.fixture(scope="module")
def reference_grads():
    return _grads("none")


@pytest.mark.parametrize(
    "policy",
    [
        p if p in FAST else pytest.param(p, marks=pytest.mark.slow)
        for p in sorted(set(REMAT_POLICIES) - {"none"})
    ],
)
def test_remat_policy_gives_the_same_gradients(policy, reference_grads):
    grads = _grads(policy)
    for name in ("wq", "w_down", "q_norm", "bk"):
        np.testing.assert_allclose(
            np.asarray(getattr(grads.layers, name)[...]),
            np.asarray(getattr(reference_grads.layers, name)[...]),
            rtol=1e-5,
            atol=1e-7,
            err_msg=f"{policy}:{name}",
        )


def test_remat_really_recomputes():
    """With "full" remat the backward pass contains a recomputed forward (more dot ops in the jaxpr)."""
    tokens = jnp.ones((2, 4), jnp.int32)

    def n_dots(remat):
        model = Decoder(CONFIG, rngs=nnx.Rngs(0), remat=remat)
        graphdef, state = nnx.split(model)
        jaxpr = jax.make_jaxpr(jax.grad(lambda s: jnp.sum(nnx.merge(graphdef, s)(tokens))))(state)
        return str(jaxpr).count("dot_general")

    assert n_dots("full") > n_dots("none")


def test_unknown_remat_policy():
    model = Decoder(CONFIG, rngs=nnx.Rngs(0), remat="sometimes")
    with pytest.raises(ValueError, match="remat policy 'sometimes'"):
        model(jnp.ones((1, 3), jnp.int32))


def test_dtype_policy():
    f32 = Decoder(CONFIG, rngs=nnx.Rngs(0))
    mixed = Decoder(CONFIG, rngs=nnx.Rngs(0), dtype=jnp.bfloat16, param_dtype=jnp.float32, scalar_head=True)
    low = Decoder(CONFIG, rngs=nnx.Rngs(0), dtype=jnp.bfloat16, param_dtype=jnp.bfloat16)
    assert mixed.layers.wq[...].dtype == jnp.float32 and low.layers.wq[...].dtype == jnp.bfloat16
    tokens, mask = mixed_padding_batch(128, lengths=(8, 5))
    forward = jax.jit(lambda m, t, a: m(t, a, return_hidden=True))
    reference = np.asarray(forward(f32, tokens, mask)[0])
    for model in (mixed, low):
        logits, hidden = forward(model, tokens, mask)
        assert logits.dtype == jnp.float32 and hidden.dtype == jnp.bfloat16
        err = np.abs(np.asarray(logits) - reference)[mask == 1].max()
        assert 0 < err < 0.1 * np.abs(reference).max()  # bf16 compute: close, not identical
    assert jax.eval_shape(lambda m: m.score(tokens, mask), mixed).dtype == jnp.float32
    with pytest.raises(ValueError, match="no scalar head"):
        f32.score(tokens, mask)
