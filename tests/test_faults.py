"""Fault injection: what a hostile or clumsy user can do to a run, and what must hold (issue 19).

Sandbox escapes are tried in every isolation mode available here, with the audit hook on and off (the kernel
layers alone must hold); each attempt is bounded in time and touches only 127.0.0.1 and tmp dirs.
"""

import os
import socket
import time

import pytest

from jrft.rewards import CodeExecutionReward, SandboxLimits, run_python
from jrft.rewards import sandbox as sandbox_module
from jrft.rewards.sandbox import namespace_available, seccomp_available

MODES = ["python"] + (["namespace"] if namespace_available() else [])
needs_namespace = pytest.mark.skipif(not namespace_available(), reason="user namespaces unavailable here")
needs_seccomp = pytest.mark.skipif(not seccomp_available(), reason="seccomp filter unavailable here")

# Calls subprocess with the audit event silenced: the spawn goes through _posixsubprocess.fork_exec unaudited.
_UNAUDITED = (
    "import subprocess, sys\n"
    "class _Sys:\n"
    "    audit = staticmethod(lambda *args: None)\n"
    "    def __getattr__(self, name):\n"
    "        return getattr(sys, name)\n"
    "subprocess.sys = _Sys()\n"
)


def _escapes(command: str) -> dict[str, str]:
    """Programs that each try to run the shell ``command`` some way."""
    return {
        "fork_exec": _UNAUDITED + f"subprocess.run(['bash', '-c', {command!r}], timeout=3)",
        "posix_spawn": (
            f"import os\nos.waitpid(os.posix_spawn('/bin/bash', ['bash', '-c', {command!r}], {{}}), 0)"
        ),
        "execv": f"import os\nos.execv('/bin/bash', ['bash', '-c', {command!r}])",
        "ctypes": f"import ctypes\nraise SystemExit(ctypes.CDLL(None).system({command!r}.encode()) != 0)",
        "multiprocessing": (
            "import multiprocessing, os\n"
            f"p = multiprocessing.Process(target=os.system, args=({command!r},))\np.start()\np.join(3)"
        ),
        "double_fork_setsid": (
            "import os, time\n"
            "if os.fork() == 0:\n"
            "    os.setsid()\n"
            "    if os.fork() == 0:\n"
            f"        os.execv('/bin/bash', ['bash', '-c', {command!r}])\n"
            "    os._exit(0)\n"
            "time.sleep(1)\n"
        ),
        "fork_bomb": "import os\nfor _ in range(10000):\n    os.fork()\n",
    }


@pytest.fixture
def listener():
    server = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    server.bind(("127.0.0.1", 0))
    server.listen(8)
    server.settimeout(0.3)
    yield server
    server.close()


def _connected(server: socket.socket) -> bool:
    try:
        server.accept()[0].close()
    except TimeoutError:
        return False
    return True


@needs_seccomp
@pytest.mark.parametrize("audit_hook", [True, False])
@pytest.mark.parametrize("isolation", MODES)
def test_sandbox_spawn_escapes_fail(isolation, audit_hook, listener, tmp_path):
    """No way of starting a process works, so nothing reaches 127.0.0.1 or writes outside the sandbox."""
    outside = tmp_path / "escaped.txt"
    port = listener.getsockname()[1]
    command = f"echo x > {outside}; exec 3<>/dev/tcp/127.0.0.1/{port}; echo hi >&3; sleep infinity"
    limits = SandboxLimits(wall_seconds=4, isolation=isolation, audit_hook=audit_hook)
    for name, program in _escapes(command).items():
        start = time.monotonic()
        result = run_python(program, limits=limits)
        assert time.monotonic() - start < 4, name
        assert result.returncode != 0, (name, result.stderr[-300:])
        assert not outside.exists() and not _connected(listener), name


@pytest.mark.parametrize("isolation", MODES)
def test_sandbox_tcp_to_localhost_fails_without_the_audit_hook(isolation, listener):
    port = listener.getsockname()[1]
    program = f"import socket\nsocket.create_connection(('127.0.0.1', {port}), timeout=1)"
    result = run_python(program, limits=SandboxLimits(isolation=isolation, audit_hook=False))
    assert result.returncode != 0 and not _connected(listener)


def _marker_processes(marker: str) -> list[int]:
    found = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                if marker.encode() in f.read():
                    found.append(int(pid))
        except OSError:
            pass
    return found


@needs_namespace
@pytest.mark.parametrize("main_waits", [False, True])
def test_namespace_kills_every_descendant_and_never_waits_on_their_pipes(main_waits):
    """Without the seccomp filter (so the spawn succeeds): a double-forked, setsid grandchild that holds
    stdout open dies with the program, and the wall limit holds whatever the children do."""
    marker = f"1000.{os.getpid()}{int(main_waits)}"
    program = (
        "import os, time\n"
        "if os.fork() == 0:\n"
        "    os.setsid()\n"
        "    if os.fork() == 0:\n"
        f"        os.execv('/bin/sleep', ['sleep', '{marker}'])\n"
        "    os._exit(0)\n"
        "time.sleep(0.5)\n" + ("time.sleep(100)\n" if main_waits else "")
    )
    limits = SandboxLimits(wall_seconds=2, isolation="namespace", audit_hook=False)
    start = time.monotonic()
    result = sandbox_module._run(program, "", limits, "namespace", None)
    assert time.monotonic() - start < 5
    assert result.timed_out == main_waits
    time.sleep(0.2)
    assert _marker_processes(marker) == []


@pytest.mark.parametrize("isolation", MODES)
def test_sandbox_writes_through_proc_and_dir_fds_fail(isolation, tmp_path):
    outside = tmp_path / "escaped.txt"
    attempts = {
        "proc_root": f"open('/proc/self/root{outside}', 'w').write('x')",
        "proc_cwd": f"open('/proc/self/cwd/../../../../../..{outside}', 'w').write('x')",
        "dir_fd": (
            f"import os\nfd = os.open({str(tmp_path)!r}, os.O_RDONLY)\n"
            "os.write(os.open('escaped.txt', os.O_WRONLY | os.O_CREAT, dir_fd=fd), b'x')"
        ),
        "proc_fd": (
            f"import os\nfd = os.open({str(tmp_path)!r}, os.O_RDONLY)\n"
            "open(f'/proc/self/fd/{fd}/escaped.txt', 'w').write('x')"
        ),
    }
    for name, program in attempts.items():
        result = run_python(program, limits=SandboxLimits(isolation=isolation))
        assert result.returncode != 0, (name, result.stderr[-300:])
    assert not outside.exists()


@pytest.mark.parametrize("isolation", MODES)
def test_sandbox_file_size_limit(isolation):
    program = "open('big', 'wb').write(b'x' * (3 * 1024 * 1024))\nprint('wrote')"
    result = run_python(program, limits=SandboxLimits(file_mb=1, isolation=isolation))
    assert result.returncode != 0 and "wrote" not in result.stdout


def test_code_execution_refuses_the_weak_sandbox_unless_asked(monkeypatch):
    monkeypatch.setattr(sandbox_module, "namespace_available", lambda: False)
    with pytest.raises(ValueError, match="isolation: python"):
        CodeExecutionReward()
    assert CodeExecutionReward(isolation="python").isolation == "python"


# ------------------------------------------------------------------ reward functions from files


_HOSTILE_REWARDS = """
import ctypes, os

def fine(completions, **kwargs):
    return [1.0] * len(completions)

def exits(completions, **kwargs):
    os._exit(0)

def segfault(completions, **kwargs):
    ctypes.string_at(0)

def eats_memory(completions, **kwargs):
    hog = []
    while True:
        hog.append(bytearray(64 * 1024 * 1024))
"""


def test_reward_functions_from_files_cannot_take_the_trainer_down(tmp_path):
    from jrft.rewards import RewardRunner

    path = tmp_path / "hostile_rewards.py"
    path.write_text(_HOSTILE_REWARDS)
    entries = [f"{path}:{name}" for name in ("fine", "exits", "segfault", "eats_memory")]
    with RewardRunner.from_config(entries, timeout=20, worker_memory_mb=512) as runner:
        result = runner(prompts=["p", "p"], completions=["a", "b"])
        again = runner(prompts=["p"], completions=["c"])  # replaced workers serve the next batch
    assert result.failures == {"fine": 0, "exits": 2, "segfault": 2, "eats_memory": 2}
    assert "exit code 0" in result.errors["exits"]
    assert "SIGSEGV" in result.errors["segfault"]
    assert "MemoryError" in result.errors["eats_memory"]
    assert again.failures["fine"] == 0 and again.per_function["fine"][0] == 1.0


def test_reward_entries_default_to_processes_for_user_code_only(tmp_path):
    from jrft.rewards.registry import build_reward

    path = tmp_path / "r.py"
    path.write_text("def fine(completions, **kwargs):\n    return [1.0] * len(completions)\n")
    assert build_reward(f"{path}:fine").process is True
    assert build_reward({"name": f"{path}:fine", "process": False}).process is False
    assert build_reward("accuracy").process is False


def test_hung_thread_hint_names_the_config_key(caplog):
    import threading

    from jrft.rewards import RewardRunner

    release = threading.Event()

    def hangs(completions, **kwargs):
        release.wait(10)
        return [0.0] * len(completions)

    with RewardRunner([hangs], timeout=0.2) as runner:
        runner(prompts=["p"], completions=["a"])
    release.set()
    assert "'process: true'" in caplog.text and "processes=[...]" not in caplog.text


# ------------------------------------------------------------------ checkpoints of poisoned weights


class _Counter:
    def __init__(self):
        self.pos = 0

    def __next__(self):
        self.pos += 1
        return self.pos

    def state_dict(self):
        return {"pos": self.pos}

    def load_state_dict(self, s):
        self.pos = s["pos"]


def _blows_up_at(bad_step):
    """Finite loss and grad norm every step, but from ``bad_step`` on the update makes the params inf."""
    import jax.numpy as jnp

    def step(state, batch):
        x = state["params"] * (1e30 if batch >= bad_step else 1.0) * (1e30 if batch >= bad_step else 1.0) + 1
        return {"params": x, "opt": state["opt"] + 1, "count": state["count"] + 1}, {
            "loss": jnp.float32(1.0),
            "grad_norm": jnp.float32(2.0),
        }

    return step


def _poison_state():
    import jax.numpy as jnp

    return {"params": jnp.ones((4,)), "opt": jnp.zeros((4,)), "count": jnp.zeros((), jnp.int32)}


def test_poisoned_parameters_are_never_checkpointed(tmp_path):
    from jrft.train import Checkpointer, LoopOptions, NonFiniteError, train_loop

    ckpt = Checkpointer(tmp_path / "ck", keep_last=5)
    with pytest.raises(
        NonFiniteError, match="parameters or optimizer state.*Last good checkpoint: step 2 in"
    ):
        train_loop(
            _blows_up_at(3),
            _poison_state(),
            _Counter(),
            options=LoopOptions(total_steps=8, log_every=1, save_every=2),
            checkpointer=ckpt,
        )
    assert ckpt.all_steps() == [2]
    ckpt.close()


def test_poisoned_first_step_says_there_is_no_good_checkpoint(tmp_path):
    from jrft.train import Checkpointer, LoopOptions, NonFiniteError, train_loop

    ckpt = Checkpointer(tmp_path / "ck")
    with pytest.raises(NonFiniteError, match="No good checkpoint: none was saved") as err:
        train_loop(
            _blows_up_at(1),
            _poison_state(),
            _Counter(),
            options=LoopOptions(total_steps=2, log_every=1, save_every=1),
            checkpointer=ckpt,
        )
    assert "step None" not in str(err.value)
    assert ckpt.all_steps() == []
    ckpt.close()


def test_tree_all_finite_checks_float_leaves_only():
    import jax
    import jax.numpy as jnp

    from jrft.train.checkpoint import tree_all_finite

    tree = {"w": jnp.ones((3,), jnp.bfloat16), "n": jnp.int32(7), "key": jax.random.key(0), "py": 3}
    assert tree_all_finite(tree) and tree_all_finite({})
    assert not tree_all_finite({**tree, "m": jnp.array([0.0, jnp.nan])})
    assert not tree_all_finite({**tree, "w": jnp.full((3,), jnp.inf, jnp.bfloat16)})


# ------------------------------------------------------------------ one run per output_dir


def test_second_run_on_a_locked_directory_is_refused_naming_the_holder(tmp_path):
    import json
    import socket as socket_module

    from jrft.train.lock import LOCK_NAME, RunLock, RunLockedError

    first = RunLock(tmp_path / "run")
    first.acquire()
    with pytest.raises(RunLockedError, match=rf"pid {os.getpid()} on host {socket_module.gethostname()}"):
        RunLock(tmp_path / "run").acquire()
    info = json.loads((tmp_path / "run" / LOCK_NAME).read_text())
    assert info["pid"] == os.getpid()
    first.release()
    assert not (tmp_path / "run" / LOCK_NAME).exists()
    with RunLock(tmp_path / "run"):  # free again
        pass


def test_stale_locks_are_taken_over_and_other_hosts_are_not(tmp_path, caplog):
    import json
    import socket as socket_module
    import subprocess
    import sys

    from jrft.train.lock import LOCK_NAME, RunLock, RunLockedError

    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    lock_file = tmp_path / LOCK_NAME
    host = socket_module.gethostname()
    # A dead pid, and a live pid that does not hold the flock (a reused pid): both stale.
    for pid in (dead.pid, os.getpid()):
        lock_file.write_text(json.dumps({"pid": pid, "host": host, "started": 0.0}))
        with RunLock(tmp_path):
            assert json.loads(lock_file.read_text())["pid"] == os.getpid()
        assert "stale lock" in caplog.text
    lock_file.write_text(json.dumps({"pid": 1, "host": "elsewhere", "started": 0.0}))
    with pytest.raises(RunLockedError, match=f"pid 1 on host elsewhere.*delete {lock_file}"):
        RunLock(tmp_path).acquire()


def test_jrft_train_exits_2_when_the_output_dir_is_locked(tmp_path, capsys):
    from jrft.commands.train import run
    from jrft.train.lock import RunLock

    config = tmp_path / "c.yaml"
    config.write_text(f"output_dir: {tmp_path / 'run'}\nmodel: {{path: /models/a}}\n")
    with RunLock(tmp_path / "run"):
        assert run("sft", [str(config), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "is in use by another run" in err and f"pid {os.getpid()}" in err


# ------------------------------------------------------------------ config drift on resume


def _fake_run_with_checkpoint(out, overrides=()):
    import jax.numpy as jnp

    from jrft.config import load_config
    from jrft.train import Checkpointer

    config = load_config(None, ["objective=sft", f"output_dir={out}", "model.path=/models/a", *overrides])
    ckpt = Checkpointer(out / "checkpoints")
    ckpt.save(3, {"x": jnp.zeros(())}, {"step": 3, "config": config.to_dict()})
    ckpt.close()
    return config


def test_resume_refuses_a_changed_model_and_logs_changed_hyperparameters(tmp_path, capsys):
    import dataclasses
    import json

    from jrft.config import load_config
    from jrft.train.runs.resume import ConfigDriftError, check_resume

    out = tmp_path / "run"
    _fake_run_with_checkpoint(out, ["optim.lr=1e-4"])
    same = load_config(None, ["objective=sft", f"output_dir={out}", "model.path=/models/a", "optim.lr=1e-4"])
    assert check_resume(same) == {}
    lr = load_config(None, ["objective=sft", f"output_dir={out}", "model.path=/models/a", "optim.lr=2e-4"])
    assert check_resume(lr) == {"optim.lr": (1e-4, 2e-4)}
    assert "optim.lr: 0.0001 -> 0.0002" in capsys.readouterr().out
    record = json.loads((out / "metrics.jsonl").read_text().splitlines()[-1])
    assert record == {"step": 3, "config_changes": {"optim.lr": {"old": 1e-4, "new": 2e-4}}}
    other = dataclasses.replace(lr, model=dataclasses.replace(lr.model, path="/models/b"))
    with pytest.raises(ConfigDriftError, match=r"model\.path: '/models/a' -> '/models/b'.*--allow-config"):
        check_resume(other)
    assert set(check_resume(other, allow_changes=True)) == {"model.path", "optim.lr"}
    fresh = dataclasses.replace(other, output_dir=str(tmp_path / "fresh"))
    assert check_resume(fresh) == {}


def test_jrft_train_exits_2_on_config_drift(tmp_path, capsys):
    from jrft.commands.train import run

    out = tmp_path / "run"
    _fake_run_with_checkpoint(out)
    config = tmp_path / "c.yaml"
    config.write_text(f"output_dir: {out}\nmodel: {{path: /models/a}}\n")
    assert run("sft", [str(config), "data.train=other.jsonl"]) == 2
    err = capsys.readouterr().err
    assert "data.train.path: None -> 'other.jsonl'" in err and not (out / ".jrft.lock").exists()


# ------------------------------------------------------------------ hostile safetensors


def _tiny_model(tmp_path, **kwargs):
    from jrft.models.testing import save_tiny_hf_model

    save_tiny_hf_model("llama", tmp_path, seed=0, **kwargs)
    return tmp_path


@pytest.mark.parametrize(
    "payload",
    [
        os.urandom(4096),  # random bytes: a header length of ~2**63
        (2**40).to_bytes(8, "little") + b"{}",  # a length beyond the file
        (2).to_bytes(8, "little") + b"[]",  # a header that is not an object
        b'\x2a\x00\x00\x00\x00\x00\x00\x00{"w": {"dtype": "F32", "shape": [-1], "x": 1}}',
        b'\x3e\x00\x00\x00\x00\x00\x00\x00{"w":{"dtype":"F32","shape":[2],"data_offsets":[0,99999999]}}',
    ],
)
def test_malformed_safetensors_names_the_file(tmp_path, payload):
    from jrft.models import CheckpointError, from_pretrained
    from jrft.models.pretrained import SINGLE_FILE

    model = _tiny_model(tmp_path)
    (model / SINGLE_FILE).write_bytes(payload)
    with pytest.raises(CheckpointError, match=r"model\.safetensors: not a safetensors file"):
        from_pretrained(model)


@pytest.mark.parametrize(
    "shard", ["../../../../../../../../etc/passwd", "/etc/passwd", "sub/../../outside.safetensors"]
)
def test_index_shard_outside_the_model_directory_is_refused(tmp_path, shard):
    import json

    from jrft.models import CheckpointError, from_pretrained
    from jrft.models.pretrained import INDEX_FILE

    model = _tiny_model(tmp_path / "m", max_shard_size="20KB")
    index = json.loads((model / INDEX_FILE).read_text())
    first = next(iter(index["weight_map"]))
    index["weight_map"][first] = shard
    (model / INDEX_FILE).write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match=rf"{INDEX_FILE}: shard .* lies outside the model directory"):
        from_pretrained(model)


def test_malformed_index_names_the_file(tmp_path):
    from jrft.models import CheckpointError, from_pretrained
    from jrft.models.pretrained import INDEX_FILE

    model = _tiny_model(tmp_path, max_shard_size="20KB")
    for text, message in [
        ("{not json", "not a valid safetensors index"),
        ('{"weight_map": [1]}', "'weight_map' must map"),
        ("[1]", "not a valid"),
    ]:
        (model / INDEX_FILE).write_text(text)
        with pytest.raises(CheckpointError, match=rf"{INDEX_FILE}: {message}"):
            from_pretrained(model)


# ------------------------------------------------------------------ user-facing errors


def test_cli_flags_anywhere_one_line_errors_and_debug(tmp_path, capsys):
    from jrft.commands.train import run
    from jrft.config import ConfigError

    config = tmp_path / "c.yaml"
    config.write_text(f"output_dir: {tmp_path / 'run'}\n")  # no model section
    assert run("sft", [str(config), "train.steps=1", "--no-progress", "optim.lr=1e-4"]) == 2
    err = capsys.readouterr().err
    assert "model.path: no model given" in err and "Traceback" not in err and len(err.splitlines()) == 1
    with pytest.raises(ConfigError, match="model.path"):
        run("sft", [str(config), "--debug", "train.steps=1"])


def test_empty_model_path_is_named():
    from jrft.models import from_pretrained

    with pytest.raises(FileNotFoundError, match="model.path is empty"):
        from_pretrained("")


@pytest.mark.parametrize("suffix", [".jsonl", ".json"])
def test_non_utf8_data_names_file_and_line(tmp_path, suffix):
    from jrft.data.errors import DataError
    from jrft.data.sources import _read_json, _read_jsonl

    path = tmp_path / f"bad{suffix}"
    good = b'{"prompt": "a", "completion": "b"}'
    bad = b'{"prompt": "\xff", "completion": "b"}'
    path.write_bytes(good + b"\n" + bad + b"\n" if suffix == ".jsonl" else b"[" + good + b",\n" + bad + b"]")
    reader = _read_jsonl if suffix == ".jsonl" else _read_json
    with pytest.raises(DataError, match=rf"bad\{suffix}.*(line 2 is not UTF-8|not UTF-8 .*on line 2)"):
        reader(str(path))


def test_metrics_jsonl_is_strict_json_and_a_resume_logs_no_step_twice(tmp_path):
    """NaN/inf metrics are written as null (json.loads with no NaN extension reads every line), and the
    records after the resumed checkpoint's step are dropped before the run logs those steps again."""
    import json
    import math

    from jrft.train.metrics import MetricsLogger

    logger = MetricsLogger(tmp_path, total_steps=5, tensorboard=False, progress=False)
    for step in range(1, 6):
        logger.log(step, {"loss": float(step), "kl": math.nan if step == 2 else 0.5, "r": math.inf})
    assert logger.drop_after(3) == 2
    logger.log(4, {"loss": 4.0})
    logger.close()

    def strict(text):
        return json.loads(text, parse_constant=lambda name: pytest.fail(f"non-strict JSON {name}"))

    rows = [strict(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    assert rows[1]["kl"] is None and rows[0]["r"] is None and rows[0]["loss"] == 1.0


def test_jrft_export_errors_are_one_line_and_debug_shows_the_traceback(tmp_path, capsys):
    from jrft.commands.export import main as export_main

    missing = str(tmp_path / "no-such-run")
    assert export_main([missing, str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("jrft export: ") and len(err.splitlines()) == 1 and "Traceback" not in err
    with pytest.raises(Exception):  # noqa: B017 (whatever the cause, --debug re-raises it)
        export_main([missing, str(tmp_path / "out"), "--debug"])
