"""``lora.base_quantization: int8 | nf4``: the frozen base's projections in int8 with per-output-channel
float32 scales, or in QLoRA's 4-bit NormalFloat with one float32 absmax per block of 64 inputs (two codes per
byte), dequantized inside the layer; logits near the float base's, sampler and export consistent with the
dequantized weights, a LoRA run trains the adapters over it, the estimate counts the stored bytes."""

import math
from statistics import NormalDist

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jrft.config import ConfigError, load_config
from jrft.models import Decoder, ModelConfig, from_pretrained, save_pretrained
from jrft.models.lora import LoRAParam, LoRASpec, adapter_param_count, merged_layer_arrays
from jrft.models.quant import (
    NF4_BLOCK,
    NF4_CODES,
    dequantize_stacked,
    quantize_int8,
    quantize_nf4,
    quantized_counts,
    unpack_nf4,
)
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


def test_nf4_codes_are_the_normal_quantiles_of_the_paper():
    """QLoRA (arXiv:2305.14314, Appendix E; bitsandbytes' create_normal_map): 8 quantiles of N(0, 1) for the
    positive half and 7 for the negative one, evenly spaced in probability from ``offset`` to 1/2, with an
    exact 0, normalised by the largest; ``offset`` is the mean of 1 - 1/(2*15) and 1 - 1/(2*16)."""
    offset = (1 - 1 / (2 * 15) + 1 - 1 / (2 * 16)) / 2
    inv = NormalDist().inv_cdf
    positive = [inv(float(p)) for p in np.linspace(offset, 0.5, 9)[:-1]]
    negative = [-inv(float(p)) for p in np.linspace(offset, 0.5, 8)[:-1]]
    codes = np.sort(positive + [0.0] + negative)
    np.testing.assert_allclose(NF4_CODES, codes / codes.max(), atol=1e-6)
    assert NF4_CODES[7] == 0 and NF4_CODES[0] == -1 and NF4_CODES[-1] == 1 and np.all(np.diff(NF4_CODES) > 0)


def _nf4_reference(w, n_in):
    """NumPy, from the definition: codes ``[L, I, O]`` (index of the nearest NF4 value to ``w / absmax``,
    absmax over blocks of 64 consecutive inputs, a zero block with absmax 1) and each weight's absmax."""
    L = w.shape[0]
    n_i, n_o = math.prod(w.shape[1 : 1 + n_in]), math.prod(w.shape[1 + n_in :])
    flat = w.reshape(L, n_i, n_o).astype(np.float64)
    absmax = np.empty_like(flat)
    for start in range(0, n_i, NF4_BLOCK):
        block = np.abs(flat[:, start : start + NF4_BLOCK]).max(axis=1, keepdims=True)
        absmax[:, start : start + NF4_BLOCK] = np.where(block > 0, block, 1.0)
    codes = np.argmin(np.abs(flat[..., None] / absmax[..., None] - NF4_CODES), axis=-1)
    return codes, absmax


@pytest.mark.parametrize(
    "shape, n_in",
    [((2, 128, 4, 8), 1), ((2, 96, 8), 1), ((1, 8, 16, 8), 2)],  # 2 blocks; a short last block; wo's layout
)
def test_nf4_against_a_numpy_reference(shape, n_in):
    """The codes are the reference's nearest NF4 values; dequantized, each weight is within half the largest
    gap between neighbouring codes times its block's absmax; packing is two codes per byte and round-trips;
    a zero block stays zero."""
    w = np.random.default_rng(0).normal(size=shape).astype(np.float32)
    n_i = math.prod(shape[1 : 1 + n_in])
    w.reshape(shape[0], n_i, -1)[0, :NF4_BLOCK] = 0.0  # a zero block
    q, s = quantize_nf4(w, n_in)
    assert q.dtype == np.uint8 and q.shape == (*shape[:n_in], shape[n_in] // 2, *shape[1 + n_in :])
    assert s.dtype == np.float32 and s.shape == (shape[0], -(-n_i // NF4_BLOCK), *shape[1 + n_in :])
    codes, absmax = _nf4_reference(w, n_in)
    got = np.stack([np.asarray(unpack_nf4(jnp.asarray(x.reshape(n_i // 2, -1)))) for x in q])  # [L, I, O]
    np.testing.assert_array_equal(got, codes)
    np.testing.assert_array_equal(got[:, 0::2] | (got[:, 1::2] << 4), q.reshape(shape[0], n_i // 2, -1))
    back = np.asarray(dequantize_stacked(q, s, n_in, jnp.float32))
    assert back.shape == w.shape and np.all(back.reshape(codes.shape)[0, :NF4_BLOCK] == 0)
    half_gap = np.diff(NF4_CODES).max() / 2
    err = np.abs(back - w).reshape(codes.shape)
    assert np.all(err <= half_gap * absmax * (1 + 1e-6))
    np.testing.assert_allclose(back.reshape(codes.shape), NF4_CODES[codes] * absmax, rtol=1e-6)
    # NF4 fits normal weights better than a uniform 4-bit grid with an exact 0 (QLoRA's reason for it)
    uniform = np.rint(w.reshape(codes.shape) / absmax * 7) / 7 * absmax
    assert np.mean(err**2) < np.mean((uniform - w.reshape(codes.shape)) ** 2)
    qj, sj = quantize_nf4(jnp.asarray(w), n_in)  # the JAX path (abstract models) gives the same codes
    np.testing.assert_array_equal(np.asarray(qj), q)
    np.testing.assert_array_equal(np.asarray(sj), s)


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("int8") / "base"
    save_pretrained(Decoder(CFG, rngs=nnx.Rngs(0)), path)
    return str(path)


# per format: the storage dtype, shapes of wq / wq_scale / wo_scale / w_down_scale on CFG, and bounds on the
# max and RMS |logit difference| from the float base, as fractions of the float logits' std
FORMATS = {
    "int8": (jnp.int8, (2, 64, 4, 16), (2, 4, 16), (2, 64), (2, 64), (0.05, 0.01)),
    "nf4": (jnp.uint8, (2, 32, 4, 16), (2, 1, 4, 16), (2, 1, 64), (2, 2, 64), (0.6, 0.15)),
}


@pytest.mark.parametrize("quant", FORMATS)
def test_quantized_base_logits_near_the_float_base(base_dir, quant):
    """Tolerance, as fractions of the float logits' std: int8 max 5%, RMS 1%; nf4 max 60%, RMS 15%.
    Measured on this random model (weights N(0, 0.02)): int8 2.6% max, 0.6% RMS; nf4 40.8% max, 10.3% RMS:
    16x int8's error, as 4 fewer bits give (each halves a step)."""
    dtype, wq, wq_scale, wo_scale, w_down_scale, (max_bound, rms_bound) = FORMATS[quant]
    base = from_pretrained(base_dir)
    model = from_pretrained(base_dir, lora=SPEC, base_quantization=quant)
    assert model.layers.wq[...].dtype == dtype and model.layers.wq[...].shape == wq
    assert model.layers.wq_scale[...].shape == wq_scale and model.layers.wo_scale[...].shape == wo_scale
    assert model.layers.w_down_scale[...].shape == w_down_scale and model.embed[...].dtype == jnp.float32
    ref, out = np.asarray(base(TOKENS)), np.asarray(model(TOKENS))
    diff = (out - ref) / ref.std()
    print(f"{quant}: max {np.abs(diff).max():.4f}, RMS {np.sqrt(np.mean(diff**2)):.4f} of the logits' std")
    assert np.abs(diff).max() < max_bound and np.sqrt(np.mean(diff**2)) < rms_bound
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


@pytest.mark.parametrize("quant", FORMATS)
@pytest.mark.parametrize("layout, fuse", [("unrolled", True), ("unrolled", False), ("scan", False)])
def test_sampler_and_export_use_the_dequantized_weights(base_dir, tmp_path, layout, fuse, quant):
    """Fused: dequantized into the fused copy; unfused: int8 cast with the scales applied to the outputs,
    nf4 dequantized one layer at a time. The export is the dequantized base with the adapters merged: it
    reproduces the model's logits."""
    model = from_pretrained(base_dir, lora=SPEC, base_quantization=quant)
    _randomise_b(model)
    path = save_pretrained(model, tmp_path / "export")
    merged = from_pretrained(path)
    np.testing.assert_allclose(np.asarray(merged(TOKENS)), np.asarray(model(TOKENS)), atol=1e-5)
    kw = dict(max_new_tokens=6, temperature=0.0, layout=layout, fuse_projections=fuse)
    prompts, mask = np.asarray(TOKENS[:, :5]), np.ones((2, 5), np.int32)
    out, ref = generate(model, prompts, mask, **kw), generate(merged, prompts, mask, **kw)
    np.testing.assert_array_equal(out.tokens, ref.tokens)
    np.testing.assert_allclose(out.logprobs, ref.logprobs, atol=1e-5)


@pytest.mark.parametrize("quant", FORMATS)
def test_config_needs_lora_and_estimate_counts_stored_bytes(quant):
    """int8: 1 byte per projection weight plus a float32 scale per output channel; nf4: 0.5 byte plus a
    float32 scale per 64 inputs of an output channel (this float32 model: 4 bytes per weight otherwise)."""
    with pytest.raises(ConfigError) as e:
        load_config(None, [f"lora.base_quantization={quant}"])
    assert e.value.key == "lora.base_quantization"
    from jrft.parallel.memory import actual_param_bytes_per_device
    from jrft.train.runs.setup import estimate_for

    common = ["objective=sft", "train.batch_size=8", "data.max_length=64", "lora.rank=4", "lora.alpha=8"]
    plain = estimate_for(load_config(None, common), CFG, (1, 1, 1), rows=8)
    quantized = [*common, f"lora.base_quantization={quant}"]
    est = estimate_for(load_config(None, quantized), CFG, (1, 1, 1), rows=8)
    weights, code_bytes, scales = quantized_counts(CFG, quant)
    assert code_bytes == {"int8": weights, "nf4": weights // 2}[quant]
    L, D, F, q, kv = 2, 64, 128, 64, 32
    blocks = {"int8": lambda n: 1, "nf4": lambda n: -(-n // 64)}[quant]
    ins_outs = [(D, q), (D, kv), (D, kv), (q, D), (D, F), (D, F), (F, D)]
    assert scales == L * sum(blocks(i) * o for i, o in ins_outs)
    assert plain.params - est.params == 4 * weights - code_bytes - 4 * scales
    assert (est.grads, est.optimizer) == (plain.grads, plain.optimizer)
    model = Decoder(CFG, rngs=nnx.Rngs(0), lora=SPEC, base_quantization=quant)
    assert actual_param_bytes_per_device(nnx.state(model, nnx.Param)) == est.params


@pytest.mark.parametrize("quant", FORMATS)
def test_lora_run_over_a_quantized_base(tiny_task, tiny_sft, tmp_path, quant):
    """SFT with LoRA over the quantized base: the trained parameters are the adapters only, the base stays
    as loaded (int8 / nf4 codes) in the state's rest (and out of the checkpoint), the loss falls, the
    export is the dequantized base with the adapters merged and loads as a plain float model."""
    from jrft.train.runs import run_config

    out = tmp_path / "run"
    overrides = [
        *tiny_sft,
        f"output_dir={out}",
        "mesh.data=1",
        "optim.lr=1e-2",
        "train.batch_size=8",
        "train.log_every=1",
        "train.steps=6",
        "lora.rank=8",
        "lora.alpha=16",
        f"lora.base_quantization={quant}",
    ]
    result = run_config(load_config(None, overrides), progress=False)
    spec = LoRASpec(rank=8, scale=2.0)
    loaded = from_pretrained(tiny_task["model"], lora=spec, base_quantization=quant)
    leaves = jax.tree.leaves(result.state.params, is_leaf=lambda x: isinstance(x, nnx.Variable))
    assert leaves and all(isinstance(v, LoRAParam) for v in leaves)
    assert sum(v.get_value().size for v in leaves) == adapter_param_count(loaded.config, spec)
    for name in ("wq", "w_down", "w_down_scale"):  # the base as loaded
        np.testing.assert_array_equal(
            result.state.rest["layers"][name][...], getattr(loaded.layers, name)[...]
        )
    assert result.state.rest["layers"]["wq"][...].dtype == FORMATS[quant][0]
    import json

    rows = [json.loads(line) for line in open(out / "metrics.jsonl") if '"loss"' in line]
    assert rows[-1]["loss"] < rows[0]["loss"]
    exported = from_pretrained(str(out / "export"))
    assert exported.layers.wq[...].dtype == jnp.float32 and exported.lora is None
    # the export: the dequantized base plus scale * A B of the trained adapters
    nnx.update(loaded, result.state.params)
    for name, value in merged_layer_arrays(loaded).items():
        np.testing.assert_allclose(getattr(exported.layers, name)[...], value, atol=1e-6)
