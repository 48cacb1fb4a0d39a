"""tpu/*.sh run for real against a fake `gcloud` that simulates a 2-worker TPU on this machine.

The fake keeps the TPU's state in a file, gives each worker a home directory, runs `tpu-vm ssh --command`
with bash in those homes (so the launcher's remote shell snippets really execute), copies `scp` files, and on
the install step unpacks the tarball and puts a fake `jrft` into the venv. The fake jrft records its
arguments and, on request, simulates a preemption (the queued resource turns SUSPENDED while it runs).
"""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
TPU = REPO / "tpu"

FAKE_GCLOUD = r"""
import json, os, shutil, signal, subprocess, sys, tarfile
from pathlib import Path

state = Path(os.environ["FAKE_TPU_STATE"])
args = sys.argv[1:]
with open(state / "calls.log", "a") as f:
    f.write(json.dumps(args) + "\n")
homes = [state / f"w{i}" for i in range(2)]
status_file = state / "state"
opts = dict(a.split("=", 1) for a in args if a.startswith("--") and "=" in a)
kind, verb = args[2], args[3]
selected = homes if opts.get("--worker", "all") == "all" else [homes[int(opts["--worker"])]]


def kill_runs():
    for h in homes:
        pid_file = h / "jrft" / "logs" / "jrft.log.pid"
        if pid_file.exists():
            try:
                os.killpg(int(pid_file.read_text()), signal.SIGKILL)
            except ProcessLookupError:
                pass


if verb == "describe":
    if not status_file.exists():
        sys.exit("ERROR: NOT_FOUND")
    print(status_file.read_text().strip())
elif verb == "create":
    if status_file.exists():
        sys.exit("ERROR: already exists")
    status_file.write_text("ACTIVE" if kind == "queued-resources" else "READY")
    for h in homes:
        h.mkdir()
elif verb == "delete":
    kill_runs()  # the VM and everything on it goes away
    for h in homes:
        shutil.rmtree(h, ignore_errors=True)
    status_file.unlink(missing_ok=True)
elif verb == "scp":
    for h in selected:
        shutil.copy(args[4], h / args[5].split(":", 1)[1])
elif verb == "ssh":
    command = opts["--command"]
    if "pip install" in command:  # the install step: unpack the source, and a fake jrft where pip puts it
        for h in selected:
            src = h / "jrft-src.tar.gz"
            if src.exists():
                with tarfile.open(src) as t:
                    t.extractall(h / "jrft", filter="data")
                src.unlink()
            bin_dir = h / "jrft" / ".venv" / "bin"
            bin_dir.mkdir(parents=True, exist_ok=True)
            shutil.copy(state / "fake_jrft.sh", bin_dir / "jrft")
        sys.exit(0)
    codes = [
        subprocess.run(["bash", "-c", command], cwd=h, env=dict(os.environ, HOME=str(h))).returncode
        for h in selected
    ]
    sys.exit(max(codes))
"""

FAKE_JRFT = r"""#!/usr/bin/env bash
me=$(basename "$HOME")
echo "$me JRFT_DISTRIBUTED=$JRFT_DISTRIBUTED $*" >> "$FAKE_TPU_STATE/jrft_calls.txt"
n=$(grep -c "^$me " "$FAKE_TPU_STATE/jrft_calls.txt")
echo "jrft on $me, launch $n"
if [ -f "$FAKE_TPU_STATE/fail" ]; then exit 3; fi
if [ "$n" = 1 ] && [ -f "$FAKE_TPU_STATE/preempt_first" ]; then
  if [ "$me" = w0 ]; then echo SUSPENDED > "$FAKE_TPU_STATE/state"; fi
  exec sleep 60
fi
if [ -f "$FAKE_TPU_STATE/hang" ]; then exec sleep 60; fi
echo "resumed from the latest checkpoint; done"
"""


@pytest.fixture
def cloud(tmp_path):
    state = tmp_path / "cloud"
    state.mkdir()
    (state / "gcloud.py").write_text(FAKE_GCLOUD)
    gcloud = state / "gcloud"
    gcloud.write_text(f'#!/bin/sh\nexec {sys.executable} {state / "gcloud.py"} "$@"\n')
    gcloud.chmod(0o755)
    (state / "fake_jrft.sh").write_text(FAKE_JRFT)
    (state / "fake_jrft.sh").chmod(0o755)
    yield state
    for pid_file in state.glob("w*/jrft/logs/jrft.log.pid"):  # never leave a fake run behind
        try:
            os.killpg(int(pid_file.read_text()), signal.SIGKILL)
        except (ProcessLookupError, ValueError):
            pass


def tpu(cloud: Path, script: str, *args: str, timeout: float = 60) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith("JRFT_")}
    env.update(JRFT_GCLOUD=str(cloud / "gcloud"), FAKE_TPU_STATE=str(cloud), TMPDIR=str(cloud))
    return subprocess.run(
        ["bash", str(TPU / script), *args], capture_output=True, text=True, env=env, timeout=timeout
    )


def verbs(cloud: Path) -> list[str]:
    """The gcloud calls that change something: no describes, no status polls (ssh to worker 0)."""
    calls = [json.loads(line) for line in (cloud / "calls.log").read_text().splitlines()]
    return [" ".join(c[2:4]) for c in calls if c[3] != "describe" and "--worker=0" not in c]


def wait_for(predicate, timeout: float = 20) -> None:
    end = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < end, "timed out"
        time.sleep(0.05)


TARGET = ["--name", "t1", "--accelerator", "v5e-16"]
COMMAND = ["--", "grpo", "configs/grpo.yaml", "output_dir=gs://bucket/run1"]


def test_run_with_resume_recreates_after_preemption(cloud):
    (cloud / "preempt_first").touch()
    proc = tpu(cloud, "run_with_resume.sh", *TARGET, "--queued", "--spot", "--poll", "0.2", *COMMAND)
    assert proc.returncode == 0, proc.stderr
    assert "preempted" in proc.stderr and "jrft exited 0 after 1 restart(s)" in proc.stderr
    assert verbs(cloud) == [
        "queued-resources create",
        "tpu-vm scp",  # install: the source tarball
        "tpu-vm ssh",  # install
        "tpu-vm ssh",  # launch
        "queued-resources delete",  # found SUSPENDED
        "queued-resources create",
        "tpu-vm scp",
        "tpu-vm ssh",
        "tpu-vm ssh",
    ]
    assert verbs(cloud).count("queued-resources create") == 2
    # The same command ran twice on both workers, with the TPU distributed mode set.
    line = "JRFT_DISTRIBUTED=tpu grpo configs/grpo.yaml output_dir=gs://bucket/run1"
    calls = (cloud / "jrft_calls.txt").read_text().splitlines()
    assert sorted(calls) == sorted([f"w0 {line}", f"w1 {line}"] * 2)
    for w in ("w0", "w1"):
        run_dir = cloud / w / "jrft"
        assert (run_dir / "logs/jrft.log.exit").read_text().strip() == "0"
        assert "resumed from the latest checkpoint" in (run_dir / "logs/jrft.log").read_text()
        # install shipped this checkout's tracked files, not the ignored venv
        assert (run_dir / "jrft/parallel/distributed.py").exists() and (run_dir / "tpu/common.sh").exists()
        assert not (run_dir / ".venv/bin/python").exists()


def test_run_with_resume_gives_up_on_repeated_failures(cloud):
    (cloud / "fail").touch()
    proc = tpu(cloud, "run_with_resume.sh", *TARGET, "--poll", "0.1", "--max-failures", "2", *COMMAND)
    assert proc.returncode == 2 and "failed 2 times in a row" in proc.stderr
    assert "run on worker 0: exited 3" in proc.stderr
    assert verbs(cloud).count("tpu-vm create") == 1  # a failing run on a live VM is relaunched, not recreated
    assert len((cloud / "jrft_calls.txt").read_text().splitlines()) == 4


def test_launch_status_stop_logs_lifecycle(cloud):
    base = ["--name", "t1", "--zone", "z"]
    assert tpu(cloud, "create.sh", *TARGET, "--wait", "--poll", "0.1").returncode == 0
    assert tpu(cloud, "install.sh", *base).returncode == 0
    (cloud / "hang").touch()
    proc = tpu(cloud, "launch.sh", *base, "--", "sft", "configs/sft.yaml", "lr=1e-4")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.count("launched on") == 2
    pid = int((cloud / "w0/jrft/logs/jrft.log.pid").read_text())
    wait_for(lambda: (cloud / "jrft_calls.txt").exists())
    status = tpu(cloud, "status.sh", *base)
    assert status.stdout.splitlines() == ["tpu: READY", "run: running"]
    again = tpu(cloud, "launch.sh", *base, "--", "sft", "configs/sft.yaml")
    assert again.returncode != 0 and "already running" in again.stderr
    skip = tpu(cloud, "launch.sh", *base, "--skip-if-running", "--", "sft", "x.yaml")
    assert skip.returncode == 0 and skip.stdout.count("not relaunched") == 2

    assert tpu(cloud, "stop.sh", *base).stdout.count("stopped on") == 2
    with pytest.raises(ProcessLookupError):
        os.killpg(pid, 0)

    (cloud / "hang").unlink()
    assert tpu(cloud, "launch.sh", *base, "--", "sft", "configs/sft.yaml").returncode == 0
    wait_for(lambda: (cloud / "w0/jrft/logs/jrft.log.exit").exists())
    assert tpu(cloud, "status.sh", *base).stdout.splitlines()[1] == "run: exited 0"
    logs = tpu(cloud, "logs.sh", *base, "--no-follow").stdout
    assert "jrft on w0, launch 2" in logs and "done" in logs
    assert tpu(cloud, "delete.sh", *base).returncode == 0
    assert tpu(cloud, "status.sh", *base).stdout.strip() == "tpu: missing"


def test_run_with_resume_bounded_when_the_tpu_never_becomes_ready(cloud):
    # A queued resource that always ends FAILED (e.g. no quota): recreated until --max-restarts, then stop.
    gcloud = (cloud / "gcloud.py").read_text()
    (cloud / "gcloud.py").write_text(
        gcloud.replace('status_file.write_text("ACTIVE" if', 'status_file.write_text("FAILED" if')
    )
    args = [*TARGET, "--queued", "--poll", "0.1", "--max-restarts", "2", *COMMAND]
    proc = tpu(cloud, "run_with_resume.sh", *args)
    assert proc.returncode == 2 and "gave up after 2 restarts" in proc.stderr
    assert verbs(cloud).count("queued-resources create") == 3
    assert not (cloud / "jrft_calls.txt").exists()
