"""One run per output directory: a lock file ``<output_dir>/.jrft.lock`` held for the whole run.

Two runs writing one directory interleave their metrics, overwrite each other's checkpoints and export
whichever finishes last, so the second is refused. The lock file holds its owner's pid, host and start time
(JSON) and is ``flock``-ed while held. A lock left by a run that died (SIGKILL, power loss) is stale and
taken over: on the same host, when its pid is gone or no longer holds the ``flock`` (a reused pid). A lock
from another host cannot be checked from here; the error says so and which file to delete.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import socket
import time
from collections.abc import Iterator
from typing import Any

logger = logging.getLogger(__name__)

LOCK_NAME = ".jrft.lock"
_EMPTY_GRACE_SECONDS = 10.0  # a lock file still empty after this long was left by a writer that died


class RunLockedError(RuntimeError):
    """Another live run holds the output directory's lock."""


def _read(path: str) -> dict[str, Any] | None:
    try:
        with open(path) as f:
            info = json.loads(f.read() or "null")
    except (OSError, ValueError):
        return None
    return info if isinstance(info, dict) else None


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # someone else's process
    return True


def _flock_free(path: str) -> bool:
    """Whether nobody holds the ``flock`` on ``path`` (then its writer is gone)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return True
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except OSError:
        return False
    finally:
        os.close(fd)  # also drops the shared lock just taken
    return True


def _stale(path: str, info: dict[str, Any] | None) -> bool:
    if info is None:  # being written right now, or its writer died before writing
        try:
            return time.time() - os.path.getmtime(path) > _EMPTY_GRACE_SECONDS
        except OSError:
            return True
    if info.get("host") != socket.gethostname():
        return False
    pid = info.get("pid")
    return not isinstance(pid, int) or not _pid_alive(pid) or _flock_free(path)


def describe(info: dict[str, Any] | None) -> str:
    if info is None:
        return "an unknown process (the lock file is empty or unreadable)"
    started = info.get("started")
    when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(started)) if isinstance(started, float) else "?"
    return f"pid {info.get('pid')} on host {info.get('host')} (started {when})"


class RunLock:
    """The lock of one output directory; :meth:`acquire` raises :class:`RunLockedError` naming the holder."""

    def __init__(self, directory: str | os.PathLike) -> None:
        self.directory = os.path.abspath(directory)
        self.path = os.path.join(self.directory, LOCK_NAME)
        self._fd: int | None = None

    def acquire(self) -> None:
        os.makedirs(self.directory, exist_ok=True)
        for _ in range(5):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_RDWR, 0o644)
            except FileExistsError:
                info = _read(self.path)
                if not _stale(self.path, info):
                    raise RunLockedError(
                        f"output_dir {self.directory} is in use by another run: {describe(info)}. Wait for "
                        f"it, choose another output_dir, or, if that run is gone, delete {self.path}"
                    ) from None
                logger.warning("taking over the stale lock %s left by %s", self.path, describe(info))
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(self.path)
                continue
            fcntl.flock(fd, fcntl.LOCK_EX)  # fresh file, nobody else can hold it
            info = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.time()}
            os.write(fd, json.dumps(info).encode())
            os.fsync(fd)
            self._fd, self._info = fd, info
            return
        raise RunLockedError(f"could not take the lock {self.path}: other runs keep taking it")

    def release(self) -> None:
        if self._fd is None:
            return
        if _read(self.path) == self._info:  # ours still (nobody took it over): remove it
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.path)
        os.close(self._fd)
        self._fd = None

    def __enter__(self) -> RunLock:
        self.acquire()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.release()


@contextlib.contextmanager
def locked(directory: str | os.PathLike, enabled: bool = True) -> Iterator[RunLock | None]:
    """``with locked(output_dir):`` holds the run lock for the block (nothing when ``enabled`` is false)."""
    if not enabled:
        yield None
        return
    with RunLock(directory) as lock:
        yield lock
