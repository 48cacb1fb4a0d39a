"""DPO with precomputed reference log-probs (``dpo.precompute_ref_logps``): the same run as with the live
reference, without reference parameters in memory, and resumable."""

import gc
import json
import os

import jax
import numpy as np
import pytest
from conftest import param_arrays

from jrft.config import load_config
from jrft.train.runs.offline import OBJECTIVES, run_offline


def _config(tiny_task, out, *extra):
    return load_config(
        None,
        [
            "objective=dpo",
            f"output_dir={out}",
            f"model.path={tiny_task['model']}",
            f"data.train={tiny_task['pref_train']}",
            f"data.eval={tiny_task['pref_eval']}",
            "data.buckets=32",
            "data.max_length=64",
            "optim.lr=1e-3",
            "optim.warmup_steps=1",
            "train.batch_size=16",
            "train.log_every=1",
            "train.save_every=0",
            "dpo.beta=0.1",
            *extra,
        ],
    )


def _metrics(out):
    rows = [json.loads(line) for line in open(os.path.join(out, "metrics.jsonl"))]
    return [{k: v for k, v in r.items() if k != "time"} for r in rows]


def _live_bytes() -> int:
    return sum(x.nbytes for x in jax.live_arrays() if not x.is_deleted())


@pytest.mark.slow  # ~14 s: two DPO runs; precompute mode stays in the default suite (tests below, KTO)
def test_precomputed_reference_equals_live_reference(tiny_task, tmp_path):
    runs, live_bytes = {}, {}
    for name, flag in (("live", "false"), ("pre", "true")):
        out = tmp_path / name
        cfg = _config(
            tiny_task, out, "train.steps=4", "train.eval_every=2", f"dpo.precompute_ref_logps={flag}"
        )

        gc.collect()
        before = _live_bytes()

        def probe(model, name=name, before=before):  # called at each evaluation, with the run's arrays alive
            live_bytes[name] = _live_bytes() - before
            return {}

        result = run_offline(cfg, progress=False, model_eval_fn=probe)
        runs[name] = (_metrics(out), param_arrays(result.state), result.eval_metrics)
        del result
    (live_rows, live_params, live_eval), (pre_rows, pre_params, pre_eval) = runs["live"], runs["pre"]
    assert len(live_rows) == len(pre_rows) > 4  # 4 train rows + 2 evaluations
    for a, b in zip(live_rows, pre_rows, strict=True):
        assert a.keys() == b.keys()
        for key in a:
            np.testing.assert_allclose(
                b[key], a[key], rtol=1e-5, atol=1e-5, err_msg=f"step {a['step']} {key}"
            )
    # Step 1 is logged before any update (policy == reference, margin 0); later steps must differ from it.
    later_margins = [r["rewards/margins"] for r in pre_rows if "rewards/margins" in r and r["step"] > 1]
    assert later_margins and max(abs(m) for m in later_margins) > 1e-4
    for key in live_eval:
        np.testing.assert_allclose(pre_eval[key], live_eval[key], rtol=1e-5, atol=1e-5, err_msg=key)
    for a, b in zip(live_params, pre_params, strict=True):
        np.testing.assert_allclose(b, a, rtol=1e-5, atol=1e-6)
    # The live run keeps one more copy of the parameters on device (its reference) than the precomputed run.
    param_bytes = sum(p.nbytes for p in live_params)
    print("device bytes held at eval: live reference", live_bytes["live"], "precomputed", live_bytes["pre"])
    assert live_bytes["live"] - live_bytes["pre"] >= 0.9 * param_bytes, (live_bytes, param_bytes)


def test_precompute_mode_keeps_no_reference_parameters(tiny_task, tmp_path):
    from jrft.config import MeshConfig
    from jrft.train.placement import place_state
    from jrft.train.runs.setup import build_model, mesh_from_config, optimizer_from_config
    from jrft.train.state import create_train_state

    cases = (
        ("sigmoid", "true", False, True),
        ("sigmoid", "false", True, False),
        ("simpo", "true", False, False),
    )
    for loss, flag, holds_reference, attaches in cases:
        overrides = (f"dpo.loss_type={loss}", f"dpo.precompute_ref_logps={flag}")
        cfg = _config(tiny_task, tmp_path / flag, "train.steps=1", *overrides)
        mesh = mesh_from_config(MeshConfig(1, 1, 1))
        tx, _ = optimizer_from_config(cfg, total_steps=1)
        graphdef, state = create_train_state(build_model(cfg, mesh), tx, seed=0)
        state, _ = place_state(state, mesh)
        objective = OBJECTIVES["dpo"](cfg, graphdef, state)
        assert (objective.frozen is not None) == holds_reference
        assert (objective.attach is not None) == attaches  # simpo has no reference: nothing to precompute
        if holds_reference:  # a copy of the parameters, not the donated train-state buffers
            for ref, p in zip(jax.tree.leaves(objective.frozen), jax.tree.leaves(state.params), strict=True):
                assert ref is not p


@pytest.mark.slow  # ~16 s; resume is tested in the default suite by test_train_loop and test_train_ppo
def test_precomputed_reference_run_resumes_exactly(tiny_task, tmp_path):
    common = ("optim.schedule=constant", "optim.warmup_steps=0", "dpo.precompute_ref_logps=true")
    whole = run_offline(_config(tiny_task, tmp_path / "whole", "train.steps=6", *common), progress=False)
    out = tmp_path / "split"
    first = run_offline(_config(tiny_task, out, "train.steps=3", *common), progress=False)
    assert first.resumed_from is None
    second = run_offline(_config(tiny_task, out, "train.steps=6", *common), progress=False)
    assert second.resumed_from == 3
    for a, b in zip(param_arrays(whole.state), param_arrays(second.state), strict=True):
        np.testing.assert_array_equal(a, b)


def test_precomputed_values_travel_with_the_examples(tiny_task):
    """Every training batch (shuffled, any epoch) carries its own rows' reference values."""
    from transformers import AutoTokenizer

    from jrft.data import datasets_from_config, train_iterator_from_config

    cfg = _config(tiny_task, "unused", "dpo.precompute_ref_logps=true", "train.batch_size=8")
    train, _ = datasets_from_config(cfg, AutoTokenizer.from_pretrained(tiny_task["model"]))
    for i, ex in enumerate(train.examples):  # a value that identifies the example
        ex["ref_chosen_logps"], ex["ref_rejected_logps"] = float(i), float(-i)
    it = train_iterator_from_config(cfg, train, process_index=0, process_count=1)
    for _ in range(40):  # > one epoch of 256 / 8
        units = [u[0] for u in it.units(it.epoch)[it.offset : it.offset + 8]]
        batch = next(it)
        if len(units) < 8:
            continue  # a batch across the epoch boundary
        np.testing.assert_array_equal(batch["ref_chosen_logps"], np.asarray(units, np.float32))
        np.testing.assert_array_equal(batch["ref_rejected_logps"], -np.asarray(units, np.float32))
        for r, i in enumerate(units):
            n = len(train.examples[i]["chosen_tokens"])
            np.testing.assert_array_equal(batch["chosen_tokens"][r, :n], train.examples[i]["chosen_tokens"])


@pytest.mark.slow  # three CLI runs in subprocesses (~1 min)
def test_sigkill_then_rerun_with_precomputed_reference_equals_uninterrupted(tiny_task, tmp_path):
    """`jrft dpo` with precomputed reference log-probs, killed with SIGKILL after a checkpoint and restarted
    (which recomputes the reference pass from the same starting weights), ends with the weights of an
    uninterrupted run."""
    import signal
    import subprocess
    import sys
    import time

    import yaml
    from safetensors.numpy import load_file

    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}  # one device, like a user's run
    env["JAX_PLATFORMS"] = "cpu"

    def write(name):
        cfg = {
            "objective": "dpo",
            "output_dir": str(tmp_path / name),
            "model": {"path": tiny_task["model"]},
            "data": {"train": tiny_task["pref_train"], "buckets": 16, "max_length": 64},
            "optim": {"lr": 1e-3, "warmup_steps": 2},
            "train": {"steps": 60, "batch_size": 8, "log_every": 1, "save_every": 5, "keep_last": 2},
            "dpo": {"precompute_ref_logps": True},
        }
        path = tmp_path / f"{name}.yaml"
        path.write_text(yaml.safe_dump(cfg))
        return [sys.executable, "-m", "jrft.cli", "dpo", str(path), "--no-progress"]

    ref_cmd, run_cmd = write("ref"), write("run")
    subprocess.run(ref_cmd, env=env, check=True, timeout=600, capture_output=True)
    ckpts = tmp_path / "run" / "checkpoints"
    proc = subprocess.Popen(run_cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.time() + 300
        while time.time() < deadline and proc.poll() is None:
            if ckpts.exists() and any(p.isdigit() and int(p) >= 10 for p in os.listdir(ckpts)):
                break
            time.sleep(0.02)
        assert proc.poll() is None, "the run ended before it could be killed: " + proc.stderr.read().decode()
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.wait()
    assert not (tmp_path / "run" / "export").exists()
    done = subprocess.run(run_cmd, env=env, timeout=600, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "resumed from checkpoint at step" in done.stdout + done.stderr
    ref = load_file(str(tmp_path / "ref" / "export" / "model.safetensors"))
    run = load_file(str(tmp_path / "run" / "export" / "model.safetensors"))
    assert ref.keys() == run.keys()
    for name in ref:
        np.testing.assert_array_equal(ref[name], run[name], err_msg=name)
