"""A small pool of reward worker processes that can be killed and replaced when a call hangs.

Why not ``concurrent.futures.ProcessPoolExecutor``: it cannot kill one hung task (only the whole pool, which
it then declares broken), and ``multiprocessing``'s spawn/forkserver start methods re-import the user's
``__main__``. Each worker here is a plain ``python -m jrft.rewards._worker_main`` subprocess in its own
session, talking over two pipes with pickled messages; it gets the parent's ``sys.path`` so functions
defined in importable modules unpickle by reference.

Functions loaded from ``file.py:function`` specs (tagged by :func:`jrft.rewards.loading.load_reward_function`)
are sent as their spec and re-loaded (once, then cached) in the worker, since the module they live in exists
only in the parent. Other functions must be picklable (module-level functions, built-in reward dataclasses).
"""

from __future__ import annotations

import asyncio
import functools
import inspect
import os
import pickle
import signal
import subprocess
import sys
import threading
import time
import traceback
from collections.abc import Callable, Mapping
from multiprocessing.connection import Connection
from typing import Any

from jrft.rewards.loading import SPEC_ATTRIBUTE, load_reward_function


class WorkerTimeout(RuntimeError):
    """A worker gave no result in time; it has been killed."""


class WorkerCrashed(RuntimeError):
    """A worker died while running a function."""


def function_payload(fn: Callable[..., Any], name: str) -> bytes:
    """What to send a worker for ``fn``: its spec when it was loaded from one, else the pickled function.

    Raises:
      ValueError: naming the function, when it can be neither.
    """
    spec = getattr(fn, SPEC_ATTRIBUTE, None)
    if isinstance(spec, str):
        return pickle.dumps(("spec", spec))
    try:
        return pickle.dumps(("pickle", pickle.dumps(fn)))
    except Exception as err:
        raise ValueError(
            f"reward function {name!r} cannot be sent to a worker process ({err}); define it at module level "
            "or load it with a 'module:function' / 'file.py:function' spec"
        ) from err


@functools.lru_cache(maxsize=64)
def _resolve(payload: bytes) -> Callable[..., Any]:
    kind, value = pickle.loads(payload)
    return load_reward_function(value) if kind == "spec" else pickle.loads(value)


# Stands for a logging hook (log_metric / log_extra) in a call sent to a worker: callables bound to the
# parent cannot cross the pipe, so the worker passes its own and returns what they collected.
LOG_HOOK = "<jrft log hook>"


def _run_one(payload: bytes, kwargs: Mapping[str, Any]) -> tuple[str, Any]:
    kwargs = dict(kwargs)
    logs: dict[str, list] = {"metrics": [], "extra": []}
    if kwargs.get("log_metric") == LOG_HOOK:
        kwargs["log_metric"] = lambda name, value: logs["metrics"].append((str(name), float(value)))
    if kwargs.get("log_extra") == LOG_HOOK:
        kwargs["log_extra"] = lambda column, values: logs["extra"].append((str(column), list(values)))
    try:
        result = _resolve(payload)(**kwargs)
        if inspect.isawaitable(result):
            result = asyncio.run(_await(result))
        return "ok", (list(result) if not isinstance(result, list) else result, logs)
    except BaseException as err:  # report everything, the parent decides
        return "error", (f"{type(err).__name__}: {err}", traceback.format_exc())


async def _await(awaitable: Any) -> Any:
    return await awaitable


def worker_main(read_fd: int, write_fd: int, memory_mb: int | None = None) -> None:
    """Serve calls until the parent closes the pipe or sends ``None``; ``memory_mb`` caps ``RLIMIT_DATA``."""
    if memory_mb is not None:
        import resource

        limit = memory_mb * 1024 * 1024
        resource.setrlimit(resource.RLIMIT_DATA, (limit, limit))
    inbox, outbox = Connection(read_fd, writable=False), Connection(write_fd, readable=False)
    sys.path[:] = inbox.recv()
    outbox.send("ready")
    while True:
        try:
            message = inbox.recv()
        except EOFError:
            return
        if message is None:
            return
        outbox.send(_run_one(*message))


def exit_description(code: int | None) -> str:
    """``exit code 3`` / ``killed by SIGSEGV`` for a ``Popen.returncode``."""
    if code is None:
        return "still running"
    if code < 0:
        try:
            return f"killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"killed by signal {-code}"
    return f"exit code {code}"


class _Worker:
    def __init__(self, memory_mb: int | None = None) -> None:
        child_read, parent_write = os.pipe()
        parent_read, child_write = os.pipe()
        memory = [] if memory_mb is None else [str(int(memory_mb))]
        self.process = subprocess.Popen(
            [sys.executable, "-m", "jrft.rewards._worker_main", str(child_read), str(child_write), *memory],
            pass_fds=(child_read, child_write),
            env={**os.environ, "PYTHONPATH": os.pathsep.join(p for p in sys.path if p)},
            start_new_session=True,  # killed as a group, immune to the parent's terminal signals
        )
        os.close(child_read)
        os.close(child_write)
        self.outbox = Connection(parent_write, readable=False)
        self.inbox = Connection(parent_read, writable=False)
        self.outbox.send(list(sys.path))
        self.ready = False

    def wait_ready(self, deadline: float) -> None:
        """Block until the worker has started (it says "ready"), or raise WorkerTimeout at ``deadline``."""
        if not self.ready:
            if not self.inbox.poll(max(0.0, deadline - time.monotonic())):
                raise WorkerTimeout("worker process did not start in time")
            self.inbox.recv()
            self.ready = True

    def call(self, payload: bytes, kwargs: Mapping[str, Any], deadline: float) -> tuple[str, Any]:
        try:
            self.wait_ready(deadline)
            self.outbox.send((payload, kwargs))
            if not self.inbox.poll(max(0.0, deadline - time.monotonic())):
                raise WorkerTimeout(
                    "no result before the timeout; the worker process was killed and replaced"
                )
            return self.inbox.recv()
        except (EOFError, OSError) as err:
            try:
                code = self.process.wait(timeout=1)
            except subprocess.TimeoutExpired:
                code = None
            raise WorkerCrashed(f"worker process died ({exit_description(code)}); it was replaced") from err

    def kill(self) -> None:
        try:
            os.killpg(self.process.pid, 9)
        except (ProcessLookupError, PermissionError):
            pass
        self.process.wait()
        self.inbox.close()
        self.outbox.close()

    def close(self) -> None:
        try:
            self.outbox.send(None)
            self.process.wait(timeout=2)
        except (OSError, subprocess.TimeoutExpired):
            pass
        self.kill()


class WorkerPool:
    """``size`` persistent worker processes, one per slot; a worker that hangs or dies is killed and its slot
    gets a fresh one at once.

    Each reward function has its own slot, so consecutive calls of a function run in the same process and
    its module state persists between batches, as it would in a thread (until a kill replaces the worker).
    ``call`` is thread-safe: callers of one slot wait for each other.
    """

    def __init__(self, size: int, memory_mb: int | None = None) -> None:
        if size < 1:
            raise ValueError(f"worker pool size must be >= 1, got {size}")
        if memory_mb is not None and memory_mb < 1:
            raise ValueError(f"worker memory_mb must be >= 1 or None, got {memory_mb}")
        self._memory_mb = memory_mb
        self._workers = [_Worker(memory_mb) for _ in range(size)]
        self._slot_locks = [threading.Lock() for _ in range(size)]
        self._lock = threading.Lock()
        self._closed = False
        self.replaced = 0

    def call(
        self, payload: bytes, kwargs: Mapping[str, Any], timeout: float, slot: int = 0
    ) -> tuple[str, Any]:
        """Run ``payload``'s function on ``kwargs`` in the worker of ``slot``: ``("ok", values)`` or
        ``("error", (m, tb))``.

        Raises:
          WorkerTimeout, WorkerCrashed: the worker has been replaced by a fresh one.
        """
        deadline = time.monotonic() + timeout
        if not self._slot_locks[slot].acquire(timeout=max(0.0, timeout)):
            raise WorkerTimeout("the function's worker process stayed busy until the timeout")
        try:
            worker = self._workers[slot]
            try:
                return worker.call(payload, kwargs, deadline)
            except (WorkerTimeout, WorkerCrashed):
                worker.kill()
                with self._lock:
                    self.replaced += 1
                    if not self._closed:
                        self._workers[slot] = _Worker(self._memory_mb)
                raise
        finally:
            self._slot_locks[slot].release()

    def wait_ready(self, timeout: float) -> None:
        """Wait (up to ``timeout`` seconds in all) until every worker has started.

        Raises:
          WorkerTimeout, WorkerCrashed: a worker did not start; it has been replaced by a fresh one.
        """
        deadline = time.monotonic() + timeout
        failure: Exception | None = None
        for slot, worker in enumerate(self._workers):
            try:
                worker.wait_ready(deadline)
            except (WorkerTimeout, EOFError, OSError) as err:
                worker.kill()
                self._workers[slot] = _Worker(self._memory_mb)
                failure = failure or err
        if failure is not None:
            raise failure if isinstance(failure, WorkerTimeout) else WorkerCrashed(repr(failure))

    def close(self) -> None:
        with self._lock:
            self._closed = True
        for worker in self._workers:
            worker.close()
