"""LoRA adapters in the decoder: B = 0 gives the base model exactly; only adapters are trainable and train;
the sampler and the export use the current adapters (merged ``W + scale * A B``)."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from conftest import tiny_lora_llama_hf
from flax import nnx

from jrft.models import Decoder, ModelConfig, from_pretrained, save_pretrained
from jrft.models.lora import LoRAParam, LoRASpec, merged_layer_arrays, zero_adapters
from jrft.sampling import generate
from jrft.train.objectives import sft
from jrft.train.state import create_train_state
from jrft.train.step import jit_step, make_train_step

CFG = ModelConfig.from_hf(tiny_lora_llama_hf())
SPEC = LoRASpec(rank=4, scale=2.0)
TOKENS = jnp.asarray(np.random.default_rng(0).integers(1, 32, size=(2, 12)), jnp.int32)


def _randomise_b(model, seed=1):
    """Non-zero B (as after training) so the adapters change the output."""
    for i, (path, var) in enumerate(nnx.to_flat_state(nnx.state(model, LoRAParam))):
        if str(path[-1]).endswith("_b"):
            var.set_value(0.05 * jax.random.normal(jax.random.key(seed + i), var.get_value().shape))


def _merged_plain(model):
    """A model without adapters whose layer weights are ``model``'s merged ones."""
    plain = Decoder(CFG, rngs=nnx.Rngs(0))
    nnx.update(plain, nnx.state(model, nnx.All(nnx.Param, nnx.Not(LoRAParam))))
    for name, value in merged_layer_arrays(model).items():
        getattr(plain.layers, name).set_value(value)
    return plain


def test_first_forward_equals_base_exactly():
    base = Decoder(CFG, rngs=nnx.Rngs(0))
    lora = Decoder(CFG, rngs=nnx.Rngs(0), lora=SPEC)
    np.testing.assert_array_equal(np.asarray(lora(TOKENS)), np.asarray(base(TOKENS)))


def test_adapters_shapes_axes_and_merged_equivalence():
    model = Decoder(CFG, rngs=nnx.Rngs(0), lora=LoRASpec(rank=4, scale=2.0, modules=("q_proj", "down_proj")))
    assert model.lora.wq_a.shape == (2, 32, 4) and model.lora.wq_b.shape == (2, 4, 32)
    assert model.lora.w_down_a.shape == (2, 64, 4) and not hasattr(model.lora, "wk_a")
    assert model.lora.wq_b.get_metadata()["out_sharding"] == ("layers", "lora_rank", "heads")
    _randomise_b(model)
    out = model(TOKENS)
    assert not np.allclose(out, Decoder(CFG, rngs=nnx.Rngs(0))(TOKENS), atol=1e-3)
    np.testing.assert_allclose(out, _merged_plain(model)(TOKENS), rtol=1e-5, atol=1e-5)


def test_train_state_params_are_only_adapters():
    graphdef, state = create_train_state(Decoder(CFG, rngs=nnx.Rngs(0), lora=SPEC), optax.adam(1e-3), seed=0)
    params = nnx.to_flat_state(state.params)
    assert len(params) == 14 and all(isinstance(v, LoRAParam) for _, v in params)
    rest = {"/".join(map(str, p)) for p, _ in nnx.to_flat_state(state.rest)}
    assert {"embed", "layers/wq", "layers/w_down", "final_norm"} <= rest
    # optimizer state only for the adapters: its arrays are the adapters' sizes
    n_adapter = sum(x.size for x in jax.tree.leaves(state.params))
    assert sum(x.size for x in jax.tree.leaves(state.opt_state)) <= 2 * n_adapter + 8
    # zero adapters: the reference (adapters off) is the base model
    ref = nnx.merge(graphdef, zero_adapters(state.params), state.rest)
    np.testing.assert_array_equal(ref(TOKENS), Decoder(CFG, rngs=nnx.Rngs(0))(TOKENS))


def test_sft_steps_change_only_adapters_and_lower_the_loss():
    tx = optax.adam(1e-2)
    graphdef, state = create_train_state(Decoder(CFG, rngs=nnx.Rngs(0), lora=SPEC), tx, seed=0)
    rest0 = [np.asarray(x) for x in jax.tree.leaves(state.rest)]
    params0 = [np.asarray(x) for x in jax.tree.leaves(state.params)]
    step = jit_step(make_train_step(graphdef, sft.make_loss_fn(), sft.normalizers, tx))
    batch = {"tokens": TOKENS, "attention_mask": jnp.ones_like(TOKENS), "loss_mask": jnp.ones_like(TOKENS)}
    losses = []
    for _ in range(8):
        state, metrics = step(state, batch)
        losses.append(float(metrics["loss"]))
    assert losses[-1] < losses[0] - 0.05
    for a, b in zip(rest0, jax.tree.leaves(state.rest), strict=True):
        np.testing.assert_array_equal(a, np.asarray(b))  # the base never moves
    changed = [
        not np.array_equal(a, np.asarray(b))
        for a, b in zip(params0, jax.tree.leaves(state.params), strict=True)
    ]
    assert all(changed)  # A and B of every adapted projection move


def test_grad_is_taken_only_wrt_adapters():
    graphdef, state = create_train_state(Decoder(CFG, rngs=nnx.Rngs(0), lora=SPEC), optax.sgd(0.1), seed=0)

    def loss(params):
        return jnp.mean(nnx.merge(graphdef, params, state.rest)(TOKENS) ** 2)

    grads = jax.grad(loss)(state.params)
    assert all(isinstance(v, LoRAParam) for _, v in nnx.to_flat_state(grads))
    # with B = 0 only B gets a gradient (dL/dA = x^T (dL/dy) B^T = 0), as in the paper
    for path, v in nnx.to_flat_state(grads):
        assert np.any(np.asarray(v.get_value()) != 0) == str(path[-1]).endswith("_b")


@pytest.mark.parametrize("layout, fuse", [("unrolled", True), ("unrolled", False), ("scan", False)])
def test_sampler_uses_current_adapters(layout, fuse):
    """Fused: adapters merged into the fused copy; unfused: applied beside the untouched weights."""
    model = Decoder(CFG, rngs=nnx.Rngs(0), lora=SPEC)
    _randomise_b(model)
    kw = dict(max_new_tokens=6, temperature=0.0, layout=layout, fuse_projections=fuse)
    prompts, mask = np.asarray(TOKENS[:, :5]), np.ones((2, 5), np.int32)
    out = generate(model, prompts, mask, **kw)
    ref = generate(_merged_plain(model), prompts, mask, **kw)
    np.testing.assert_array_equal(out.tokens, ref.tokens)
    np.testing.assert_allclose(out.logprobs, ref.logprobs, atol=1e-5)
    base = generate(Decoder(CFG, rngs=nnx.Rngs(0)), prompts, mask, **kw)
    assert not np.allclose(out.logprobs, base.logprobs, atol=1e-3)


def test_export_merges_adapters(tmp_path):
    model = Decoder(CFG, rngs=nnx.Rngs(0), lora=SPEC)
    _randomise_b(model)
    path = save_pretrained(model, tmp_path / "merged")
    loaded = from_pretrained(path)
    assert loaded.lora is None
    np.testing.assert_allclose(loaded(TOKENS), model(TOKENS), rtol=1e-5, atol=1e-5)
    # loading with adapters: fresh B = 0, so the model equals the checkpoint
    again = from_pretrained(path, lora=SPEC)
    np.testing.assert_array_equal(again(TOKENS), loaded(TOKENS))
    assert np.all(np.asarray(again.lora.wq_b[...]) == 0) and np.any(np.asarray(again.lora.wq_a[...]) != 0)


def test_peft_adapter_export_matches_the_merged_weights(tmp_path):
    """``export/adapter/`` in PEFT's layout: merged W = base W + lora_alpha / r * B A for every tensor."""
    import json

    from safetensors.numpy import load_file

    model = Decoder(CFG, rngs=nnx.Rngs(0), lora=SPEC)
    _randomise_b(model)
    save_pretrained(model, tmp_path / "m")
    save_pretrained(Decoder(CFG, rngs=nnx.Rngs(0)), tmp_path / "b")
    merged = load_file(str(tmp_path / "m" / "model.safetensors"))
    base = load_file(str(tmp_path / "b" / "model.safetensors"))
    config = json.loads((tmp_path / "m" / "adapter" / "adapter_config.json").read_text())
    adapter = load_file(str(tmp_path / "m" / "adapter" / "adapter_model.safetensors"))
    assert config["peft_type"] == "LORA" and config["r"] == 4 and len(config["target_modules"]) == 7
    assert len(adapter) == 7 * CFG.num_layers * 2
    scale = config["lora_alpha"] / config["r"]
    for name in (k for k in adapter if k.endswith("lora_A.weight")):
        a, b = adapter[name], adapter[name.replace("lora_A", "lora_B")]  # [r, in], [out, r]
        weight = name.removeprefix("base_model.model.").replace("lora_A.weight", "weight")
        np.testing.assert_allclose(merged[weight], base[weight] + scale * b @ a, rtol=1e-5, atol=1e-6)


def test_peft_loads_the_adapter_with_equal_logits(tmp_path):
    """``peft.PeftModel.from_pretrained(base, export/adapter)`` gives jrft's logits (float32, 1e-4)."""
    peft = pytest.importorskip("peft")  # not yet in the test extra
    torch = pytest.importorskip("torch")
    import transformers

    spec = LoRASpec(rank=4, scale=8.0, modules=("q_proj", "v_proj", "o_proj", "down_proj"))
    model = Decoder(CFG, rngs=nnx.Rngs(0), lora=spec)
    _randomise_b(model)
    save_pretrained(model, tmp_path / "lora")
    save_pretrained(Decoder(CFG, rngs=nnx.Rngs(0)), tmp_path / "base")
    base = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "base", dtype=torch.float32)
    with torch.no_grad():
        theirs = peft.PeftModel.from_pretrained(base, tmp_path / "lora" / "adapter")(
            torch.tensor(np.asarray(TOKENS))
        )
    np.testing.assert_allclose(theirs.logits.numpy(), np.asarray(model(TOKENS)), atol=1e-4)
