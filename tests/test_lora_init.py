"""``lora.init_from``: a PEFT adapter directory (PEFT's own or jrft's export/adapter/) as the run's starting
adapters. Its r / lora_alpha / rsLoRA / modules fill the unset ``lora`` fields and must agree with set ones;
the first forward is the adapted model's (PEFT's logits, or the merged export's)."""

import json
import os

import jax
import numpy as np
import pytest
from conftest import tiny_lora_llama_hf

from jrft.config import ConfigError, load_config
from jrft.models import Decoder, ModelConfig, from_pretrained, save_pretrained
from jrft.models.lora import LoRASpec
from jrft.train.runs import run_config
from jrft.train.runs.setup import setup_run

CFG = tiny_lora_llama_hf()
TOKENS = np.random.default_rng(0).integers(1, 32, size=(2, 12)).astype(np.int32)


@pytest.fixture(scope="module")
def peft_adapter(tmp_path_factory):
    """A tiny Llama saved by jrft, a PEFT adapter on it made by ``peft`` itself (random A and B, rsLoRA,
    three modules), and PEFT's float32 logits of the adapted model."""
    peft = pytest.importorskip("peft")
    torch = pytest.importorskip("torch")
    import transformers
    from flax import nnx

    root = tmp_path_factory.mktemp("peft")
    save_pretrained(Decoder(ModelConfig.from_hf(CFG), rngs=nnx.Rngs(0)), root / "base")
    torch.manual_seed(0)
    base = transformers.AutoModelForCausalLM.from_pretrained(root / "base", dtype=torch.float32)
    lora = peft.LoraConfig(
        r=4,
        lora_alpha=12,
        use_rslora=True,
        target_modules=["q_proj", "o_proj", "up_proj"],
        init_lora_weights=False,  # random B too: the adapters change the output
        task_type="CAUSAL_LM",
    )
    model = peft.get_peft_model(base, lora)
    model.save_pretrained(root / "adapter")
    with torch.no_grad():
        logits = model(torch.tensor(TOKENS)).logits.numpy()
    return {"base": str(root / "base"), "adapter": str(root / "adapter"), "logits": logits}


def test_settings_come_from_the_adapter(peft_adapter):
    c = load_config(None, [f"lora.init_from={peft_adapter['adapter']}"]).lora
    assert (c.rank, c.alpha, c.use_rslora) == (4, 12.0, True)
    assert c.modules == ("q_proj", "o_proj", "up_proj") and c.scale == pytest.approx(12 / 2)
    # the same values given explicitly agree
    same = ["lora.rank=4", "lora.alpha=12", "lora.target_modules=[up_proj, q_proj, o_proj]"]
    again = load_config(None, [f"lora.init_from={peft_adapter['adapter']}", *same]).lora
    assert (again.rank, again.scale, again.modules) == (c.rank, c.scale, c.modules)


@pytest.mark.parametrize(
    "override, key, text",
    [
        ("lora.rank=8", "lora.rank", "r=4"),
        ("lora.alpha=32", "lora.alpha", "lora_alpha=12"),
        (
            "lora.target_modules=[q_proj, v_proj]",
            "lora.target_modules",
            "adapts ['q_proj', 'o_proj', 'up_proj']",
        ),
    ],
)
def test_disagreements_name_the_field_and_the_file(peft_adapter, override, key, text):
    with pytest.raises(ConfigError) as e:
        load_config(None, [f"lora.init_from={peft_adapter['adapter']}", override])
    assert e.value.key == key and text in str(e.value) and peft_adapter["adapter"] in str(e.value)


def test_unusable_adapters_are_refused(peft_adapter, tmp_path):
    with pytest.raises(ConfigError, match="adapter_config.json not found") as e:
        load_config(None, [f"lora.init_from={tmp_path}"])
    assert e.value.key == "lora.init_from"
    dora = tmp_path / "dora"
    os.makedirs(dora)
    config = json.loads(open(os.path.join(peft_adapter["adapter"], "adapter_config.json")).read())
    (dora / "adapter_config.json").write_text(json.dumps({**config, "use_dora": True}))
    os.symlink(
        os.path.join(peft_adapter["adapter"], "adapter_model.safetensors"), dora / "adapter_model.safetensors"
    )
    with pytest.raises(ConfigError, match="use_dora=True is not supported"):
        load_config(None, [f"lora.init_from={dora}"])


def test_peft_adapter_gives_peft_logits(peft_adapter):
    lora = load_config(None, [f"lora.init_from={peft_adapter['adapter']}"]).lora
    model = from_pretrained(peft_adapter["base"], lora=LoRASpec.from_config(lora), lora_init=lora.init_from)
    np.testing.assert_allclose(np.asarray(model(TOKENS)), peft_adapter["logits"], atol=1e-5)


def test_adapter_that_does_not_fit_the_model_names_the_file(peft_adapter, tmp_path):
    from flax import nnx

    from jrft.models.pretrained import CheckpointError

    wider = {**CFG, "intermediate_size": 48}
    save_pretrained(Decoder(ModelConfig.from_hf(wider), rngs=nnx.Rngs(0)), tmp_path / "wider")
    lora = load_config(None, [f"lora.init_from={peft_adapter['adapter']}"]).lora
    with pytest.raises(CheckpointError, match=r"adapter_model.safetensors: the adapter does not fit") as e:
        from_pretrained(tmp_path / "wider", lora=LoRASpec.from_config(lora), lora_init=lora.init_from)
    assert "up_proj.lora_B.weight' has shape (64, 4), expected (48, 4)" in str(e.value)


@pytest.mark.slow  # ~10 s: a LoRA run, export, and a second run from it
def test_run_starts_from_an_exported_adapter(tiny_sft, tmp_path):
    """SFT with LoRA for a few steps, then a second run from its export/adapter/: the first forward equals
    the exported (merged) model's logits, and the run trains on from there."""
    first = tmp_path / "first"
    common = [
        *tiny_sft,
        "mesh.data=1",
        "optim.lr=1e-2",
        "train.batch_size=8",
        "train.save_every=0",
        "train.steps=3",
    ]
    run_config(
        load_config(None, [*common, f"output_dir={first}", "lora.rank=4", "lora.alpha=8"]), progress=False
    )
    adapter = str(first / "export" / "adapter")
    config = load_config(None, [*common, f"output_dir={tmp_path / 'second'}", f"lora.init_from={adapter}"])
    assert (config.lora.rank, config.lora.alpha) == (4, 8.0)
    run = setup_run(config, data=False)
    tokens = np.random.default_rng(1).integers(1, 12, size=(2, 16)).astype(np.int32)
    from flax import nnx

    with jax.set_mesh(run.mesh):
        ours = nnx.merge(run.graphdef, run.state.params, run.state.rest)(tokens)
    merged = from_pretrained(str(first / "export"))(tokens)
    np.testing.assert_allclose(np.asarray(ours), np.asarray(merged), atol=1e-5)
    result = run_config(config, progress=False)
    assert int(result.state.step) == 3


@pytest.mark.slow  # 26 s: the precompute pass reads the whole preference set
def test_dpo_reference_is_the_base_live_or_precomputed(tiny_task, tmp_path):
    """From an adapter that moves the model, DPO's reference is still the base (adapters off): live in the
    step and precomputed give the same first-step loss, and the first margins are not zero."""
    import json

    from flax import nnx

    from jrft.models.lora import LoRAParam

    model = from_pretrained(tiny_task["model"], lora=LoRASpec(rank=4, scale=2.0))
    for i, (path, var) in enumerate(nnx.to_flat_state(nnx.state(model, LoRAParam))):
        if str(path[-1]).endswith("_b"):
            var.set_value(0.2 * jax.random.normal(jax.random.key(i), var.get_value().shape))
    adapter = os.path.join(save_pretrained(model, tmp_path / "sft"), "adapter")
    rows = {}
    for flag in ("false", "true"):
        out = tmp_path / f"dpo-{flag}"
        overrides = [
            "objective=dpo",
            f"output_dir={out}",
            f"model.path={tiny_task['model']}",
            f"data.train={tiny_task['pref_train']}",
            "data.buckets=32",
            "data.max_length=64",
            "mesh.data=1",
            "train.batch_size=8",
            "train.steps=1",
            f"dpo.precompute_ref_logps={flag}",
            f"lora.init_from={adapter}",
        ]
        run_config(load_config(None, overrides), progress=False)
        rows[flag] = json.loads(open(out / "metrics.jsonl").readline())
    assert abs(rows["false"]["rewards/margins"]) > 1e-3
    for key in ("loss", "rewards/margins", "rewards/chosen"):
        assert rows["true"][key] == pytest.approx(rows["false"][key], abs=1e-5), key
