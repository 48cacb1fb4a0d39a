"""Code execution reward: the fraction of a row's tests that the completion's program passes (sandboxed).

The program is the last fenced code block of the completion (```` ```python … ``` ````, else any fence, else
the whole text outside ``<think>``). A row's tests (the ``tests_column``) may be:

- assertion snippets: a list of strings such as ``"assert add(1, 2) == 3"``, run after the program (with
  ``__name__ == "__candidate__"``, so its ``if __name__ == "__main__":`` block does not run), sharing one
  namespace;
- stdin/stdout cases: a list of ``{"input": str, "output": str}``, or ``{"inputs": [...], "outputs": [...]}``
  (APPS style); the program runs as ``__main__`` once per case with that stdin, and passes when its output
  equals the expected one up to whitespace;
- any of the above as a JSON string.

All tests of one completion run in one sandboxed process (see :mod:`jrft.rewards.sandbox` for the limits);
each test also has its own alarm (``per_test_seconds``), so one infinite loop fails that test only. A process
killed by a limit keeps the tests it had passed before. Results come back on stdout tagged with a random
nonce so program output cannot pass for a result by accident; a program that deliberately introspects the
harness could forge them, so treat this as an evaluator, not an adversarial boundary.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import json
import re
import secrets
from collections.abc import Sequence
from typing import Any

from jrft.rewards import sandbox
from jrft.rewards.extract import strip_think
from jrft.rewards.protocol import column, completion_text
from jrft.rewards.sandbox import SandboxLimits, run_python

_FENCE_RE = re.compile(r"```[ \t]*([\w+-]*)[ \t]*\n(.*?)```", re.DOTALL)

_HARNESS = r"""
import contextlib, io, json, signal, sys
_code, _tests, _nonce, _per_test = json.loads(__PAYLOAD__)
_out = sys.stdout
def _report(i, ok):
    _out.write(f"{_nonce} {i} {int(ok)}\n")
    _out.flush()
def _alarm(signum, frame):
    raise TimeoutError("test took too long")
signal.signal(signal.SIGALRM, _alarm)
def _limited(fn):
    signal.setitimer(signal.ITIMER_REAL, _per_test)
    try:
        return fn()
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
def _exec(source, namespace, name):
    with contextlib.redirect_stdout(io.StringIO()) as buf:
        try:
            _limited(lambda: exec(compile(source, name, "exec"), namespace))
        except SystemExit as e:
            if e.code not in (None, 0):
                raise
    return buf.getvalue()
_namespace = None
for _i, _test in enumerate(_tests):
    _ok = False
    try:
        if isinstance(_test, str):
            if _namespace is None:
                _namespace = {"__name__": "__candidate__"}
                try:
                    _exec(_code, _namespace, "<program>")
                except BaseException:
                    _namespace = False
            if _namespace is not False:
                _exec(_test, _namespace, f"<test {_i}>")
                _ok = True
        else:
            sys.stdin = io.StringIO(_test["input"])
            _printed = _exec(_code, {"__name__": "__main__"}, "<program>")
            _ok = _printed.split() == str(_test["output"]).split()
    except BaseException:
        _ok = False
    _report(_i, _ok)
"""


def extract_code(text: str) -> str:
    """The program in a completion: last ```python fence, else the last fence, else the text itself."""
    text = strip_think(text)
    fences = _FENCE_RE.findall(text)
    python = [body for lang, body in fences if lang.lower() in ("python", "py", "python3")]
    if python:
        return python[-1]
    if fences:
        return fences[-1][1]
    return text.strip()


def normalize_tests(raw: Any, where: str) -> list[str | dict[str, str]]:
    """A row's tests as assertion strings and ``{"input", "output"}`` dicts (see the module docstring)."""
    if isinstance(raw, str):
        stripped = raw.strip()
        raw = json.loads(stripped) if stripped[:1] in "[{" else [raw]
    if isinstance(raw, dict) and "inputs" in raw:
        if len(raw["inputs"]) != len(raw.get("outputs", [])):
            raise ValueError(f"{where}: 'inputs' and 'outputs' have different lengths")
        raw = [{"input": i, "output": o} for i, o in zip(raw["inputs"], raw["outputs"], strict=True)]
    tests: list[str | dict[str, str]] = []
    for k, test in enumerate(raw):
        if isinstance(test, str):
            tests.append(test)
        elif isinstance(test, dict) and "input" in test and "output" in test:
            tests.append({"input": str(test["input"]), "output": str(test["output"])})
        else:
            raise ValueError(
                f"{where}, test {k}: expected an assertion string or an {{input, output}} dict, got {test!r}"
            )
    return tests


def run_tests(
    code: str, tests: Sequence[str | dict[str, str]], limits: SandboxLimits, per_test_seconds: float
) -> float:
    """Fraction of ``tests`` that ``code`` passes, in one sandboxed process."""
    nonce = secrets.token_hex(16)
    payload = json.dumps([code, list(tests), nonce, per_test_seconds])
    result = run_python(_HARNESS.replace("__PAYLOAD__", repr(payload)), limits=limits)
    passed = set()
    for line in result.stdout.splitlines():
        parts = line.split()
        if len(parts) == 3 and parts[0] == nonce and parts[2] == "1":
            passed.add(int(parts[1]))
    return len(passed) / len(tests)


@dataclasses.dataclass(frozen=True)
class CodeExecutionReward:
    """Fraction of tests passed (``[0, 1]``) per completion; ``None`` for rows without tests.

    Attributes:
      tests_column: dataset column with each row's tests.
      cpu_seconds, wall_seconds, memory_mb: sandbox limits for one completion's whole test run.
      per_test_seconds: alarm per test (default: ``wall_seconds``).
      isolation: sandbox isolation mode (``"auto"``, ``"namespace"``, ``"python"``). ``"auto"`` refuses to
        start where user namespaces do not work: the Python-only sandbox is weaker (writes are confined by
        an audit hook, not the kernel), so running untrusted programs in it must be asked for by name.
      max_parallel: completions run at once. A batch takes about ``ceil(N / max_parallel) * wall_seconds``
        at worst: give the runner a timeout to match.
    """

    tests_column: str = "tests"
    cpu_seconds: float = 5.0
    wall_seconds: float = 10.0
    memory_mb: int = 512
    per_test_seconds: float | None = None
    isolation: str = "auto"
    max_parallel: int = 2
    name: str = "code_execution"

    def limits(self) -> SandboxLimits:
        return SandboxLimits(
            cpu_seconds=self.cpu_seconds,
            wall_seconds=self.wall_seconds,
            memory_mb=self.memory_mb,
            isolation=self.isolation,
        )

    def __post_init__(self) -> None:
        self.limits()  # validates the limits now, not on the first batch
        if self.isolation == "auto" and not sandbox.namespace_available():
            raise ValueError(
                f"{self.name}: user namespaces do not work on this machine (unshare --user --mount --net "
                "--pid fails), so only the weaker Python-level sandbox is available: an audit hook, not the "
                "kernel, keeps the untrusted programs from writing outside their directory. Set "
                "'isolation: python' to accept that, or allow unprivileged user namespaces (e.g. sysctl "
                "kernel.apparmor_restrict_unprivileged_userns=0) for the kernel-enforced sandbox"
            )
        if self.max_parallel < 1:
            raise ValueError(f"code_execution.max_parallel must be >= 1, got {self.max_parallel}")

    def __call__(self, *, completions: Sequence[Any], **columns: Any) -> list[float | None]:
        rows = column(columns, self.tests_column, self.name)
        limits, per_test = self.limits(), self.per_test_seconds or self.wall_seconds
        jobs: dict[int, tuple[str, list]] = {}
        for row, (completion, raw) in enumerate(zip(completions, rows, strict=True)):
            tests = (
                []
                if raw is None
                else normalize_tests(raw, f"{self.name}: column {self.tests_column!r}, row {row}")
            )
            if tests:
                jobs[row] = (extract_code(completion_text(completion)), tests)
        out: list[float | None] = [None] * len(completions)
        with concurrent.futures.ThreadPoolExecutor(self.max_parallel) as pool:
            futures = {
                row: pool.submit(run_tests, code, tests, limits, per_test)
                for row, (code, tests) in jobs.items()
            }
            for row, future in futures.items():
                out[row] = future.result()
        return out
