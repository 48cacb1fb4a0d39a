"""Run an untrusted Python program in a subprocess with limits: CPU time, wall time, memory, no network,
writes only inside a fresh temporary directory.

What is enforced, by layer:

1. Always (any POSIX system):
   - ``RLIMIT_CPU`` (soft = ``cpu_seconds``: SIGXCPU; hard one second later: SIGKILL), ``RLIMIT_AS``
     (``memory_mb`` of address space: allocations beyond it raise ``MemoryError``), ``RLIMIT_FSIZE``
     (largest file written), ``RLIMIT_CORE`` = 0; hard limits set too, and raising a limit is
     blocked by the audit hook below.
   - Wall-clock limit: the parent kills the whole process group (SIGKILL) after ``wall_seconds``.
   - A fresh temporary working directory (also ``HOME`` and ``TMPDIR``), deleted afterwards; a minimal
     environment; ``python -I -B`` (no user site, no ``PYTHON*`` variables, no ``.pyc`` writes).
   - A Python audit hook (PEP 578) installed before the program runs, which raises ``PermissionError`` on:
     opening a file for writing, creating, removing, renaming, linking or changing the mode of a path outside
     the temporary directory; creating a socket; starting processes (``subprocess``, ``os.system``,
     ``os.exec*``, ``os.fork``, ``os.posix_spawn``); sending signals; loading native code with ``ctypes``;
     ``sqlite3.connect``; raising resource limits. This guards against accidents and naive programs, not a
     determined attacker: native code already loaded (C extensions) is not audited.
2. When Linux user namespaces work (``isolation="auto"`` probes once; ``"namespace"`` requires them): the
   program runs under ``unshare`` in new user, mount and network namespaces. The network namespace has no
   interfaces up, so no network at all, whatever the code does; every writable mount is remounted read-only
   except a bind mount of the temporary directory; the program then runs as an unprivileged user (uid 1000)
   of a nested user namespace, so it cannot undo those mounts. This is enforced by the kernel.

Not restricted by either layer: reading files (whatever the user running jrft can read), and connecting to
Unix sockets that exist in the filesystem (layer 1 blocks creating any socket from Python).

``isolation="python"`` uses layer 1 only. :func:`namespace_available` says whether layer 2 works here.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time

# Runs first in the child: limits, then the audit hook, then the program as __main__.
# argv: [-c, limits JSON, program path]
_GUARD = r"""
import json, os, resource, sys
_cfg = json.loads(sys.argv[1])
for _name, (_soft, _hard) in _cfg["rlimits"].items():
    resource.setrlimit(getattr(resource, _name), (_soft, _hard))
_root = os.path.realpath(os.getcwd())
_WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND
_BLOCKED = ("socket.", "subprocess.Popen", "os.system", "os.exec", "os.posix_spawn", "os.spawn", "os.fork",
            "os.forkpty", "pty.spawn", "os.kill", "os.killpg", "signal.pthread_kill", "ctypes.dlopen",
            "ctypes.dlsym", "ctypes.call_function", "sqlite3.connect", "resource.setrlimit",
            "resource.prlimit")
_PATH_EVENTS = {"os.remove": 1, "os.rmdir": 1, "os.mkdir": 1, "os.chmod": 1, "os.chown": 1, "os.truncate": 1,
                "os.utime": 1, "os.rename": 2, "os.link": 2, "os.symlink": 2, "os.mkfifo": 1, "os.mknod": 1}
def _inside(path):
    if isinstance(path, int):
        return True
    try:
        real = os.path.realpath(os.fsdecode(path))
    except Exception:
        return False
    return real == _root or real.startswith(_root + os.sep) or real == "/dev/null"
def _hook(event, args):
    if event == "open":
        path, mode, flags = args
        writing = (mode is not None and any(c in mode for c in "wax+")) or (flags & _WRITE_FLAGS)
        if writing and not _inside(path):
            raise PermissionError(f"sandbox: writing outside the working directory is not allowed: {path}")
    elif event in _PATH_EVENTS:
        for path in args[: _PATH_EVENTS[event]]:
            if not _inside(path):
                raise PermissionError(f"sandbox: {event} outside the working directory is not allowed: "
                                      f"{path}")
    elif event.startswith(_BLOCKED):
        raise PermissionError(f"sandbox: {event} is not allowed")
import runpy
sys.argv = sys.argv[2:]
if _cfg["audit_hook"]:
    sys.addaudithook(_hook)
runpy.run_path(sys.argv[0], run_name="__main__")
"""

# Inside the namespaces: remount everything read-only except the work dir, then drop to a nested,
# unprivileged user namespace (which locks those mounts) and exec the program.
_NAMESPACE_SETUP = r"""
set -e
mount --make-rprivate /
mount -o bind,remount,ro /
for m in $JRFT_RW_MOUNTS; do mount -o bind,remount,ro "$m" 2>/dev/null || true; done
mount --bind "$JRFT_WORKDIR" "$JRFT_WORKDIR"
mount -o bind,remount,rw "$JRFT_WORKDIR"
cd "$JRFT_WORKDIR"  # the old working directory still points into the read-only mount
exec unshare --user --map-user=1000 --map-group=1000 -- "$@"
"""
_PSEUDO_FS = {
    "proc",
    "sysfs",
    "cgroup",
    "cgroup2",
    "devpts",
    "mqueue",
    "bpf",
    "tracefs",
    "debugfs",
    "securityfs",
}

ISOLATION_MODES = ("auto", "namespace", "python")


@dataclasses.dataclass(frozen=True)
class SandboxLimits:
    """Limits for one sandboxed run (see the module docstring for how each is enforced).

    Attributes:
      cpu_seconds: CPU time (RLIMIT_CPU, whole seconds, rounded up).
      wall_seconds: wall-clock time before the process group is killed.
      memory_mb: address-space limit (RLIMIT_AS). Python itself needs ~30 MB.
      file_mb: largest file the program may write (RLIMIT_FSIZE).
      output_bytes: stdout/stderr kept in the result (the rest is dropped).
      isolation: ``"auto"``, ``"namespace"`` or ``"python"``.
      audit_hook: install the Python audit hook (turn off only to test the namespace layer alone).
    """

    cpu_seconds: float = 5.0
    wall_seconds: float = 10.0
    memory_mb: int = 512
    file_mb: int = 16
    output_bytes: int = 65536
    isolation: str = "auto"
    audit_hook: bool = True

    def __post_init__(self) -> None:
        if self.isolation not in ISOLATION_MODES:
            raise ValueError(f"sandbox isolation must be one of {ISOLATION_MODES}, got {self.isolation!r}")
        for field in ("cpu_seconds", "wall_seconds", "memory_mb", "file_mb", "output_bytes"):
            if getattr(self, field) <= 0:
                raise ValueError(f"sandbox {field} must be > 0, got {getattr(self, field)}")


@dataclasses.dataclass(frozen=True)
class SandboxResult:
    """Outcome of :func:`run_python`: ``returncode`` is negative for a signal (``-9`` = killed)."""

    returncode: int
    stdout: str
    stderr: str
    timed_out: bool
    seconds: float
    isolation: str


def _rw_mounts() -> list[str]:
    mounts = []
    try:
        with open("/proc/self/mounts") as f:
            for line in f:
                _, target, fstype, options = line.split()[:4]
                if (
                    "rw" in options.split(",")
                    and fstype not in _PSEUDO_FS
                    and target != "/"
                    and "\\" not in target
                ):
                    mounts.append(target)
    except OSError:
        pass
    return mounts


def _namespace_prefix() -> list[str]:
    return [
        "unshare",
        "--user",
        "--map-root-user",
        "--mount",
        "--net",
        "--",
        "sh",
        "-c",
        _NAMESPACE_SETUP,
        "sh",
    ]


@functools.lru_cache(maxsize=1)
def namespace_available() -> bool:
    """Whether this machine can run programs in the namespace layer (probed once per process)."""
    if not sys.platform.startswith("linux") or shutil.which("unshare") is None:
        return False
    work = tempfile.mkdtemp(prefix="jrft_sandbox_probe_")
    try:
        env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "JRFT_WORKDIR": work, "JRFT_RW_MOUNTS": ""}
        probe = [sys.executable, "-I", "-c", "open('probe', 'w').write('ok')"]
        done = subprocess.run(_namespace_prefix() + probe, cwd=work, env=env, capture_output=True, timeout=20)
        with open(os.path.join(work, "probe")) as f:
            return done.returncode == 0 and f.read() == "ok"
    except (OSError, subprocess.SubprocessError):
        return False
    finally:
        shutil.rmtree(work, ignore_errors=True)


def resolve_isolation(mode: str) -> str:
    """``"namespace"`` or ``"python"`` for a requested mode; raises if ``"namespace"`` is unavailable."""
    if mode == "python":
        return "python"
    available = namespace_available()
    if mode == "namespace" and not available:
        raise RuntimeError(
            "sandbox isolation 'namespace' requested but user namespaces (unshare -rmn) do not work here"
        )
    return "namespace" if available else "python"


def _decode(data: bytes, limit: int) -> str:
    return data[:limit].decode("utf-8", errors="replace")


def run_python(source: str, *, stdin: str = "", limits: SandboxLimits = SandboxLimits()) -> SandboxResult:
    """Run ``source`` as a ``__main__`` program in the sandbox; wait for it (at most the wall-clock limit).

    Args:
      source: the program text.
      stdin: text fed to the program's standard input.
      limits: the limits and isolation mode.

    Returns:
      A :class:`SandboxResult`; a wall-clock timeout gives ``timed_out=True`` and ``returncode=-9``.
    """
    isolation = resolve_isolation(limits.isolation)
    work = tempfile.mkdtemp(prefix="jrft_sandbox_")
    try:
        program = os.path.join(work, "main.py")
        with open(program, "w", encoding="utf-8") as f:
            f.write(source)
        mb = 1024 * 1024
        cpu = max(1, int(-(-limits.cpu_seconds // 1)))
        rlimits = {  # (soft, hard); the hard CPU limit is one second later: SIGXCPU first, then SIGKILL
            "RLIMIT_CPU": (cpu, cpu + 1),
            "RLIMIT_AS": (int(limits.memory_mb * mb),) * 2,
            "RLIMIT_FSIZE": (int(limits.file_mb * mb),) * 2,
            "RLIMIT_CORE": (0, 0),
        }
        cfg = json.dumps({"rlimits": rlimits, "audit_hook": limits.audit_hook})
        command = [sys.executable, "-I", "-B", "-c", _GUARD, cfg, program]
        env = {
            "PATH": "/usr/bin:/bin",
            "HOME": work,
            "TMPDIR": work,
            "LANG": "C.UTF-8",
            "PYTHONIOENCODING": "utf-8",
        }
        if isolation == "namespace":
            command = _namespace_prefix() + command
            env.update(JRFT_WORKDIR=work, JRFT_RW_MOUNTS=" ".join(_rw_mounts()))
        start = time.monotonic()
        proc = subprocess.Popen(
            command,
            cwd=work,
            env=env,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            start_new_session=True,  # its own process group, so a timeout kills every descendant
        )
        timed_out = False
        try:
            out, err = proc.communicate(stdin.encode("utf-8"), timeout=limits.wall_seconds)
        except subprocess.TimeoutExpired:
            timed_out = True
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            out, err = proc.communicate()
        return SandboxResult(
            returncode=proc.returncode,
            stdout=_decode(out, limits.output_bytes),
            stderr=_decode(err, limits.output_bytes),
            timed_out=timed_out,
            seconds=time.monotonic() - start,
            isolation=isolation,
        )
    finally:
        shutil.rmtree(work, ignore_errors=True)
