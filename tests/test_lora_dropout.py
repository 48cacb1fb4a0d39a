"""``lora.dropout``: PEFT's ``B(A(dropout(x))) * scale`` in training forwards only. Dropout 0 is the model of
before; a rate > 0 changes the train step's loss deterministically in the state's rng; the sampler, the
reference and evaluation forwards never drop."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from conftest import tiny_lora_llama_hf
from flax import nnx

from jrft.config import ConfigError, load_config
from jrft.models import Decoder, ModelConfig
from jrft.models.lora import LoRAParam, LoRASpec, low_rank, zero_adapters
from jrft.sampling import generate
from jrft.train.objectives import sft
from jrft.train.state import create_train_state
from jrft.train.step import jit_step, make_train_step

CFG = ModelConfig.from_hf(tiny_lora_llama_hf())
TOKENS = jnp.asarray(np.random.default_rng(0).integers(1, 32, size=(2, 12)), jnp.int32)
BATCH = {"tokens": TOKENS, "attention_mask": jnp.ones_like(TOKENS), "loss_mask": jnp.ones_like(TOKENS)}


def _model(dropout: float, seed: int = 0):
    """A LoRA model with non-zero B (as after training), so that the adapter path changes the output."""
    model = Decoder(CFG, rngs=nnx.Rngs(0), lora=LoRASpec(rank=4, scale=2.0, dropout=dropout))
    for i, (path, var) in enumerate(nnx.to_flat_state(nnx.state(model, LoRAParam))):
        if str(path[-1]).endswith("_b"):
            var.set_value(0.05 * jax.random.normal(jax.random.key(seed + 1 + i), var.get_value().shape))
    return model


def _first_loss(dropout: float, seed: int = 0) -> float:
    """The loss of one SFT train step (as ``make_train_step`` computes it) from train-state seed ``seed``."""
    tx = optax.sgd(0.0)
    graphdef, state = create_train_state(_model(dropout), tx, seed=seed)
    step = jit_step(make_train_step(graphdef, sft.make_loss_fn(), sft.normalizers, tx))
    return float(step(state, BATCH)[1]["loss"])


def test_low_rank_drops_and_rescales_the_input():
    """Inverted dropout on the adapter's input: each value kept with probability ``keep`` and scaled by
    ``1 / keep``, else zero; the same key gives the same mask."""
    h = jnp.ones((64, 32))
    a, b = jnp.eye(32), jnp.eye(32)
    out = low_rank(h, (a, b, jax.random.key(0), jnp.float32(0.75)))  # identity adapter: out = dropped h
    np.testing.assert_allclose(np.unique(np.asarray(out)), [0.0, 1 / 0.75], rtol=1e-6)
    assert 0.65 < float(jnp.mean(out != 0)) < 0.85
    np.testing.assert_array_equal(out, low_rank(h, (a, b, jax.random.key(0), jnp.float32(0.75))))
    np.testing.assert_array_equal(low_rank(h, (a, b)), h)


def test_dropout_zero_is_the_model_of_before():
    """With ``dropout=0`` a training forward's key changes nothing."""
    model = _model(0.0)
    np.testing.assert_array_equal(model(TOKENS, dropout_key=jax.random.key(3)), model(TOKENS))


def test_dropout_changes_the_training_loss_deterministically():
    """The same state (seed) gives the same loss twice; dropout 0.3 differs from 0 and between seeds."""
    plain, dropped = _first_loss(0.0), _first_loss(0.3)
    assert dropped == _first_loss(0.3)
    assert dropped != plain and _first_loss(0.3, seed=1) != dropped
    assert _first_loss(0.0, seed=1) == plain  # without dropout the seed plays no part


@pytest.mark.parametrize("layout, fuse", [("unrolled", True), ("scan", False)])
def test_forwards_without_a_key_never_drop(layout, fuse):
    """A model with dropout 0.3 evaluates (no key: evaluation, the reference) and samples exactly as the same
    adapters with dropout 0; a training forward (with a key) differs, deterministically in the key, and its
    zero-adapter reference (DPO / GRPO / PPO under LoRA) is the base whatever the key."""
    dropped, plain = _model(0.3), _model(0.0)
    np.testing.assert_array_equal(dropped(TOKENS), plain(TOKENS))
    kw = dict(max_new_tokens=6, temperature=0.0, layout=layout, fuse_projections=fuse)
    prompts, mask = np.asarray(TOKENS[:, :5]), np.ones((2, 5), np.int32)
    out, ref = generate(dropped, prompts, mask, **kw), generate(plain, prompts, mask, **kw)
    np.testing.assert_array_equal(out.tokens, ref.tokens)
    np.testing.assert_array_equal(out.logprobs, ref.logprobs)
    key = jax.random.key(0)
    training = dropped(TOKENS, dropout_key=key)
    assert not np.allclose(training, plain(TOKENS), atol=1e-4)
    np.testing.assert_array_equal(training, dropped(TOKENS, dropout_key=key))
    graphdef, adapters, rest = nnx.split(dropped, LoRAParam, ...)
    reference = nnx.merge(graphdef, zero_adapters(adapters), rest)
    base = Decoder(CFG, rngs=nnx.Rngs(0))(TOKENS)
    np.testing.assert_array_equal(reference(TOKENS, dropout_key=key), base)


def test_evaluation_never_drops():
    """``make_eval_fn`` calls the loss with no key: the same metrics with dropout 0.3 as with 0."""
    from jrft.parallel import make_mesh
    from jrft.train.evaluation import Objective, make_eval_fn

    mesh = make_mesh(data=1, devices=jax.devices()[:1])
    host_batch = {k: np.asarray(v) for k, v in BATCH.items()}

    def loss_of(dropout):
        graphdef, state = create_train_state(_model(dropout), optax.sgd(0.0), seed=0)
        objective = Objective(sft.normalizers, sft.make_loss_fn())
        return make_eval_fn(graphdef, objective, lambda: [host_batch], mesh)(state)

    assert loss_of(0.3) == loss_of(0.0)


def test_the_peft_adapter_export_records_the_rate():
    from jrft.models.pretrained import peft_adapter_tensors

    config, _ = peft_adapter_tensors(_model(0.1))
    assert config["lora_dropout"] == 0.1


def test_config_accepts_rates_in_0_1():
    assert load_config(None, ["lora.rank=4", "lora.dropout=0.05"]).lora.dropout == 0.05
    for bad in ("1.0", "-0.1"):
        with pytest.raises(ConfigError) as e:
            load_config(None, [f"lora.dropout={bad}"])
        assert e.value.key == "lora.dropout"
