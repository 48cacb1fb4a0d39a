"""The per-device memory estimate agrees with what sharded parameters really occupy."""

import jax
import pytest
from flax import nnx

from jrft.models import Decoder, ModelConfig
from jrft.models.testing import tiny_hf_config
from jrft.parallel import make_mesh, shard_model
from jrft.parallel.memory import actual_param_bytes_per_device, estimate_memory


@pytest.mark.parametrize("shape", [(8, 1, 1), (1, 8, 1), (1, 2, 4), (2, 2, 2)])
def test_param_estimate_matches_sharded_parameters(shape):
    cfg = ModelConfig.from_hf(
        tiny_hf_config(
            "llama",
            vocab_size=256,
            hidden_size=128,
            intermediate_size=256,
            num_key_value_heads=4,
            head_dim=32,
        )
    )
    model = shard_model(Decoder(cfg, rngs=nnx.Rngs(0)), make_mesh(*shape))
    params = nnx.state(model, nnx.Param)
    actual = actual_param_bytes_per_device(params)
    est = estimate_memory(cfg, mesh_shape=shape, batch=8, seq_len=64)
    assert 0.8 * actual <= est.params <= 1.2 * actual, (est.params, actual)
    assert est.optimizer == 2 * est.params and est.grads == est.params


def test_remat_and_cache_terms():
    cfg = ModelConfig.from_hf(tiny_hf_config("llama"))
    none = estimate_memory(cfg, mesh_shape=(1, 1, 1), batch=8, seq_len=64, remat="none")
    full = estimate_memory(cfg, mesh_shape=(1, 1, 1), batch=8, seq_len=64, remat="full")
    assert full.activations < none.activations
    sampling = estimate_memory(
        cfg, mesh_shape=(2, 1, 1), batch=8, seq_len=64, training=False, cache_batch=32, cache_len=128
    )
    # 2 (k, v) x layers x local batch x kv heads x length x head_dim x 4 bytes
    assert sampling.kv_cache == 2 * cfg.num_layers * 16 * cfg.num_kv_heads * 128 * cfg.head_dim * 4
    assert sampling.grads == 0 and sampling.optimizer == 0
    assert "GiB" in sampling.describe()
    with pytest.raises(ValueError, match="unknown remat policy"):
        estimate_memory(cfg, mesh_shape=(1, 1, 1), batch=1, seq_len=1, remat="bogus")
    assert jax.device_count() == 8


def test_logits_chunking_and_reference_terms():
    cfg = ModelConfig.from_hf(tiny_hf_config("llama", vocab_size=32000, hidden_size=64))
    kw = dict(mesh_shape=(2, 1, 1), batch=8, seq_len=512, remat="full")
    full = estimate_memory(cfg, **kw)
    chunked = estimate_memory(cfg, **kw, logits_chunk_size=128)
    local_batch, v, d = 4, 32000, 64
    saved = 2 * local_batch * (512 - 128) * v * 4 - local_batch * 512 * d * 4
    assert full.activations - chunked.activations == saved
    assert chunked.params == full.params and chunked.reference == 0
    ref = estimate_memory(cfg, **kw, reference=True)
    assert ref.reference == ref.params and ref.total == full.total + ref.params
    assert estimate_memory(cfg, **kw, reference=True, offload_reference=True).reference == 0
    assert "reference" in ref.describe()


@pytest.mark.parametrize("chunk", [0, 16])
def test_logits_term_matches_compiled_temporaries(chunk):
    """The estimator's logits term against XLA's own count for the LM head + log-softmax backward alone
    (a vocab-heavy head, so the rest of the program is negligible)."""
    import jax.numpy as jnp

    from jrft.parallel.memory import logits_activation_bytes
    from jrft.train.logprobs import hidden_token_logps

    cfg = ModelConfig.from_hf(tiny_hf_config("llama", vocab_size=8192, hidden_size=32))
    graphdef, params, rest = nnx.split(Decoder(cfg, rngs=nnx.Rngs(0)), nnx.Param, ...)
    b, t = 8, 128
    hidden = jnp.ones((b, t, 32))
    targets = jnp.zeros((b, t), jnp.int32)

    def f(p, h):
        return jnp.sum(hidden_token_logps(nnx.merge(graphdef, p, rest), h, targets, chunk_size=chunk))

    analysis = jax.jit(jax.grad(f, argnums=(0, 1))).lower(params, hidden).compile().memory_analysis()
    if analysis is None:
        pytest.skip("no memory analysis on this backend")
    est = logits_activation_bytes(cfg, b, t, chunk=chunk)
    assert 0.8 * est <= analysis.temp_size_in_bytes <= 1.25 * est, (est, analysis.temp_size_in_bytes)


def test_sampler_weights_resolution():
    """``train.sampler_weights``: explicit choices stand; ``auto`` gathers when the sampler's estimate with
    the gathered copy fits 90% of the device (or the device does not say), and the estimate follows."""
    from jrft.aot.presets import model_config
    from jrft.config import load_config
    from jrft.train.runs.setup import run_estimates, sampler_gathers_weights

    cfg = model_config("llama3-8b")
    overrides = [
        "objective=grpo",
        "model.path=llama3-8b",
        "model.dtype=bfloat16",
        "model.param_dtype=bfloat16",
    ]
    overrides += ["train.batch_size=8", "grpo.num_generations=8", "grpo.max_new_tokens=1024"]
    overrides += ["data.max_prompt_length=256", "grpo.reward_functions=[{name: accuracy}]"]

    def config(choice):
        return load_config(None, [*overrides, f"train.sampler_weights={choice}", "output_dir=/tmp/x"])

    shape = [1, 4, 1]
    gib = 2**30
    auto = config("auto")
    assert sampler_gathers_weights(auto, cfg, shape, platform="tpu", hbm_bytes=None)  # CPU: unknown memory
    assert sampler_gathers_weights(auto, cfg, shape, platform="tpu", hbm_bytes=int(95.74 * gib))  # v5p
    assert not sampler_gathers_weights(auto, cfg, shape, platform="tpu", hbm_bytes=int(15.75 * gib))  # v5e
    assert sampler_gathers_weights(config("gathered"), cfg, shape, platform="tpu", hbm_bytes=gib)
    assert not sampler_gathers_weights(config("sharded"), cfg, shape, platform="tpu", hbm_bytes=None)
    big = run_estimates(auto, cfg, shape, platform="tpu", hbm_bytes=None)["sampler"]
    small = run_estimates(auto, cfg, shape, platform="tpu", hbm_bytes=int(15.75 * gib))["sampler"]
    # the gathered copy of an 8B model in bf16 is ~15 GiB; sharded, two layers' worth
    assert 14 * gib < big - small < 15 * gib
    with pytest.raises(ValueError, match="sampler_weights"):
        config("whole")


@pytest.mark.parametrize(
    "modules", [("q_proj", "v_proj"), ("q_proj", "k_proj", "v_proj", "o_proj", "down_proj")]
)
def test_lora_estimate_counts_gradients_and_moments_of_the_adapters_only(modules):
    """With LoRA: params = base + adapters, grads and AdamW moments of the adapters alone (as many as the
    model's LoRAParam variables and the optimizer state it really builds), no reference copy."""
    import optax

    from jrft.config import load_config
    from jrft.models.lora import LoRAParam, LoRASpec, adapter_param_count
    from jrft.train.runs.setup import estimate_for
    from jrft.train.state import create_train_state

    cfg = ModelConfig.from_hf(tiny_hf_config("llama", vocab_size=256, hidden_size=64, intermediate_size=128))
    spec = LoRASpec(rank=8, scale=2.0, modules=modules)
    model = Decoder(cfg, rngs=nnx.Rngs(0), lora=spec)
    adapters = sum(x.size for x in jax.tree.leaves(nnx.state(model, LoRAParam)))
    assert adapter_param_count(cfg, spec) == adapters
    _, state = create_train_state(model, optax.adamw(1e-3), seed=0)
    moments = sum(x.size for x in jax.tree.leaves(state.opt_state) if x.ndim > 0)
    assert moments == 2 * adapters

    names = "[" + ", ".join(modules) + "]"
    common = ["objective=dpo", "train.batch_size=8", "data.max_length=64"]
    full = estimate_for(load_config(None, common), cfg, (1, 1, 1), rows=8)
    lora = estimate_for(
        load_config(None, [*common, "lora.rank=8", f"lora.target_modules={names}"]), cfg, (1, 1, 1), rows=8
    )
    n = cfg.num_params
    assert (full.params, full.grads, full.optimizer, full.reference) == (4 * n, 4 * n, 8 * n, 4 * n)
    assert (lora.params, lora.grads, lora.optimizer, lora.reference) == (
        4 * (n + adapters),
        4 * adapters,
        8 * adapters,
        0,
    )
    assert lora.activations == full.activations
    # sharded: every term split over fsdp x tensor
    split = estimate_for(
        load_config(None, [*common, "lora.rank=8", f"lora.target_modules={names}"]), cfg, (1, 4, 2), rows=8
    )
    assert split.optimizer == 8 * adapters // 8 and split.params == 4 * (n + adapters) // 8
