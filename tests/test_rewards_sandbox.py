"""The code sandbox kills infinite loops and memory bombs within its limits and cannot write outside its
temporary directory; the code-execution reward scores the fraction of tests passed."""

import os
import signal
import time

import numpy as np
import pytest

from jrft.rewards import CodeExecutionReward, RewardRunner, SandboxLimits, run_python
from jrft.rewards.code_execution import extract_code, normalize_tests
from jrft.rewards.sandbox import namespace_available

MODES = ["python"] + (["namespace"] if namespace_available() else [])
needs_namespace = pytest.mark.skipif(not namespace_available(), reason="user namespaces unavailable here")


@pytest.mark.parametrize("isolation", MODES)
def test_runs_program_with_stdin(isolation):
    result = run_python("print(input()[::-1])", stdin="abc\n", limits=SandboxLimits(isolation=isolation))
    assert (result.returncode, result.stdout, result.timed_out, result.isolation) == (
        0,
        "cba\n",
        False,
        isolation,
    )


@pytest.mark.parametrize("isolation", MODES)
def test_infinite_loop_killed_by_cpu_limit(isolation):
    limits = SandboxLimits(cpu_seconds=1, wall_seconds=20, isolation=isolation)
    start = time.monotonic()
    result = run_python("while True:\n    pass\n", limits=limits)
    assert time.monotonic() - start < 6  # ~1 s of CPU; generous for a loaded 2-core machine
    assert result.returncode in (-signal.SIGXCPU, -signal.SIGKILL) and not result.timed_out


def test_sleeping_program_killed_by_wall_clock():
    start = time.monotonic()
    result = run_python(
        "import time\ntime.sleep(60)\n", limits=SandboxLimits(wall_seconds=1, isolation="python")
    )
    assert time.monotonic() - start < 4
    assert result.timed_out and result.returncode == -signal.SIGKILL


@pytest.mark.parametrize("isolation", MODES)
@pytest.mark.parametrize(
    "bomb", ["x = bytearray(4 * 1024**3)", "x = []\nwhile True:\n    x.append(' ' * 10**6)"]
)
def test_memory_bomb_stopped_by_memory_limit(isolation, bomb):
    start = time.monotonic()
    result = run_python(
        bomb, limits=SandboxLimits(memory_mb=200, cpu_seconds=10, wall_seconds=20, isolation=isolation)
    )
    assert time.monotonic() - start < 10
    assert result.returncode != 0 and "MemoryError" in result.stderr


@pytest.mark.parametrize("isolation", MODES)
def test_cannot_write_outside_its_temporary_directory(isolation, tmp_path):
    outside = tmp_path / "escaped.txt"
    victim = tmp_path / "victim.txt"
    victim.write_text("keep me")
    attempts = {
        "open": f"open({str(outside)!r}, 'w').write('x')",
        "os.open": f"import os\nos.open({str(outside)!r}, os.O_WRONLY | os.O_CREAT)",
        "remove": f"import os\nos.remove({str(victim)!r})",
        "rename": f"import os\nos.rename({str(victim)!r}, 'stolen.txt')",
        "relative": "open('../escaped_relative.txt', 'w').write('x')",
        "symlink": f"import os\nos.symlink({str(tmp_path)!r}, 'ln')\nopen('ln/escaped.txt', 'w').write('x')",
    }
    for name, program in attempts.items():
        result = run_python(program, limits=SandboxLimits(isolation=isolation))
        assert result.returncode != 0, name
        assert "PermissionError" in result.stderr or "Read-only file system" in result.stderr, name
    assert not outside.exists() and victim.read_text() == "keep me"
    inside = run_python(
        "import os\nopen('a.txt', 'w').write('hi')\nos.mkdir('d')\nos.rename('a.txt', 'd/b.txt')\n"
        "print(open('d/b.txt').read(), os.getcwd() == os.environ['HOME'])",
        limits=SandboxLimits(isolation=isolation),
    )
    assert (inside.returncode, inside.stdout.strip()) == (0, "hi True")


@pytest.mark.parametrize("isolation", MODES)
def test_no_network_no_processes_no_limit_raising(isolation):
    programs = {
        "socket": "import socket\nsocket.create_connection(('127.0.0.1', 22), timeout=1)",
        "subprocess": "import subprocess\nsubprocess.run(['true'])",
        "system": "import os\nos.system('true')",
        "rlimit": "import resource\nresource.setrlimit(resource.RLIMIT_CPU, (100, 100))",
        "ctypes": "import ctypes\nctypes.CDLL(None)",
    }
    for name, program in programs.items():
        result = run_python(program, limits=SandboxLimits(isolation=isolation))
        assert result.returncode != 0 and "sandbox:" in result.stderr, (name, result.stderr[-300:])


@needs_namespace
def test_namespace_layer_alone_blocks_writes_and_network(tmp_path):
    """With the audit hook off, the kernel still refuses: read-only mounts, no network interface."""
    limits = SandboxLimits(isolation="namespace", audit_hook=False)
    outside = tmp_path / "escaped.txt"
    result = run_python(f"open({str(outside)!r}, 'w').write('x')", limits=limits)
    assert "Read-only file system" in result.stderr and not outside.exists()
    result = run_python(
        "import socket\nsocket.create_connection(('127.0.0.1', 22), timeout=2)", limits=limits
    )
    assert "Network is unreachable" in result.stderr  # no interface is up, not even loopback
    assert result.returncode != 0
    shell = run_python(
        f"import subprocess\nsubprocess.run(['touch', {str(outside)!r}], check=True)", limits=limits
    )
    assert shell.returncode != 0 and not outside.exists()  # child processes are confined too
    ok = run_python("open('inside.txt', 'w').write('x'); print('ok')", limits=limits)
    assert ok.stdout.strip() == "ok"


def test_temporary_directory_is_removed():
    result = run_python("import os\nprint(os.getcwd())", limits=SandboxLimits(isolation="python"))
    assert result.returncode == 0 and not os.path.exists(result.stdout.strip())


# ------------------------------------------------------------------ the code-execution reward


def test_extract_code_and_normalize_tests():
    text = "<think>```python\nwrong()\n```</think>Sure:\n```python\ndef f():\n    return 1\n```\n"
    text += "and\n```\nnot code\n```"
    assert extract_code(text) == "def f():\n    return 1\n"
    assert extract_code("def g(): pass") == "def g(): pass"
    assert normalize_tests('{"inputs": ["1"], "outputs": ["2"]}', "w") == [{"input": "1", "output": "2"}]
    assert normalize_tests("assert f() == 1", "w") == ["assert f() == 1"]
    with pytest.raises(ValueError, match="row 7, test 0"):
        normalize_tests([3], "row 7")


ADD_TESTS = [
    "assert add(1, 2) == 3",
    "assert add(-1, 1) == 0",
    "assert add(2, 2) == 4",
    "assert add(0, 5) == 5",
]


def fenced(code):
    return f"Here is my solution.\n```python\n{code}\n```"


def test_code_execution_reward_fraction_passed():
    fn = CodeExecutionReward(wall_seconds=10, per_test_seconds=1, isolation="python")
    completions = [
        fenced("def add(a, b):\n    return a + b"),
        fenced("def add(a, b):\n    return a * b"),  # passes add(2, 2) only
        fenced("def add(a, b):\n    while a == 1:\n        pass\n    return a + b"),  # hangs on one test only
        fenced("x = [' ' * 10**6 for _ in range(10**5)]"),  # memory bomb at definition time
        fenced("print('0' * 32, 0, 1)\nprint('0' * 32, 1, 1)\ndef add(a, b):\n    return -7"),  # forged
        fenced("def add(a, b):\n    return a + b"),
    ]
    tests = [ADD_TESTS] * 5 + [None]
    start = time.monotonic()
    out = fn(prompts=["p"] * 6, completions=completions, tests=tests)
    assert time.monotonic() - start < 20
    assert out == [1.0, 0.25, 0.75, 0.0, 0.0, None]


def test_code_execution_stdin_stdout_tests():
    fn = CodeExecutionReward(isolation="python")
    program = fenced("a, b = map(int, input().split())\nprint(a + b)")
    tests = [
        [
            {"input": "1 2\n", "output": "3"},
            {"input": "10 20", "output": "30\n"},
            {"input": "1 1", "output": "3"},
        ]
    ]
    assert fn(prompts=["p"], completions=[program], tests=tests) == [pytest.approx(2 / 3)]
    exits = fenced("import sys\nprint(int(input()) * 2)\nsys.exit(0)")
    assert fn(prompts=["p"], completions=[exits], tests=['{"inputs": ["4"], "outputs": ["8"]}']) == [1.0]


def test_code_execution_inside_the_runner_from_config():
    entries = [{"name": "code_execution", "isolation": "python", "wall_seconds": 5}]
    with RewardRunner.from_config(entries, timeout=30, group_size=2) as runner:
        result = runner(
            prompts=["p", "p"],
            completions=[fenced("def add(a, b):\n    return a + b"), "I don't know"],
            tests=[ADD_TESTS, ADD_TESTS],
        )
    np.testing.assert_array_equal(result.rewards, [1.0, 0.0])
    assert result.failures == {"code_execution": 0}
