"""A run's programs on the target: the train step binds its activation sharding constraints (it runs inside
the mesh), and ``jrft compile`` compiles a tiny model's programs for real TPU topologies from this host."""

import json

import pytest

from jrft.aot import count_sharding_constraints
from jrft.aot.programs import offline_programs
from jrft.config import load_config
from jrft.models import ModelConfig
from jrft.models.testing import tiny_hf_config
from jrft.parallel import make_mesh


def _sft_step(mesh, model_cfg, *overrides):
    cfg = load_config(None, ["objective=sft", "train.batch_size=8", "data.max_length=64", *overrides])
    (program,) = offline_programs(cfg, model_cfg, mesh)
    return program


@pytest.mark.parametrize(
    "model, overrides",
    [
        ("tiny", ()),
        # the shape of the case that did not compile for v5e-8 (37.9 GiB of temporaries without the mesh)
        (
            "llama3-1b",
            ("model.remat=full", "model.dtype=bfloat16", "train.batch_size=32", "data.max_length=2048"),
        ),
    ],
)
def test_the_train_step_binds_its_sharding_constraints_on_a_fake_8_device_mesh(model, overrides):
    """The SFT step as the trainer builds it (``jit_step(..., mesh=...)``) lowers with the model's logical
    constraints; the same jitted function lowered outside the mesh has none (what went wrong before: the
    trainer called its step with no mesh set, and every activation was replicated). Lowering only: no
    compile, so the 1B shape takes seconds."""
    from jrft.aot.presets import model_config

    model_cfg = ModelConfig.from_hf(tiny_hf_config("llama")) if model == "tiny" else model_config(model)
    mesh = make_mesh(data=1, fsdp=8, tensor=1)
    program = _sft_step(mesh, model_cfg, *overrides)
    bound = count_sharding_constraints(program.fn.lower(*program.args))
    dropped = count_sharding_constraints(program.fn.fn.lower(*program.args))  # the bare jit, no mesh
    assert dropped == 0
    assert bound >= 10  # embeddings, every scanned layer's activations, logits


def _tiny_model_dir(tmp_path):
    path = tmp_path / "tiny"
    path.mkdir()
    (path / "config.json").write_text(json.dumps(tiny_hf_config("llama", vocab_size=256)))
    return str(path)


TOPOLOGIES = [("v5e:2x4", "mesh.fsdp=8"), ("v5p:2x2x1", "mesh.fsdp=4")]
# max_new_tokens=32 (prompt 32 + 32 = data.max_length): the configs' 256 (GRPO) and 128 (PPO) made rollout
# rows of 288 and 160 tokens and 2-3x the TPU compile time (measured: GRPO ~35 s -> ~11 s, PPO 29 s -> 15 s).
OBJECTIVES = [
    ("sft", ["train.logits_chunk_size=16"]),
    ("dpo", ["train.offload_reference=true"]),
    ("grpo", ["grpo.beta=0.04", "grpo.num_generations=4", "grpo.max_new_tokens=32"]),
]
PPO_EXTRA = ["ppo.reward_model=REWARD", "ppo.kl_coef=0.05", "ppo.max_new_tokens=32"]
PPO = [("ppo", PPO_EXTRA, *TOPOLOGIES[0])]  # one topology: ~15 s


@pytest.mark.parametrize(
    "objective, extra, topology, mesh", [(*o, *t) for o in OBJECTIVES for t in TOPOLOGIES] + PPO
)
def test_jrft_compile_tiny_programs_for_tpu(tmp_path, capsys, objective, extra, topology, mesh):
    pytest.importorskip("libtpu")
    from jrft.cli import main

    model = _tiny_model_dir(tmp_path)
    extra = [e.replace("REWARD", model) for e in extra]
    args = [
        "compile",
        objective,
        f"configs/{objective}.yaml",
        f"model.path={model}",
        "mesh.data=1",
        mesh,
        "train.batch_size=8",
        "data.max_length=64",
        "data.max_prompt_length=32",
        *extra,
        "--topology",
        topology,
        "--dump",
        str(tmp_path / "hlo"),
    ]
    assert main(args) == 0
    out = capsys.readouterr().out
    lines = [line for line in out.splitlines() if line.startswith(f"{objective}/")]
    assert lines and all(": fits  total" in line for line in lines)
    names = {line.split(":")[0] for line in lines}
    expected = {"sft": {"sft/train_step"}, "dpo": {"dpo/train_step", "dpo/reference"}}
    expected["grpo"] = {"grpo/generate", "grpo/update", "grpo/reference_logps"}
    expected["ppo"] = {f"ppo/{p}" for p in ("generate", "policy_update", "policy_forward", "reference")}
    expected["ppo"] |= {"ppo/value_update", "ppo/value_forward", "ppo/reward_score"}
    assert names == expected[objective]
    dumps = sorted(p.name for p in (tmp_path / "hlo").iterdir())
    assert len(dumps) == len(names) and all(p.endswith(".hlo.txt") for p in dumps)


def test_a_program_that_does_not_fit_exits_3(tmp_path, capsys):
    """A batch far too big for a v5e chip: reported as DOES NOT FIT (not a crash), exit status 3."""
    pytest.importorskip("libtpu")
    from jrft.cli import main

    big = tiny_hf_config("llama", vocab_size=65536, hidden_size=1024, intermediate_size=4096)
    path = tmp_path / "big"
    path.mkdir()
    (path / "config.json").write_text(json.dumps(big))
    args = ["compile", "sft", "configs/sft.yaml", f"model.path={path}", "mesh.data=8", "train.batch_size=512"]
    assert main([*args, "data.max_length=4096", "--topology", "v5e:2x4"]) == 3
    assert "DOES NOT FIT" in capsys.readouterr().out


def test_bad_input_exits_2(capsys):
    from jrft.cli import main

    assert main(["compile", "sft", "configs/sft.yaml", "model.path=llama3-1b", "--topology", "v9z:1"]) == 2
    assert "jrft compile:" in capsys.readouterr().err
    assert main(["compile", "sft", "configs/sft.yaml", "model.path=/nowhere", "--topology", "v5e:2x4"]) == 2
    assert "preset" in capsys.readouterr().err


LORA_CASES = [
    ("dpo", [], {"dpo/train_step"}),  # the reference is the base with the adapters off, inside the step
    # an nf4 base (packed codes and block scales in the state's rest, dequantized per layer in the scan) and
    # LoRA dropout (masks drawn from the step's key inside the scan)
    pytest.param(
        "dpo",
        ["lora.base_quantization=nf4", "lora.dropout=0.05"],
        {"dpo/train_step"},
        marks=pytest.mark.slow,  # ~10 s; nf4 runs (CPU) in test_lora_quant, dropout in test_lora_runs
        id="dpo-nf4-dropout",
    ),
    pytest.param(
        "grpo",
        ["grpo.beta=0.04", "grpo.num_generations=4"],
        {"grpo/generate", "grpo/update", "grpo/reference_logps"},
        marks=pytest.mark.slow,  # 21 s on a 2-core machine
    ),
    pytest.param(
        "grpo",
        ["grpo.beta=0.04", "grpo.num_generations=4", "lora.base_quantization=nf4"],
        {"grpo/generate", "grpo/update", "grpo/reference_logps"},
        marks=pytest.mark.slow,
        id="grpo-nf4",
    ),
]


@pytest.mark.parametrize("objective, extra, expected", LORA_CASES)
def test_jrft_compile_lora_programs_for_tpu(tmp_path, capsys, objective, extra, expected):
    """``lora.rank > 0``: the programs are built with the adapters as the trained parameters; the reference
    stays on the device (zero adapters over the state's base) even with ``train.offload_reference``."""
    pytest.importorskip("libtpu")
    from jrft.cli import main

    args = [
        "compile",
        objective,
        f"configs/{objective}.yaml",
        f"model.path={_tiny_model_dir(tmp_path)}",
        "mesh.data=1",
        "mesh.fsdp=8",
        "train.batch_size=8",
        "data.max_length=64",
        "data.max_prompt_length=32",
        "train.offload_reference=true",
        "lora.rank=8",
        *extra,
    ]
    assert main([*args, "--topology", "v5e:2x4"]) == 0
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith(f"{objective}/")]
    assert lines and all(": fits  total" in line for line in lines)
    assert {line.split(":")[0] for line in lines} == expected


def test_lora_programs_train_only_the_adapters():
    """The abstract train state of a LoRA run: params and optimizer state are the adapters' (as many as
    ``adapter_param_count``), the base sits in ``rest``; DPO's step takes no reference log-probs."""
    import jax

    from jrft.models.lora import LoRASpec, adapter_param_count
    from jrft.train.state import TrainState

    model_cfg = ModelConfig.from_hf(tiny_hf_config("llama", vocab_size=256))
    mesh = make_mesh(data=1, fsdp=8, tensor=1)
    common = ["objective=dpo", "train.batch_size=8", "data.max_length=64", "lora.rank=8"]
    config = load_config(None, common)
    (program,) = offline_programs(config, model_cfg, mesh)
    state, batch = program.args
    assert isinstance(state, TrainState) and not any(k.startswith("ref_") for k in batch)
    adapters = adapter_param_count(model_cfg, LoRASpec.from_config(config.lora))
    assert sum(x.size for x in jax.tree.leaves(state.params)) == adapters
    moments = sum(x.size for x in jax.tree.leaves(state.opt_state) if x.ndim > 0)
    assert moments == 2 * adapters
    assert sum(x.size for x in jax.tree.leaves(state.rest)) == model_cfg.num_params
