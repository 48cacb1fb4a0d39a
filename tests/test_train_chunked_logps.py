"""Chunked log-probs (``train.logits_chunk_size``) equal the full-logits path in values and gradients, and
really lower the compiled step's temporary memory."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jrft.config import ConfigError, load_config
from jrft.models import Decoder, ModelConfig
from jrft.models.testing import tiny_hf_config
from jrft.train.logprobs import (
    chunked_token_logps,
    completion_logps,
    pair_sequence_logps,
    shifted_token_logps,
)
from jrft.train.objectives import sft

T = 23  # T - 1 = 22 targets


def _model(family="llama", **overrides):
    cfg = ModelConfig.from_hf(tiny_hf_config(family, **{"vocab_size": 96, "hidden_size": 32, **overrides}))
    return nnx.split(Decoder(cfg, rngs=nnx.Rngs(0)), nnx.Param, ...)


def _sft_batch(b=4, t=T, vocab=96, seed=0):
    rng = np.random.default_rng(seed)
    lengths = rng.integers(t // 2, t + 1, size=b)
    attention = (np.arange(t)[None] < lengths[:, None]).astype(np.int32)  # right padding
    loss_mask = attention * (np.arange(t)[None] >= 4)  # first 4 tokens are the "prompt"
    tokens = rng.integers(3, vocab, size=(b, t)) * attention
    return {
        k: jnp.asarray(v)
        for k, v in dict(tokens=tokens, attention_mask=attention, loss_mask=loss_mask).items()
    }


def _assert_trees_close(a, b, atol=1e-5):
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), atol=atol, rtol=1e-5)


# 5 does not divide T - 1 = 22; 64 > T
@pytest.mark.parametrize("chunk", [5, pytest.param(64, marks=pytest.mark.slow)])
def test_sft_loss_and_grads_equal_unchunked(chunk):
    graphdef, params, rest = _model()
    batch = _sft_batch()
    norms = sft.normalizers(batch)

    def run(chunk_size):
        loss_fn = sft.make_loss_fn(logits_chunk_size=chunk_size)

        def f(p):
            return loss_fn(nnx.merge(graphdef, p, rest), batch, norms, None)

        return jax.jit(jax.value_and_grad(f, has_aux=True))(params)

    (loss0, m0), g0 = run(0)
    (loss1, m1), g1 = run(chunk)
    assert np.isfinite(float(loss0)) and float(loss0) > 1.0  # a random model: ~log(96) nats
    np.testing.assert_allclose(float(loss1), float(loss0), rtol=1e-6, atol=1e-5)
    _assert_trees_close(m1, m0)
    _assert_trees_close(g1, g0)
    assert max(float(jnp.max(jnp.abs(x))) for x in jax.tree.leaves(g0)) > 1e-4  # gradients are not trivial


# gemma2: tied head + final-logit soft-capping
@pytest.mark.parametrize("family", [pytest.param("llama", marks=pytest.mark.slow), "gemma2"])
def test_grpo_completion_logps_and_grads_equal_unchunked(family):
    graphdef, params, rest = _model(family)
    b, tp, tc = 4, 9, 14
    rng = np.random.default_rng(1)
    attention = np.ones((b, tp + tc), np.int32)
    attention[:, :3] = 0  # left-padded prompts
    tokens = rng.integers(3, 96, size=(b, tp + tc)) * attention
    batch = {
        "tokens": jnp.asarray(tokens),
        "attention_mask": jnp.asarray(attention),
        "completion_mask": jnp.asarray(rng.integers(0, 2, size=(b, tc))),
    }
    weights = jnp.asarray(rng.normal(size=(b, tc)), jnp.float32)

    def run(chunk_size):
        def f(p):
            model = nnx.merge(graphdef, p, rest)
            logps = completion_logps(model, batch, temperature=0.7, chunk_size=chunk_size)
            return jnp.sum(logps * weights), logps

        return jax.jit(jax.value_and_grad(f, has_aux=True))(params)

    (_, logps0), g0 = run(0)
    (_, logps1), g1 = run(5)  # 5 does not divide Tc = 14
    assert logps0.shape == (b, tc)
    np.testing.assert_allclose(np.asarray(logps1), np.asarray(logps0), atol=1e-5, rtol=1e-6)
    _assert_trees_close(g1, g0)
    # temperature and soft-capping really act: a different temperature gives different values
    model = nnx.merge(graphdef, params, rest)
    other = completion_logps(model, batch, temperature=1.0, chunk_size=5)
    assert float(jnp.max(jnp.abs(other - logps1))) > 1e-3


def test_chunked_matches_full_head_for_any_chunk_and_rejects_zero():
    graphdef, params, rest = _model("gemma2")
    model = nnx.merge(graphdef, params, rest)
    batch = _sft_batch(b=2)
    full = shifted_token_logps(model, batch["tokens"], batch["attention_mask"], temperature=0.5)
    for chunk in (1, 7, 22, 100):
        chunked = shifted_token_logps(
            model, batch["tokens"], batch["attention_mask"], temperature=0.5, chunk_size=chunk
        )
        np.testing.assert_allclose(np.asarray(chunked), np.asarray(full), atol=1e-5, rtol=1e-6)
    pair = {f"{side}_{k}": v for side in ("chosen", "rejected") for k, v in batch.items()}
    a, c = pair_sequence_logps(model, pair), pair_sequence_logps(model, pair, chunk_size=6)
    _assert_trees_close(c, a)
    hidden = jnp.zeros((1, 4, 32))
    with pytest.raises(ValueError, match="chunk_size must be positive"):
        chunked_token_logps(model, hidden, jnp.zeros((1, 4), jnp.int32), chunk_size=0)


def test_chunking_lowers_compiled_temporary_memory():
    """A vocab-heavy shape (V = 8192 >> D = 32): the backward of the full path keeps [B, T, V] float32
    logits (and their softmax); the chunked one only a [B, chunk, V] slice at a time."""
    graphdef, params, rest = _model(vocab_size=8192)
    batch = _sft_batch(b=8, t=128, vocab=8192)
    norms = sft.normalizers(batch)

    def temp_bytes(chunk_size):
        loss_fn = sft.make_loss_fn(logits_chunk_size=chunk_size)

        def f(p):
            return loss_fn(nnx.merge(graphdef, p, rest), batch, norms, None)[0]

        compiled = jax.jit(jax.grad(f)).lower(params).compile()
        analysis = compiled.memory_analysis()
        if analysis is None:
            pytest.skip("this backend gives no memory analysis")
        return analysis.temp_size_in_bytes

    full, chunked = temp_bytes(0), temp_bytes(16)
    logits_bytes = 8 * 127 * 8192 * 4  # one float32 [B, T-1, V]
    print(f"temp bytes: full {full / 2**20:.1f} MiB, chunked(16) {chunked / 2**20:.1f} MiB")
    assert full > logits_bytes  # the full path really holds the logits
    assert full - chunked > logits_bytes  # saves more than one whole [B, T-1, V] float32 buffer
    assert chunked < full / 2


def test_config_key():
    assert load_config(None).train.logits_chunk_size == 0
    assert load_config(None, ["train.logits_chunk_size=512"]).train.logits_chunk_size == 512
    with pytest.raises(ConfigError, match="logits_chunk_size"):
        load_config(None, ["train.logits_chunk_size=-1"])


def test_completion_logps_from_given_hidden_states_equal_unchunked():
    from jrft.train.logprobs import completion_logps

    graphdef, params, rest = _model()
    model = nnx.merge(graphdef, params, rest)
    batch = _sft_batch(b=3)
    hidden = model.hidden(batch["tokens"], batch["attention_mask"])
    rows = {"tokens": batch["tokens"], "completion_mask": jnp.ones((3, 13), jnp.int32)}
    full = completion_logps(model, rows, temperature=0.8, hidden=hidden)
    chunked = completion_logps(model, rows, temperature=0.8, chunk_size=4, hidden=hidden)
    assert full.shape == (3, 13)
    np.testing.assert_allclose(np.asarray(chunked), np.asarray(full), atol=1e-5, rtol=1e-6)


def _sharded_sft_step(mesh_shape, chunk_size):
    import optax

    from jrft.config import MeshConfig
    from jrft.train.placement import device_batch, place_state
    from jrft.train.runs.setup import mesh_from_config
    from jrft.train.state import create_train_state
    from jrft.train.step import jit_step, make_train_step

    mesh = mesh_from_config(MeshConfig(*mesh_shape))
    cfg = ModelConfig.from_hf(tiny_hf_config("llama", vocab_size=96, hidden_size=32, num_key_value_heads=2))
    with jax.set_mesh(mesh):
        model = Decoder(cfg, rngs=nnx.Rngs(0))
    tx = optax.sgd(0.1)  # the update is the gradient
    graphdef, state = create_train_state(model, tx, seed=0)
    state, shardings = place_state(state, mesh)
    loss_fn = sft.make_loss_fn(logits_chunk_size=chunk_size)
    step = jit_step(
        make_train_step(graphdef, loss_fn, sft.normalizers, tx), mesh=mesh, state_sharding=shardings
    )
    host = {k: np.asarray(v) for k, v in _sft_batch(b=8).items()}
    return step(state, device_batch(host, mesh))


@pytest.mark.slow  # ~25 s; the default suite has the unchunked sharded step and the chunked grads
def test_chunked_sft_step_on_a_2x2x2_mesh_equals_unchunked_single_device():
    ref_state, ref_metrics = _sharded_sft_step((1, 1, 1), 0)
    state, metrics = _sharded_sft_step((2, 2, 2), 5)
    for key in ("loss", "grad_norm", "accuracy"):
        np.testing.assert_allclose(metrics[key], ref_metrics[key], rtol=1e-5, atol=1e-6)
    _assert_trees_close(state.params, ref_state.params)
