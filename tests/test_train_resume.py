"""Kill-and-resume at the level of the real command: `jrft sft` / `jrft grpo` killed with SIGKILL after a
checkpoint, restarted with the same command, must end with exactly the weights of an uninterrupted run."""

import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import yaml
from safetensors.numpy import load_file


def _write_config(path, tiny_task, objective, out, steps, save_every, lora_rank=0):
    cfg = {
        "objective": objective,
        "output_dir": str(out),
        "model": {"path": tiny_task["model"]},
        "data": {"buckets": 16, "max_length": 64},
        "optim": {"lr": 3e-3, "warmup_steps": 2},
        "train": {"steps": steps, "batch_size": 8, "log_every": 1, "save_every": save_every, "keep_last": 2},
    }
    if objective == "sft":
        cfg["data"]["train"] = tiny_task["sft_train"]
    else:
        cfg["data"].update(train=tiny_task["prompts"], format="prompt_only")
        cfg["train"]["batch_size"] = 2
        cfg["grpo"] = {
            "num_generations": 4,
            "max_new_tokens": 8,
            "reward_functions": [{"name": "accuracy"}, {"name": "format", "weight": 0.1}],
        }
    if lora_rank:  # checkpoints without the base: the rerun reloads it from model.path
        cfg["lora"] = {"rank": lora_rank, "alpha": 2 * lora_rank}
    path.write_text(yaml.safe_dump(cfg))
    return str(path)


def _env():
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}  # one device, like a user's run
    env["JAX_PLATFORMS"] = "cpu"
    return env


def _cmd(objective, config):
    return [sys.executable, "-m", "jrft.cli", objective, config, "--no-progress"]


def _checkpoints(out):
    d = out / "checkpoints"
    return [int(p) for p in os.listdir(d) if p.isdigit()] if d.exists() else []


def _kill_after_checkpoint(cmd, out, at_least):
    proc = subprocess.Popen(cmd, env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.time() + 240
    try:
        while time.time() < deadline and proc.poll() is None:
            if any(s >= at_least for s in _checkpoints(out)):
                break
            time.sleep(0.02)
        assert proc.poll() is None, (
            "the run ended before it could be killed: " + proc.stderr.read().decode()[-2000:]
        )
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.wait()
    assert not (out / "export").exists()


@pytest.mark.parametrize(
    "objective,steps,save_every,kill_at,lora_rank",
    [
        pytest.param("sft", 120, 10, 20, 0, marks=pytest.mark.slow),
        pytest.param("grpo", 12, 3, 3, 0, marks=pytest.mark.slow),
        pytest.param("sft", 60, 10, 20, 8, marks=pytest.mark.slow, id="sft-lora"),
    ],
)
def test_sigkill_then_rerun_equals_uninterrupted(
    tiny_task, tmp_path, objective, steps, save_every, kill_at, lora_rank
):
    ref_out, run_out = tmp_path / "ref", tmp_path / "run"
    args = (steps, save_every, lora_rank)
    ref_cfg = _write_config(tmp_path / "ref.yaml", tiny_task, objective, ref_out, *args)
    run_cfg = _write_config(tmp_path / "run.yaml", tiny_task, objective, run_out, *args)
    subprocess.run(_cmd(objective, ref_cfg), env=_env(), check=True, timeout=600, capture_output=True)
    _kill_after_checkpoint(_cmd(objective, run_cfg), run_out, kill_at)
    done = subprocess.run(_cmd(objective, run_cfg), env=_env(), timeout=600, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "resumed from checkpoint at step" in done.stdout + done.stderr
    ref = load_file(str(ref_out / "export" / "model.safetensors"))
    run = load_file(str(run_out / "export" / "model.safetensors"))
    assert ref.keys() == run.keys()
    for name in ref:
        np.testing.assert_array_equal(ref[name], run[name], err_msg=name)
    if lora_rank:
        ref = load_file(str(ref_out / "export" / "adapter" / "adapter_model.safetensors"))
        run = load_file(str(run_out / "export" / "adapter" / "adapter_model.safetensors"))
        for name in ref:
            np.testing.assert_array_equal(ref[name], run[name], err_msg=name)
