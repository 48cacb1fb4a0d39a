"""Run an untrusted Python program in a subprocess with limits: CPU time, wall time, memory, processes, no
network, writes only inside a fresh temporary directory.

What is enforced, by layer:

1. Always (any POSIX system):
   - ``RLIMIT_CPU`` (soft = ``cpu_seconds``: SIGXCPU; hard one second later: SIGKILL), ``RLIMIT_AS``
     (``memory_mb`` of address space: allocations beyond it raise ``MemoryError``), ``RLIMIT_FSIZE``
     (largest file written, stdout and stderr included: past it the program gets SIGXFSZ), ``RLIMIT_CORE`` =
     0, and in the namespace layer ``RLIMIT_NPROC`` (``max_processes``); hard limits set too, and raising a
     limit is blocked by the audit hook below.
   - Wall-clock limit: the parent kills the whole process group (SIGKILL) after ``wall_seconds``. stdin,
     stdout and stderr are files, not pipes, so the parent never waits on a pipe that some descendant still
     holds: it returns at the wall limit whatever the program's children do.
   - A seccomp filter (Linux x86_64 / aarch64, installed from Python with ``prctl``, no extra package):
     the program can start no process at all — ``fork``, ``vfork``, ``clone`` without ``CLONE_THREAD``,
     ``execve``, ``execveat`` fail with ``EPERM`` (``clone3`` with ``ENOSYS`` so threads fall back to
     ``clone``), whichever Python or native path calls them (``_posixsubprocess.fork_exec``,
     ``os.posix_spawn``, ``ctypes``, ``multiprocessing``); ``ptrace`` and ``process_vm_writev`` fail too. In
     the Python-only mode ``socket`` fails as well. Threads still work. :func:`seccomp_available` says
     whether the filter can be installed here; where it cannot, the audit hook is the only guard against
     spawning.
   - A fresh temporary working directory (also ``HOME`` and ``TMPDIR``), deleted afterwards; a minimal
     environment; ``python -I -B`` (no user site, no ``PYTHON*`` variables, no ``.pyc`` writes).
   - A Python audit hook (PEP 578) installed before the program runs, which raises ``PermissionError`` on:
     opening a file for writing, or a directory, outside the temporary directory; creating, removing,
     renaming, linking or changing the mode of a path outside it; creating a socket; starting processes
     (``subprocess``, ``os.system``, ``os.exec*``, ``os.fork``, ``os.posix_spawn``); sending signals;
     loading native code with ``ctypes``; ``sqlite3.connect``; raising resource limits. This guards against
     accidents and naive programs, not a determined attacker: native code already loaded (C extensions) is
     not audited.
2. When Linux user namespaces work (``isolation="auto"`` probes once; ``"namespace"`` requires them): the
   program runs under ``unshare`` in new user, PID, mount and network namespaces. The network namespace has
   no interfaces up, so no network at all, whatever the code does; every writable mount is remounted
   read-only except a bind mount of the temporary directory; ``/proc`` shows only the sandbox's processes;
   the program then runs as an unprivileged user (uid 1000) of a nested user namespace, so it cannot undo
   those mounts. When the program (PID 1 of its namespace) ends or is killed, the kernel kills every other
   process in the namespace, so no descendant outlives the run. This is enforced by the kernel.

Not restricted by either layer: reading files (whatever the user running jrft can read), and connecting to
Unix sockets that exist in the filesystem in the namespace layer (layer 1 blocks creating any socket from
Python).

``isolation="python"`` uses layer 1 only: it is weaker (writes are confined by the audit hook alone), which
is why :class:`~jrft.rewards.code_execution.CodeExecutionReward` runs in it only when asked for by name.
:func:`namespace_available` says whether layer 2 works here.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import platform
import shutil
import signal
import struct
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
if _cfg["seccomp"] is not None:
    import ctypes
    _filter = bytes.fromhex(_cfg["seccomp"])
    _buf = ctypes.create_string_buffer(_filter, len(_filter))
    # struct sock_fprog {unsigned short len; struct sock_filter *filter;} (64-bit: 6 bytes of padding)
    _fprog = ctypes.create_string_buffer((len(_filter) // 8).to_bytes(2, sys.byteorder) + bytes(6)
                                         + ctypes.addressof(_buf).to_bytes(8, sys.byteorder), 16)
    _libc = ctypes.CDLL(None, use_errno=True)
    _libc.prctl.argtypes = [ctypes.c_int] + [ctypes.c_ulong] * 4
    # PR_SET_NO_NEW_PRIVS, then PR_SET_SECCOMP / SECCOMP_MODE_FILTER; fail closed
    if _libc.prctl(38, 1, 0, 0, 0) or _libc.prctl(22, 2, ctypes.addressof(_fprog), 0, 0):
        sys.stderr.write(f"sandbox: cannot install the seccomp filter (errno {ctypes.get_errno()})\n")
        os._exit(70)
    del ctypes, _filter, _buf, _fprog, _libc
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
        # A directory fd outside would let os.open(name, dir_fd=fd) write there (the event shows only name).
        if not isinstance(path, int) and not _inside(path) and os.path.isdir(path):
            raise PermissionError(f"sandbox: opening a directory outside the working directory: {path}")
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
exec "$@"
"""
# PID 1 of the sandbox's PID namespace (before the nested user namespace): runs the program, writes its exit
# status (negative: killed by that signal) to JRFT_STATUS_FD, and by exiting takes every process left in the
# namespace with it. unshare --fork itself does not report a child's death by signal reliably.
_INIT = r"""
import os, subprocess, sys
status_fd = int(os.environ.pop("JRFT_STATUS_FD"))
code = subprocess.call(sys.argv[1:])
os.write(status_fd, str(code).encode())
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

# seccomp: (AUDIT_ARCH, clone, clone3, spawn-like syscalls, socket) per machine; see the module docstring.
_SYSCALLS = {
    # fork, vfork, execve, execveat, ptrace, process_vm_writev
    "x86_64": (0xC000003E, 56, 435, (57, 58, 59, 322, 101, 311), 41),
    # execve, execveat, ptrace, process_vm_writev (no fork/vfork syscalls on aarch64)
    "aarch64": (0xC00000B7, 220, 435, (221, 281, 117, 271), 198),
}
_CLONE_THREAD = 0x00010000
_RET_ALLOW, _RET_KILL = 0x7FFF0000, 0x80000000
_RET_EPERM, _RET_ENOSYS = 0x00050000 | 1, 0x00050000 | 38
_LD_W_ABS, _JEQ, _JGE, _JSET, _RET = 0x20, 0x15, 0x35, 0x45, 0x06


def seccomp_filter(block_sockets: bool) -> bytes | None:
    """The classic-BPF seccomp program (``struct sock_filter[]``) for this machine, or None where unknown.

    Offsets in ``struct seccomp_data``: ``nr`` at 0, ``arch`` at 4, ``args[0]`` at 16 (low word).
    """
    table = _SYSCALLS.get(platform.machine())
    if table is None or not sys.platform.startswith("linux") or sys.byteorder != "little":
        return None
    arch, clone, clone3, spawn, sock = table
    prog = [(_LD_W_ABS, 0, 0, 4), (_JEQ, 1, 0, arch), (_RET, 0, 0, _RET_KILL), (_LD_W_ABS, 0, 0, 0)]
    if arch == _SYSCALLS["x86_64"][0]:
        prog += [(_JGE, 0, 1, 0x40000000), (_RET, 0, 0, _RET_EPERM)]  # the x32 ABI: refuse it whole
    prog += [(_JEQ, 0, 1, clone3), (_RET, 0, 0, _RET_ENOSYS)]  # glibc then falls back to clone
    for nr in spawn + ((sock,) if block_sockets else ()):
        prog += [(_JEQ, 0, 1, nr), (_RET, 0, 0, _RET_EPERM)]
    prog += [
        (_JEQ, 1, 0, clone),
        (_RET, 0, 0, _RET_ALLOW),
        (_LD_W_ABS, 0, 0, 16),  # clone's flags
        (_JSET, 0, 1, _CLONE_THREAD),
        (_RET, 0, 0, _RET_ALLOW),  # a thread
        (_RET, 0, 0, _RET_EPERM),  # a process
    ]
    return b"".join(struct.pack("<HBBI", *instruction) for instruction in prog)


@dataclasses.dataclass(frozen=True)
class SandboxLimits:
    """Limits for one sandboxed run (see the module docstring for how each is enforced).

    Attributes:
      cpu_seconds: CPU time (RLIMIT_CPU, whole seconds, rounded up).
      wall_seconds: wall-clock time before the process group is killed.
      memory_mb: address-space limit (RLIMIT_AS). Python itself needs ~30 MB.
      file_mb: largest file the program may write (RLIMIT_FSIZE), its stdout and stderr included.
      max_processes: RLIMIT_NPROC in the namespace layer, threads included (the seccomp filter already
        refuses new processes; outside a user namespace the count would include every process of the user
        running jrft, so it is not set there).
      output_bytes: stdout/stderr kept in the result (the rest is dropped).
      isolation: ``"auto"``, ``"namespace"`` or ``"python"``.
      audit_hook: install the Python audit hook (turn off only to test the namespace layer alone).
    """

    cpu_seconds: float = 5.0
    wall_seconds: float = 10.0
    memory_mb: int = 512
    file_mb: int = 16
    max_processes: int = 64
    output_bytes: int = 65536
    isolation: str = "auto"
    audit_hook: bool = True

    def __post_init__(self) -> None:
        if self.isolation not in ISOLATION_MODES:
            raise ValueError(f"sandbox isolation must be one of {ISOLATION_MODES}, got {self.isolation!r}")
        for field in (
            "cpu_seconds",
            "wall_seconds",
            "memory_mb",
            "file_mb",
            "max_processes",
            "output_bytes",
        ):
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


def _in_namespaces(command: list[str]) -> list[str]:
    """``command`` run as the unprivileged user of the nested namespace, below :data:`_INIT`."""
    nested = ["unshare", "--user", "--map-user=1000", "--map-group=1000", "--"]
    return _namespace_prefix() + [sys.executable, "-I", "-B", "-c", _INIT] + nested + command


def _namespace_prefix() -> list[str]:
    return [
        "unshare",
        "--user",
        "--map-root-user",
        "--mount",
        "--net",
        "--pid",  # the program's descendants die with it: see the module docstring
        "--fork",
        "--kill-child",
        "--mount-proc",
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
        env = {
            "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
            "JRFT_WORKDIR": work,
            "JRFT_RW_MOUNTS": "",
            "JRFT_STATUS_FD": "2",
        }
        probe = [sys.executable, "-I", "-c", "open('probe', 'w').write('ok')"]
        command = _in_namespaces(probe)
        done = subprocess.run(command, cwd=work, env=env, capture_output=True, timeout=20)
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


@functools.lru_cache(maxsize=1)
def seccomp_available() -> bool:
    """Whether the seccomp filter installs here and refuses ``fork`` (probed once per process)."""
    program = seccomp_filter(block_sockets=True)
    if program is None:
        return False
    probe = "import os\ntry:\n    os.fork()\nexcept PermissionError:\n    print('blocked')\n"
    probe += "else:\n    os._exit(0)\n"
    result = _run(probe, "", SandboxLimits(isolation="python", audit_hook=False), "python", program)
    return result.returncode == 0 and result.stdout.strip() == "blocked"


def _read(path: str, limit: int) -> str:
    with open(path, "rb") as f:
        return f.read(limit).decode("utf-8", errors="replace")


def _status(path: str, fallback: int) -> int:
    """The program's exit status as :data:`_INIT` wrote it (namespace layer), else ``fallback``."""
    try:
        with open(path) as f:
            return int(f.read())
    except (OSError, ValueError):
        return fallback


def _kill_group(pid: int) -> None:
    try:
        os.killpg(pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


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
    program = seccomp_filter(block_sockets=isolation == "python") if seccomp_available() else None
    return _run(source, stdin, limits, isolation, program)


def _run(
    source: str, stdin: str, limits: SandboxLimits, isolation: str, seccomp: bytes | None
) -> SandboxResult:
    box = tempfile.mkdtemp(prefix="jrft_sandbox_")
    work = os.path.join(box, "work")  # the program's directory; its stdio files sit beside it
    try:
        os.mkdir(work)
        program = os.path.join(work, "main.py")
        with open(program, "w", encoding="utf-8") as f:
            f.write(source)
        with open(os.path.join(box, "stdin"), "w", encoding="utf-8") as f:
            f.write(stdin)
        mb = 1024 * 1024
        cpu = max(1, int(-(-limits.cpu_seconds // 1)))
        rlimits = {  # (soft, hard); the hard CPU limit is one second later: SIGXCPU first, then SIGKILL
            "RLIMIT_CPU": (cpu, cpu + 1),
            "RLIMIT_AS": (int(limits.memory_mb * mb),) * 2,
            "RLIMIT_FSIZE": (int(limits.file_mb * mb),) * 2,
            "RLIMIT_CORE": (0, 0),
        }
        if isolation == "namespace":  # counted per user namespace there, so only the sandbox's own tasks
            rlimits["RLIMIT_NPROC"] = (limits.max_processes,) * 2
        cfg = json.dumps(
            {
                "rlimits": rlimits,
                "audit_hook": limits.audit_hook,
                "seccomp": None if seccomp is None else seccomp.hex(),
            }
        )
        command = [sys.executable, "-I", "-B", "-c", _GUARD, cfg, program]
        env = {
            "PATH": "/usr/bin:/bin",
            "HOME": work,
            "TMPDIR": work,
            "LANG": "C.UTF-8",
            "PYTHONIOENCODING": "utf-8",
        }
        if isolation == "namespace":
            command = _in_namespaces(command)
            env.update(JRFT_WORKDIR=work, JRFT_RW_MOUNTS=" ".join(_rw_mounts()))
        start = time.monotonic()
        # Files, not pipes: a descendant holding a pipe open could make the parent wait past the wall limit.
        status_path = os.path.join(box, "status")
        with (
            open(status_path, "wb") as status_file,
            open(os.path.join(box, "stdin"), "rb") as stdin_file,
            open(os.path.join(box, "stdout"), "wb") as stdout_file,
            open(os.path.join(box, "stderr"), "wb") as stderr_file,
        ):
            if isolation == "namespace":
                env["JRFT_STATUS_FD"] = str(status_file.fileno())
            proc = subprocess.Popen(
                command,
                cwd=work,
                env=env,
                stdin=stdin_file,
                stdout=stdout_file,
                stderr=stderr_file,
                start_new_session=True,  # its own process group, so a timeout kills every descendant
                pass_fds=(status_file.fileno(),) if isolation == "namespace" else (),
            )
        timed_out = False
        try:
            proc.wait(timeout=limits.wall_seconds)
        except subprocess.TimeoutExpired:
            timed_out = True
        finally:
            # Also after a normal exit: anything left in its group (the namespace layer has killed the rest).
            _kill_group(proc.pid)
            proc.wait()
        return SandboxResult(
            returncode=-signal.SIGKILL if timed_out else _status(status_path, proc.returncode),
            stdout=_read(os.path.join(box, "stdout"), limits.output_bytes),
            stderr=_read(os.path.join(box, "stderr"), limits.output_bytes),
            timed_out=timed_out,
            seconds=time.monotonic() - start,
            isolation=isolation,
        )
    finally:
        shutil.rmtree(box, ignore_errors=True)
