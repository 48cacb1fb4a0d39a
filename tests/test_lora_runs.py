"""LoRA through the runners: DPO and GRPO train only the adapters, the reference is the starting policy
(the base with the adapters off) and the base weights are held once; the export is the merged model."""

import gc
import json
import os

import jax
import numpy as np
import pytest
from flax import nnx

from jrft.config import load_config
from jrft.models import from_pretrained
from jrft.models.lora import LoRAParam
from jrft.train.runs import run_config

LORA = ("lora.rank=8", "lora.alpha=16")

REWARDS = """
import gc
import os

import jax


def ones(completions, **kwargs):
    # Runs in the trainer's thread (process: false) mid-run: records how many copies of the base exist.
    gc.collect()
    shape = tuple(int(n) for n in os.environ["LORA_WQ_SHAPE"].split(","))
    live = [x for x in jax.live_arrays() if x.shape == shape and not x.is_deleted()]
    with open(os.environ["LORA_COUNT_FILE"], "a") as f:
        f.write(str(sum(1 for x in live if len(x.sharding.device_set) > 1)) + " ")
    return [c.count("1") / max(len(c), 1) for c in completions]
"""


@pytest.fixture(scope="module")
def reward_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("rewards") / "lora_rewards.py"
    path.write_text(REWARDS)
    return str(path)


def _rows(out):
    return [json.loads(line) for line in open(os.path.join(out, "metrics.jsonl")) if '"eval/' not in line]


def _base_copies(tiny_task) -> int:
    """Live arrays on the run's 8-device mesh shaped like the base's stacked ``wq``: one per copy of the base
    weights (single-device views of their shards are not counted)."""
    gc.collect()
    shape = from_pretrained(tiny_task["model"]).layers.wq.shape
    gc.collect()
    live = [x for x in jax.live_arrays() if x.shape == shape and not x.is_deleted()]
    return sum(1 for x in live if len(x.sharding.device_set) > 1)


def _check_only_adapters_trained(state, tiny_task, out):
    assert all(isinstance(v, LoRAParam) for _, v in nnx.to_flat_state(state.params))
    base = from_pretrained(tiny_task["model"])
    np.testing.assert_array_equal(
        np.asarray(state.rest["layers"]["wq"][...]), np.asarray(base.layers.wq[...])
    )
    exported = from_pretrained(str(out / "export"))  # merged: differs from the base where adapters moved
    assert not np.allclose(np.asarray(exported.layers.wq[...]), np.asarray(base.layers.wq[...]))


@pytest.mark.slow  # ~10 s; DPO with LoRA runs in the default suite in test_dpo_with_lora_resumes_exactly
def test_dpo_with_lora(tiny_task, tmp_path):
    out = tmp_path / "dpo"
    overrides = [
        "objective=dpo",
        f"output_dir={out}",
        f"model.path={tiny_task['model']}",
        f"data.train={tiny_task['pref_train']}",
        "data.buckets=32",
        "data.max_length=64",
        "optim.lr=1e-2",
        "optim.schedule=constant",
        "train.batch_size=16",
        "train.log_every=1",
        "train.save_every=0",
        "train.steps=20",
        "dpo.beta=0.1",
        *LORA,
    ]
    result = run_config(load_config(None, overrides), progress=False)
    rows = _rows(out)
    # step 1 is computed before any update: the policy equals its reference, so the loss is log 2 (up to the
    # rounding of two differently fused programs)
    assert rows[0]["loss"] == pytest.approx(np.log(2.0), abs=1e-6) and abs(rows[0]["rewards/margins"]) < 1e-6
    assert rows[-1]["rewards/margins"] > 0.05 and rows[-1]["loss"] < rows[0]["loss"]
    _check_only_adapters_trained(result.state, tiny_task, out)


@pytest.mark.parametrize("rank, added", [(0, 1), (8, 0)])
def test_dpo_reference_holds_no_second_base(tiny_task, tmp_path, rank, added):
    from jrft.train.runs.offline import OBJECTIVES
    from jrft.train.runs.setup import setup_run

    overrides = [
        "objective=dpo",
        f"output_dir={tmp_path}",
        f"model.path={tiny_task['model']}",
        f"lora.rank={rank}",
    ]
    config = load_config(None, overrides)
    run = setup_run(config, data=False)
    before = _base_copies(tiny_task)
    objective = OBJECTIVES["dpo"](config, run.graphdef, run.state)
    assert (objective.frozen is None) == (rank > 0)
    assert _base_copies(tiny_task) - before == added  # full fine-tuning: the reference's copy


@pytest.mark.slow  # ~16 s; LoRA RL rounds run in the default suite through test_ppo_with_lora_*
def test_grpo_with_lora_and_kl(tiny_task, reward_file, tmp_path, monkeypatch):
    out = tmp_path / "grpo"
    counts = tmp_path / "counts.txt"
    monkeypatch.setenv("LORA_COUNT_FILE", str(counts))
    monkeypatch.setenv(
        "LORA_WQ_SHAPE", ",".join(map(str, from_pretrained(tiny_task["model"]).layers.wq.shape))
    )
    overrides = [
        "objective=grpo",
        f"output_dir={out}",
        f"model.path={tiny_task['model']}",
        f"data.train={tiny_task['prompts']}",
        "data.format=prompt_only",
        "data.buckets=16",
        "optim.lr=1e-2",
        "optim.schedule=constant",
        "train.batch_size=4",
        "train.log_every=1",
        "train.save_every=0",
        "train.steps=4",
        "grpo.num_generations=8",
        "grpo.max_new_tokens=8",
        "grpo.beta=0.05",
        f"grpo.reward_functions=[{{spec: '{reward_file}:ones', process: false}}]",
        *LORA,
    ]
    result = run_config(load_config(None, overrides), progress=False)
    rows = _rows(out)
    assert all(r["ref_logps_computed"] == 1.0 for r in rows)
    assert rows[0]["kl_mean"] == pytest.approx(0.0, abs=1e-6)  # reference = the starting policy
    assert rows[-1]["kl_mean"] > 0.0  # the adapters moved and the sampler used them
    _check_only_adapters_trained(result.state, tiny_task, out)
    assert counts.read_text().split() == ["1"] * 4  # mid-run, every round: the state's base only


def test_ppo_with_lora_trains_adapters_and_the_value_head(tiny_task, reward_file, tmp_path, monkeypatch):
    out = tmp_path / "ppo"
    overrides = [
        "objective=ppo",
        f"output_dir={out}",
        f"model.path={tiny_task['model']}",
        f"data.train={tiny_task['prompts']}",
        "data.format=prompt_only",
        "data.buckets=16",
        "mesh.data=1",
        "optim.lr=3e-3",
        "train.batch_size=8",
        "train.log_every=1",
        "train.save_every=0",
        "train.steps=2",
        "ppo.max_new_tokens=8",
        "ppo.value_model=head",
        "ppo.kl_coef=0.05",
        f"ppo.reward_functions=[{{spec: '{reward_file}:ones', process: false}}]",
        *LORA,
    ]
    monkeypatch.setenv("LORA_COUNT_FILE", str(tmp_path / "counts.txt"))
    monkeypatch.setenv("LORA_WQ_SHAPE", "0")
    result = run_config(load_config(None, overrides), progress=False)
    assert all(r["ref_logps_computed"] == 1.0 for r in _rows(out) if "ref_logps_computed" in r)
    params = {"/".join(map(str, p)): v for p, v in nnx.to_flat_state(result.state.policy.params)}
    assert "scalar_head/kernel" in params  # the fresh value head learns beside the adapters
    assert all(isinstance(v, LoRAParam) for k, v in params.items() if k != "scalar_head/kernel")
    base = from_pretrained(tiny_task["model"])
    rest_wq = result.state.policy.rest["layers"]["wq"][...]
    np.testing.assert_array_equal(np.asarray(rest_wq), np.asarray(base.layers.wq[...]))


@pytest.mark.parametrize("dropout", [pytest.param("0.0", marks=pytest.mark.slow), "0.1"])  # 0.1 covers 0.0
def test_dpo_with_lora_resumes_exactly(tiny_task, tmp_path, dropout):
    """Checkpoints hold the LoRA state (adapters, their optimizer state, the base in ``rest``); a run stopped
    at step 4 and resumed to 6 ends where the uninterrupted 6-step run ends (with ``lora.dropout`` too: its
    masks come from the state's rng and step)."""

    def config(out, steps):
        overrides = [
            "objective=dpo",
            f"output_dir={out}",
            f"model.path={tiny_task['model']}",
            f"data.train={tiny_task['pref_train']}",
            "data.buckets=32",
            "data.max_length=64",
            "mesh.data=1",
            "optim.lr=1e-2",
            "optim.schedule=constant",  # the same schedule whatever train.steps is
            "train.batch_size=8",
            "train.save_every=2",
            f"train.steps={steps}",
            *LORA,
            f"lora.dropout={dropout}",
        ]
        return load_config(None, overrides)

    whole = run_config(config(tmp_path / "whole", 6), progress=False).state
    run_config(config(tmp_path / "parts", 4), progress=False)
    # the checkpoint is adapter-sized: adapters + Adam moments (3x the adapters) and small files, no base
    adapter_bytes = sum(x.nbytes for x in jax.tree.leaves(whole.params))
    base_bytes = os.path.getsize(os.path.join(tiny_task["model"], "model.safetensors"))
    saved = _dir_bytes(tmp_path / "parts" / "checkpoints" / "4")
    # (measured: 229 KB for 64 KB of adapters; this tiny base is 311 KB, an 8B one 16 GB)
    assert saved < 3 * adapter_bytes + 64 * 1024 < base_bytes, (saved, adapter_bytes, base_bytes)
    meta = json.loads((tmp_path / "parts" / "checkpoints" / "4" / "meta" / "metadata").read_text())
    assert meta["lora_base"]["path"] == tiny_task["model"] and meta["lora_base"]["bytes"] == base_bytes
    resumed = run_config(config(tmp_path / "parts", 6), progress=False, allow_config_change=True).state
    for a, b in zip(jax.tree.leaves(whole.params), jax.tree.leaves(resumed.params), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert int(resumed.step) == 6
    # the base came back from model.path
    np.testing.assert_array_equal(
        np.asarray(resumed.rest["layers"]["wq"][...]), np.asarray(whole.rest["layers"]["wq"][...])
    )


def _dir_bytes(path) -> int:
    return sum(os.path.getsize(os.path.join(d, f)) for d, _, files in os.walk(path) for f in files)


def test_lora_resume_against_another_base_errors(tiny_task, tmp_path):
    """A LoRA checkpoint leaves the base out and records its fingerprint: new weights at the same
    ``model.path`` are refused on resume (and by ``jrft export``), naming both fingerprints."""
    import shutil

    from safetensors.numpy import load_file

    from jrft.models import Decoder, save_pretrained
    from jrft.train.runs.export import export_checkpoint
    from jrft.train.runs.resume import ConfigDriftError

    base = tmp_path / "base"
    shutil.copytree(tiny_task["model"], base)
    overrides = [
        "objective=sft",
        f"output_dir={tmp_path / 'run'}",
        f"model.path={base}",
        f"data.train={tiny_task['sft_train']}",
        "data.buckets=32",
        "data.max_length=64",
        "mesh.data=1",
        "train.batch_size=8",
        "train.steps=2",
        *LORA,
    ]
    run_config(load_config(None, overrides), progress=False)
    # jrft export rebuilds the base from model.path under the checkpoint's adapters: the run's own export
    export_checkpoint(str(tmp_path / "run"), str(tmp_path / "again"))
    for name in ("model.safetensors", "adapter/adapter_model.safetensors"):
        ours = load_file(str(tmp_path / "run" / "export" / name))
        again = load_file(str(tmp_path / "again" / name))
        assert ours.keys() == again.keys()
        for key in ours:
            np.testing.assert_array_equal(ours[key], again[key], err_msg=key)
    other = Decoder(from_pretrained(str(base)).config, rngs=nnx.Rngs(1))  # same shapes, other weights
    save_pretrained(other, base)
    with pytest.raises(ConfigDriftError, match="holds LoRA adapters trained on the base .* other weights"):
        run_config(load_config(None, [*overrides, "train.steps=4"]), progress=False, allow_config_change=True)
    with pytest.raises(ConfigDriftError, match="fingerprint"):
        export_checkpoint(str(tmp_path / "run"), str(tmp_path / "export"))


def test_a_checkpoint_that_holds_the_base_still_restores(tmp_path):
    """LoRA checkpoints written before they left the base out (the whole state) restore as they were."""
    import optax
    import orbax.checkpoint as ocp

    from jrft.models import Decoder, ModelConfig
    from jrft.models.lora import LoRASpec
    from jrft.models.testing import tiny_hf_config
    from jrft.train.checkpoint import Checkpointer
    from jrft.train.state import create_train_state

    cfg = ModelConfig.from_hf(tiny_hf_config("llama", vocab_size=32, hidden_size=32, intermediate_size=64))
    _, state = create_train_state(
        Decoder(cfg, rngs=nnx.Rngs(0), lora=LoRASpec(4, 2.0)), optax.adam(1e-3), seed=0
    )
    manager = ocp.CheckpointManager(tmp_path, options=ocp.CheckpointManagerOptions(create=True))
    old = ocp.args.Composite(state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave({"step": 1}))
    manager.save(1, args=old, force=True)
    manager.wait_until_finished()
    manager.close()
    checkpointer = Checkpointer(tmp_path)
    restored, meta = checkpointer.restore(None, state)
    checkpointer.close()
    assert meta["step"] == 1
    for a, b in zip(jax.tree.leaves(state), jax.tree.leaves(restored), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
