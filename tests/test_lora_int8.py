"""``lora.base_quantization: int8``: the frozen base's projections in int8 with per-output-channel float32
scales, dequantized inside the layer; logits near the float base's, sampler and export consistent with the
dequantized weights, a LoRA run trains the adapters over it, the estimate counts int8 bytes."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jrft.config import ConfigError, load_config
from jrft.models import Decoder, ModelConfig, from_pretrained, save_pretrained
from jrft.models.lora import LoRAParam, LoRASpec, merged_layer_arrays
from jrft.models.quant import dequantize_stacked, int8_counts, quantize_int8
from jrft.models.testing import tiny_hf_config
from jrft.sampling import generate

CFG = ModelConfig.from_hf(
    tiny_hf_config(
        "llama",
        vocab_size=64,
        hidden_size=64,
        intermediate_size=128,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
    )
)
SPEC = LoRASpec(rank=4, scale=2.0)
TOKENS = jnp.asarray(np.random.default_rng(0).integers(1, 64, size=(2, 12)), jnp.int32)


def test_quantize_round_trip_error_is_at_most_half_a_step():
    w = np.random.default_rng(0).normal(size=(2, 16, 4, 8)).astype(np.float32)  # [L, in, *out]
    w[1, :, 0, 0] = 0.0  # a zero column keeps scale 1 and stays zero
    q, s = quantize_int8(w, 1)
    assert q.dtype == np.int8 and s.shape == (2, 4, 8) and s.dtype == np.float32
    back = np.asarray(dequantize_stacked(jnp.asarray(q), jnp.asarray(s), 1, jnp.float32))
    assert np.all(np.abs(back - w) <= s[:, None] / 2 + 1e-7)
    assert np.all(back[1, :, 0, 0] == 0) and np.abs(q).max() == 127


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("int8") / "base"
    save_pretrained(Decoder(CFG, rngs=nnx.Rngs(0)), path)
    return str(path)


def test_int8_base_logits_near_the_float_base(base_dir):
    """Tolerance: max |logit difference| < 5% of the float logits' std; measured on this random model 2.6%
    (RMS difference 0.6% of the std)."""
    base = from_pretrained(base_dir)
    model = from_pretrained(base_dir, lora=SPEC, base_quantization="int8")
    assert model.layers.wq[...].dtype == jnp.int8 and model.layers.wq_scale[...].shape == (2, 4, 16)
    assert model.layers.w_down_scale[...].shape == (2, 64) and model.embed[...].dtype == jnp.float32
    ref, out = np.asarray(base(TOKENS)), np.asarray(model(TOKENS))
    assert np.abs(out - ref).max() < 0.05 * ref.std()
    # exactly the float model whose weights are the dequantized ones (B = 0: adapters add nothing)
    plain = Decoder(CFG, rngs=nnx.Rngs(0))
    nnx.update(plain, nnx.state(base, nnx.Param))
    for name, value in merged_layer_arrays(model).items():
        getattr(plain.layers, name).set_value(value)
    np.testing.assert_allclose(out, np.asarray(plain(TOKENS)), atol=1e-5)


def _randomise_b(model):
    for i, (path, var) in enumerate(nnx.to_flat_state(nnx.state(model, LoRAParam))):
        if str(path[-1]).endswith("_b"):
            var.set_value(0.05 * jax.random.normal(jax.random.key(i), var.get_value().shape))


@pytest.mark.parametrize("layout, fuse", [("unrolled", True), ("unrolled", False), ("scan", False)])
def test_sampler_and_export_use_the_dequantized_weights(base_dir, tmp_path, layout, fuse):
    """Fused: dequantized into the fused copy; unfused: int8 cast with the scales applied to the outputs.
    The export is the dequantized base with the adapters merged: it reproduces the model's logits."""
    model = from_pretrained(base_dir, lora=SPEC, base_quantization="int8")
    _randomise_b(model)
    path = save_pretrained(model, tmp_path / "export")
    merged = from_pretrained(path)
    np.testing.assert_allclose(np.asarray(merged(TOKENS)), np.asarray(model(TOKENS)), atol=1e-5)
    kw = dict(max_new_tokens=6, temperature=0.0, layout=layout, fuse_projections=fuse)
    prompts, mask = np.asarray(TOKENS[:, :5]), np.ones((2, 5), np.int32)
    out, ref = generate(model, prompts, mask, **kw), generate(merged, prompts, mask, **kw)
    np.testing.assert_array_equal(out.tokens, ref.tokens)
    np.testing.assert_allclose(out.logprobs, ref.logprobs, atol=1e-5)


def test_config_needs_lora_and_estimate_counts_int8_bytes():
    with pytest.raises(ConfigError) as e:
        load_config(None, ["lora.base_quantization=int8"])
    assert e.value.key == "lora.base_quantization"
    from jrft.parallel.memory import actual_param_bytes_per_device
    from jrft.train.runs.setup import estimate_for

    common = ["objective=sft", "train.batch_size=8", "data.max_length=64", "lora.rank=4", "lora.alpha=8"]
    plain = estimate_for(load_config(None, common), CFG, (1, 1, 1), rows=8)
    int8 = estimate_for(load_config(None, [*common, "lora.base_quantization=int8"]), CFG, (1, 1, 1), rows=8)
    weights, scales = int8_counts(CFG)
    assert plain.params - int8.params == 3 * weights - 4 * scales
    assert (int8.grads, int8.optimizer) == (plain.grads, plain.optimizer)
    model = Decoder(CFG, rngs=nnx.Rngs(0), lora=SPEC, base_quantization="int8")
    assert actual_param_bytes_per_device(nnx.state(model, nnx.Param)) == int8.params


def test_lora_run_over_an_int8_base(tiny_task, tmp_path):
    """SFT with LoRA over the int8 base: the base stays int8 in the state's rest (and out of the
    checkpoint), the loss falls, the export loads as a plain float model."""
    from jrft.train.runs import run_config

    out = tmp_path / "run"
    overrides = [
        "objective=sft",
        f"output_dir={out}",
        f"model.path={tiny_task['model']}",
        f"data.train={tiny_task['sft_train']}",
        "data.buckets=32",
        "data.max_length=64",
        "mesh.data=1",
        "optim.lr=1e-2",
        "train.batch_size=8",
        "train.log_every=1",
        "train.steps=6",
        "lora.rank=8",
        "lora.alpha=16",
        "lora.base_quantization=int8",
    ]
    result = run_config(load_config(None, overrides), progress=False)
    assert result.state.rest["layers"]["wq"][...].dtype == jnp.int8
    import json

    rows = [json.loads(line) for line in open(out / "metrics.jsonl") if '"loss"' in line]
    assert rows[-1]["loss"] < rows[0]["loss"]
    exported = from_pretrained(str(out / "export"))
    assert exported.layers.wq[...].dtype == jnp.float32 and exported.lora is None
