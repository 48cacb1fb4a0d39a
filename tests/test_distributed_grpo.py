"""Multi-host GRPO on loopback: two processes (4 CPU devices each, a global data=2 x fsdp=4 mesh,
jax.distributed over 127.0.0.1) run the real ``jrft grpo`` entry point and give the same per-step loss and
reward curves as one process with 8 devices; checkpoints move between process counts and meshes; DAPO
dynamic sampling agrees across processes; PPO (reward model + reward functions) gives the one-process curves.

The GRPO equality test uses one two-process launch (process startup and compiles dominate), in this order:

1. one process, 8 devices, mesh (2, 4): 3 GRPO steps, checkpoints at steps 2 and 3; its final state is kept;
2. two processes via ``jrft.cli.main(["grpo", ...])`` (``initialize_distributed`` from ``JRFT_*`` variables),
   same config: 3 steps; then each worker restores the one-process checkpoint onto a (1, 8) mesh spanning
   both processes and compares it with the one-process final state;
3. back here: the curves agree (1e-5); the two-process checkpoint restores on a one-process 4-device mesh and
   equals the two-process run's final state exactly; resuming the two-process step-2 checkpoint in one
   process on a (1, 8) mesh gives the same step-3 loss as the uninterrupted two-process run.
"""

import json
import os
import shutil
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]
STEPS = 3

REWARDS = '''
def ones(completions, **kwargs):
    """Fraction of '1' characters: gives groups a reward spread."""
    return [c.count("1") / max(len(c), 1) for c in completions]
'''

CONFIG = """\
objective: grpo
seed: 0
model: {{path: {model}}}
data: {{train: {prompts}, format: prompt_only, buckets: 16}}
optim: {{lr: 3.0e-3, schedule: constant}}
train: {{steps: {steps}, batch_size: 4, log_every: 1, save_every: {save_every}}}
mesh: {{data: {data}, fsdp: {fsdp}, tensor: 1}}
grpo:
  num_generations: 4
  max_new_tokens: 8
  beta: 0.04
  scale_rewards: batch
  reward_functions: [{{spec: '{rewards}:{fn}', process: false}}]  # a thread: sees jax.process_index()
"""

WORKER = textwrap.dedent(
    """
    import json, os, sys
    sys.path.insert(0, os.path.join({repo!r}, "tests"))
    import numpy as np
    import jrft.train.runs as runs
    from jrft.cli import main

    config_path, out, p1_out, p1_saved, result_path = sys.argv[1:6]
    captured = {{}}
    run_grpo = runs.RUNNERS["grpo"]

    def capture(*args, **kwargs):  # the CLI's run, with its final state kept for the checks below
        captured["result"] = run_grpo(*args, **kwargs)
        return captured["result"]

    runs.RUNNERS["grpo"] = capture
    rc = main(["grpo", config_path, f"output_dir={{out}}", "--no-progress"])
    assert rc == 0, rc

    import jax
    from test_distributed_grpo import host_leaves, restore_state
    from jrft.config import load_config

    final = host_leaves(captured["result"].state)
    if jax.process_index() == 0:
        np.savez(os.path.join(out, "final_state.npz"), *final)
    # the one-process run's last checkpoint, restored onto a (1, 8) mesh over both processes
    config = load_config(config_path, ["objective=grpo", f"output_dir={{p1_out}}"])
    restored, shardings = restore_state(config, {STEPS}, data=1, fsdp=8)
    saved = np.load(p1_saved)
    got = host_leaves(restored)
    diffs = [float(np.max(np.abs(a.astype(np.float64) - saved[f"arr_{{i}}"]), initial=0.0))
             for i, a in enumerate(got)]
    leaves = jax.tree.leaves(restored)
    with open(result_path, "w") as f:
        json.dump({{
            "process_count": jax.process_count(), "devices": jax.device_count(),
            "p1_max_diff": max(diffs), "n_leaves": len(got), "n_saved": len(saved.files),
            "on_target": all(x.sharding == s for x, s in zip(leaves, jax.tree.leaves(shardings))),
            "spans_processes": any(not x.is_fully_addressable for x in leaves),
        }}, f)
    """
)


def host_leaves(state) -> list[np.ndarray]:
    """Every leaf of a train state as a full host array (gathered across processes where needed)."""
    import jax

    from jrft.parallel.distributed import host_array

    return [host_array(x) for x in jax.tree.leaves(state)]


def restore_state(config, step: int, *, data: int, fsdp: int):
    """The GRPO train state of ``config`` restored from its checkpoint ``step`` onto a ``(data, fsdp, 1)``
    mesh; returns ``(state, target shardings)``."""
    from jrft.config import MeshConfig
    from jrft.train.checkpoint import Checkpointer
    from jrft.train.runs.setup import mesh_from_config, setup_run

    run = setup_run(config, data=False, mesh=mesh_from_config(MeshConfig(data, fsdp, 1)))
    state, shardings = run.state, run.shardings
    checkpointer = Checkpointer(os.path.join(config.output_dir, "checkpoints"))
    try:
        restored, meta = checkpointer.restore(step, state)
    finally:
        checkpointer.close()
    assert meta["step"] == step
    return restored, shardings


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rows(out) -> list[dict]:
    return [json.loads(line) for line in open(os.path.join(out, "metrics.jsonl"))]


def _run_two_processes(tmp_path, make_cmd, timeout: float = 300, extra_env=None) -> None:
    """Starts ``make_cmd(pid)`` as processes 0 and 1 of a loopback job (4 CPU devices each, JRFT_* variables,
    as a launcher would set them; ``extra_env`` added) and waits for both to succeed."""
    port = _free_port()
    procs, logs = [], []
    try:
        for pid in range(2):
            env = {k: v for k, v in os.environ.items() if not k.startswith(("JRFT_", "SLURM_", "TPU_"))}
            env.update(
                XLA_FLAGS="--xla_force_host_platform_device_count=4",  # not conftest's 8
                JAX_PLATFORMS="cpu",
                PYTHONPATH=str(REPO),
                JRFT_COORDINATOR_ADDRESS=f"127.0.0.1:{port}",
                JRFT_NUM_PROCESSES="2",
                JRFT_PROCESS_ID=str(pid),
            )
            env.update(extra_env or {})
            logs.append(open(tmp_path / f"log{pid}.txt", "w"))
            procs.append(subprocess.Popen(make_cmd(pid), env=env, stdout=logs[-1], stderr=subprocess.STDOUT))
        deadline = time.monotonic() + timeout
        for p in procs:
            p.wait(timeout=max(1.0, deadline - time.monotonic()))
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()  # a hung peer must not outlive the test
                p.wait()
        for f in logs:
            f.close()
    output = "\n---\n".join((tmp_path / f"log{i}.txt").read_text()[-4000:] for i in range(len(procs)))
    assert [p.returncode for p in procs] == [0, 0], output


def _write_config(tmp_path, tiny_task, rewards, fn, *, steps, save_every, mesh=(2, 4), extra=""):
    """The run's YAML (``extra``: more ``grpo`` keys) with the reward function ``fn`` of ``rewards`` on a
    ``(data, fsdp)`` mesh."""
    (tmp_path / "rewards.py").write_text(rewards)
    path = tmp_path / "grpo.yaml"
    text = CONFIG.format(
        model=tiny_task["model"],
        prompts=tiny_task["prompts"],
        rewards=tmp_path / "rewards.py",
        fn=fn,
        steps=steps,
        save_every=save_every,
        data=mesh[0],
        fsdp=mesh[1],
    )
    path.write_text(text + extra)
    return path


# Process 1's first reward call gives every group the same reward (no signal); all later calls, and every
# call on process 0, give each group a spread. Each call is recorded per process.
UNEVEN_REWARDS = """
import os
import jax


def uneven(completions, **kwargs):
    pid = jax.process_index()
    log = os.path.join(os.path.dirname(__file__), f"calls{pid}.txt")
    first = not os.path.exists(log)
    with open(log, "a") as f:
        f.write(f"{len(completions)}\\n")
    if pid == 1 and first:
        return [0.5 for _ in completions]
    return [float(i % 2) for i in range(len(completions))]
"""


@pytest.mark.slow  # ~35 s; the default suite's 2-process check is test_distributed_loopback
def test_two_process_dynamic_sampling_agrees_on_rounds_and_groups(tiny_task, tmp_path):
    """DAPO dynamic sampling on 2 processes: process 0 has enough groups after round 1, process 1 none, so
    both must sample a second round (or the collectives would hang) and feed the update the same number of
    groups. Through the real CLI: rewards scored per process, one step, on a (1, 8) mesh whose fsdp axis
    spans both processes (parameters split across processes: placement, sampling, update and the export's
    collective gather)."""
    extra = "  dynamic_sampling: true\n  max_sampling_rounds: 3\n"
    config_path = _write_config(
        tmp_path, tiny_task, UNEVEN_REWARDS, "uneven", steps=1, save_every=0, mesh=(1, 8), extra=extra
    )
    out = tmp_path / "run"
    cli = [sys.executable, "-m", "jrft.cli", "grpo", str(config_path), f"output_dir={out}", "--no-progress"]
    _run_two_processes(tmp_path, lambda pid: cli)
    # 4 global prompts x 4 samples: each process scores its own 2 prompts (8 completions) per round
    for pid in range(2):
        assert (tmp_path / f"calls{pid}.txt").read_text().split() == ["8", "8"], pid
    (row,) = _rows(out)
    assert row["sampling_rounds"] == 2.0
    # kept groups: process 0 2 + 2, process 1 0 + 2, of 4 seen each; both then train on 2 groups
    assert row["kept_group_fraction"] == 6 / 8
    assert "skipped_update" not in row and np.isfinite(row["loss"])
    assert os.path.exists(out / "export" / "model.safetensors")


@pytest.mark.slow
def test_two_process_grpo_equals_one_process_and_checkpoints_move(tiny_task, tmp_path):
    from jrft.config import load_config
    from jrft.train.runs import run_config

    config_path = _write_config(tmp_path, tiny_task, REWARDS, "ones", steps=STEPS, save_every=2)

    def config(out, *extra):
        return load_config(config_path, ["objective=grpo", f"output_dir={out}", *extra])

    # 1. one process, 8 devices
    p1_out = tmp_path / "one_process"
    result = run_config(config(p1_out), progress=False)
    p1_saved = tmp_path / "one_process_state.npz"
    np.savez(p1_saved, *host_leaves(result.state))

    # 2. two processes through the CLI
    p2_out = tmp_path / "two_processes"
    script = tmp_path / "worker.py"
    script.write_text(WORKER.format(repo=str(REPO), STEPS=STEPS))
    args = [str(x) for x in (script, config_path, p2_out, p1_out, p1_saved)]
    _run_two_processes(tmp_path, lambda pid: [sys.executable, *args, str(tmp_path / f"result{pid}.json")])
    workers = [json.loads((tmp_path / f"result{pid}.json").read_text()) for pid in range(2)]

    # the curves
    one, two = _rows(p1_out), _rows(p2_out)
    assert [r["step"] for r in one] == [r["step"] for r in two] == list(range(1, STEPS + 1))
    for key in ("loss", "rewards/mean", "rewards/std", "kl_mean", "grad_norm", "completion_length"):
        a, b = [r[key] for r in one], [r[key] for r in two]
        np.testing.assert_allclose(b, a, rtol=1e-5, atol=1e-5, err_msg=key)
    assert len({r["rewards/mean"] for r in one}) > 1  # the runs really moved (not a constant curve)

    # a one-process checkpoint restores in the two-process run, onto a (1, 8) mesh spanning both processes
    for w in workers:
        assert (w["process_count"], w["devices"]) == (2, 8)
        assert w["n_leaves"] == w["n_saved"] and w["on_target"] and w["spans_processes"]
        assert w["p1_max_diff"] == 0.0

    # the two-process checkpoint restores in one process on a 4-device mesh, equal to its final state
    p2_final = np.load(p2_out / "final_state.npz")
    restored, shardings = restore_state(config(p2_out), STEPS, data=1, fsdp=4)
    import jax

    got = host_leaves(restored)
    assert len(got) == len(p2_final.files)
    for i, a in enumerate(got):
        np.testing.assert_array_equal(a, p2_final[f"arr_{i}"])
    pairs = zip(jax.tree.leaves(restored), jax.tree.leaves(shardings), strict=True)
    assert all(x.sharding == s for x, s in pairs)
    # and the two runs' final states agree (the same run, laid out differently): to 1e-4 only, since Adam
    # divides by sqrt(v): a gradient entry near zero turns a 1e-9 difference into up to lr (measured 1.3e-5)
    for a, b in zip(host_leaves(result.state), got, strict=True):
        np.testing.assert_allclose(b, a, rtol=1e-4, atol=1e-4)

    # resume: the two-process step-2 checkpoint continues in one process on another mesh, same step-3 loss
    resumed_out = tmp_path / "resumed"
    shutil.copytree(p2_out / "checkpoints" / "2", resumed_out / "checkpoints" / "2")
    resumed = run_config(config(resumed_out, "mesh.data=1", "mesh.fsdp=8"), progress=False)
    assert resumed.resumed_from == 2
    (row,) = [r for r in _rows(resumed_out) if "loss" in r]
    assert row["step"] == STEPS
    np.testing.assert_allclose(row["loss"], two[-1]["loss"], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(row["rewards/mean"], two[-1]["rewards/mean"], rtol=1e-5, atol=1e-5)


PPO_CONFIG = """\
objective: ppo
seed: 0
model: {{path: {model}}}
data: {{train: {prompts}, format: prompt_only, buckets: 16}}
optim: {{lr: 3.0e-3, schedule: constant, warmup_steps: 0}}
train: {{steps: 3, batch_size: 8, log_every: 1, save_every: 0}}
mesh: {{data: 2, fsdp: 4, tensor: 1}}
ppo:
  max_new_tokens: 8
  num_epochs: 2
  num_mini_batches: 2
  reward_model: {model}
  reward_functions: [{{spec: '{rewards}:ones'}}]
"""


@pytest.mark.slow
def test_two_process_ppo_equals_one_process(tiny_task, tmp_path):
    """PPO with a reward model (scored on the global batch, each process keeping its rows), a reward
    function (scored per process), a separate value model, a reference (KL) and 2 shuffled mini-batches:
    two processes give the one-process curves."""
    from jrft.config import load_config
    from jrft.train.runs import run_config

    (tmp_path / "rewards.py").write_text(REWARDS)
    config_path = tmp_path / "ppo.yaml"
    config_path.write_text(
        PPO_CONFIG.format(
            model=tiny_task["model"], prompts=tiny_task["prompts"], rewards=tmp_path / "rewards.py"
        )
    )
    one_out, two_out = tmp_path / "one_process", tmp_path / "two_processes"
    run_config(load_config(config_path, [f"output_dir={one_out}"]), progress=False)
    cli = [
        sys.executable,
        "-m",
        "jrft.cli",
        "ppo",
        str(config_path),
        f"output_dir={two_out}",
        "--no-progress",
    ]
    _run_two_processes(tmp_path, lambda pid: cli)
    one, two = _rows(one_out), _rows(two_out)
    assert [r["step"] for r in one] == [r["step"] for r in two] == [1, 2, 3]
    # the value head's outputs are ~1 in size: float32 layout differences reach ~1e-5 there (measured)
    keys = ("loss", "policy_loss", "value_loss", "score/mean", "rm_score/mean", "rewards/mean", "kl_mean")
    for key in keys:
        a, b = [r[key] for r in one], [r[key] for r in two]
        np.testing.assert_allclose(b, a, rtol=1e-4, atol=1e-5, err_msg=key)
    assert two[0]["rewards/frac_zero_std_groups"] == one[0]["rewards/frac_zero_std_groups"]
    assert os.path.exists(two_out / "export" / "model.safetensors")
