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


def _sft_step(mesh):
    cfg = load_config(None, ["objective=sft", "train.batch_size=8", "data.max_length=64", "model.path=x"])
    (program,) = offline_programs(cfg, ModelConfig.from_hf(tiny_hf_config("llama")), mesh)
    return program


def test_the_train_step_binds_its_sharding_constraints_on_a_fake_8_device_mesh():
    """The SFT step as the trainer builds it (``jit_step(..., mesh=...)``) lowers with the model's logical
    constraints; the same jitted function lowered outside the mesh has none (what went wrong before: the
    trainer called its step with no mesh set, and every activation was replicated)."""
    mesh = make_mesh(data=2, fsdp=4, tensor=1)
    program = _sft_step(mesh)
    bound = count_sharding_constraints(program.fn.lower(*program.args))
    dropped = count_sharding_constraints(program.fn.fn.lower(*program.args))  # the bare jit, no mesh
    assert dropped == 0
    assert bound >= 10  # embeddings, every scanned layer's activations, logits


def _tiny_model_dir(tmp_path):
    path = tmp_path / "tiny"
    path.mkdir()
    (path / "config.json").write_text(json.dumps(tiny_hf_config("llama", vocab_size=256)))
    return str(path)


@pytest.mark.parametrize(
    "objective, topology, extra",
    [
        ("sft", "v5e:2x4", ["mesh.fsdp=8", "train.logits_chunk_size=16"]),
        ("dpo", "v5p:2x2x1", ["mesh.fsdp=4", "train.offload_reference=true"]),
        ("grpo", "v5e-8", ["mesh.fsdp=8", "grpo.beta=0.04", "grpo.num_generations=4"]),
    ],
)
def test_jrft_compile_tiny_programs_for_tpu(tmp_path, capsys, objective, topology, extra):
    pytest.importorskip("libtpu")
    from jrft.cli import main

    args = [
        "compile",
        objective,
        f"configs/{objective}.yaml",
        f"model.path={_tiny_model_dir(tmp_path)}",
        "mesh.data=1",
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
