"""Tools the model may call: loading, JSON schemas, and running calls on the host, isolated and timed out.

A tool is a plain Python function with type hints and a Google-style docstring (TRL's convention); its JSON
schema comes from transformers' ``get_json_schema`` and is given to the chat template as ``tools=``. Tools
are named in a config as ``{spec: my_tools.py:fn}`` (or ``module:fn``) or as a built-in ``{name: python}``
(:data:`BUILTIN_TOOLS`).

Every call runs in a worker process of the reward runner's :class:`~jrft.rewards.workers.WorkerPool`: a call
that passes ``timeout`` seconds has its worker killed and replaced, a crash or ``os._exit`` only costs the
worker. A call that fails in any way (unknown tool, bad arguments, exception, timeout, crash) returns an
error message for the model (``"Error: ..."``) and is counted in :attr:`ToolBox.failures`; nothing stops
the run.
"""

from __future__ import annotations

import concurrent.futures
import functools
import json
import threading
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from jrft.agentic.parsing import ToolCall
from jrft.rewards.loading import load_object
from jrft.rewards.sandbox import SandboxLimits, run_python
from jrft.rewards.workers import WorkerCrashed, WorkerPool, WorkerTimeout, function_payload

MAX_RESULT_CHARS = 2000  # a tool's text result is cut here (the token budget is the real limit)


def python(code: str) -> str:
    """Runs a Python program in a sandbox (no network, no writes outside a temporary directory, 5 s) and
    returns what it printed.

    Args:
        code: The Python source to run; print() the values you need.
    """
    result = run_python(code, limits=SandboxLimits(cpu_seconds=5, wall_seconds=5, memory_mb=512))
    if result.timed_out:
        return "Error: the program ran past 5 s and was killed"
    if result.returncode != 0:
        tail = result.stderr.strip().splitlines()[-1:] or [f"exit code {result.returncode}"]
        return (result.stdout + "\nError: " + tail[0]).strip()
    return result.stdout.strip()


BUILTIN_TOOLS: dict[str, Callable[..., Any]] = {"python": python}


def load_tool(entry: str | Callable[..., Any] | Mapping[str, Any]) -> tuple[Callable[..., Any], Any]:
    """``(function, what a worker loads it from)`` for a config entry: ``{"name": builtin}``,
    ``{"spec": "file.py:fn"}``, a spec string, a built-in's name or a function (module-level: it is pickled
    by reference)."""
    if isinstance(entry, Mapping):
        if (entry.get("name") is None) == (entry.get("spec") is None):
            raise ValueError(f"tool entry {dict(entry)}: give exactly one of 'name' or 'spec'")
        entry = entry.get("name") or entry["spec"]
    if callable(entry):
        return entry, entry
    if entry in BUILTIN_TOOLS:
        return BUILTIN_TOOLS[entry], BUILTIN_TOOLS[entry]
    if ":" not in entry:
        raise ValueError(f"unknown tool {entry!r}; built-in: {sorted(BUILTIN_TOOLS)} or a file.py:fn spec")
    fn, canonical = load_object(entry)
    if not callable(fn):
        raise ValueError(f"tool {entry!r} is not callable")
    return fn, canonical


def tool_schema(fn: Callable[..., Any]) -> dict[str, Any]:
    """The function's JSON schema (transformers' ``get_json_schema``: type hints + Google docstring)."""
    from transformers.utils import get_json_schema

    try:
        return get_json_schema(fn)
    except Exception as err:  # the message names what is missing (a hint, an argument's description)
        raise ValueError(f"tool {getattr(fn, '__name__', fn)!r}: no JSON schema ({err})") from err


@functools.lru_cache(maxsize=64)
def _loaded(spec: str) -> Callable[..., Any]:
    return load_object(spec)[0]


def invoke(target: Any, arguments: Mapping[str, Any]) -> list[str]:
    """Runs in the worker: the tool (a function or its spec) on ``arguments``, its result as text in a
    one-element list (the worker protocol returns lists)."""
    fn = _loaded(target) if isinstance(target, str) else target
    result = fn(**arguments)
    text = result if isinstance(result, str) else json.dumps(result, default=str)
    return [text[:MAX_RESULT_CHARS]]


class ToolBox:
    """Named tools, their schemas, and a pool of ``workers`` processes that runs their calls.

    Args:
      entries: tool config entries (see :func:`load_tool`).
      timeout: seconds one call may take (its worker is then killed and replaced).
      workers: worker processes (calls of one turn run in parallel over them).
    """

    def __init__(self, entries: Sequence[Any], *, timeout: float = 10.0, workers: int = 2):
        loaded = [load_tool(e) for e in entries]
        self.functions = {fn.__name__: fn for fn, _ in loaded}
        if len(self.functions) != len(loaded):
            raise ValueError(f"tools: two tools share a name ({[fn.__name__ for fn, _ in loaded]})")
        self.schemas = [tool_schema(fn) for fn, _ in loaded]
        self.payloads = {
            fn.__name__: function_payload(functools.partial(invoke, target), fn.__name__)
            for fn, target in loaded
        }
        self.timeout = float(timeout)
        self.workers = max(1, int(workers))
        self._pool: WorkerPool | None = None
        self._lock = threading.Lock()
        self.calls, self.failures = 0, 0
        self.last_error: str | None = None

    def _ensure_pool(self) -> WorkerPool:
        if self._pool is None:
            self._pool = WorkerPool(self.workers)
            self._pool.wait_ready(60.0)
        return self._pool

    def call(self, call: ToolCall, slot: int = 0) -> tuple[str, bool]:
        """``(result text, ok)`` of one call; never raises."""
        if call.error is not None:
            return f"Error: {call.error}", False
        if call.name not in self.payloads:
            return f"Error: unknown tool {call.name!r}; tools: {sorted(self.payloads)}", False
        try:
            status, value = self._ensure_pool().call(
                self.payloads[call.name], {"arguments": call.arguments}, self.timeout, slot
            )
        except WorkerTimeout:
            return f"Error: tool {call.name!r} gave no result within {self.timeout:g} s", False
        except WorkerCrashed as err:
            return f"Error: tool {call.name!r} crashed ({err})", False
        if status != "ok":
            return f"Error: {value[0]}", False
        texts, _logs = value  # the worker protocol: (results, what logging hooks collected)
        return str(texts[0]), True

    def run(self, calls: Sequence[ToolCall]) -> list[tuple[str, bool]]:
        """Results of ``calls`` in order, spread over the workers; failures are counted."""
        if not calls:
            return []
        self._ensure_pool()
        results: list[tuple[str, bool]] = [("", False)] * len(calls)

        def serve(slot: int) -> None:  # one thread per worker, each call on its own slot in turn
            for i in range(slot, len(calls), self.workers):
                results[i] = self.call(calls[i], slot)

        with concurrent.futures.ThreadPoolExecutor(self.workers) as pool:
            list(pool.map(serve, range(min(self.workers, len(calls)))))
        with self._lock:
            self.calls += len(calls)
            failed = [text for text, ok in results if not ok]
            self.failures += len(failed)
            if failed:
                self.last_error = failed[0]
        return results

    def close(self) -> None:
        if self._pool is not None:
            self._pool.close()
            self._pool = None
