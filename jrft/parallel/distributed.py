"""Multi-host initialisation: one call that turns N processes into one JAX runtime.

``initialize_distributed()`` wraps ``jax.distributed.initialize`` (JAX's own engine: a coordinator service on
process 0, then every process sees every device of the job through ``jax.devices()``). It must run before
anything else touches JAX devices. Where the settings come from, first match wins:

1. explicit values: the function's arguments, else the environment variables ``JRFT_COORDINATOR_ADDRESS``
   (``host:port`` of process 0), ``JRFT_NUM_PROCESSES``, ``JRFT_PROCESS_ID`` and ``JRFT_LOCAL_DEVICE_IDS``
   (``0,1,2``); an argument and an environment variable that disagree are an error, not a silent choice;
2. SLURM: ``SLURM_NTASKS`` > 1 under ``srun`` (JAX reads the rest: the first node of the step is the
   coordinator, ``SLURM_PROCID`` the process id, one GPU per task unless local device ids are given);
3. a Cloud TPU VM (TPU chips on the PCI bus, or ``TPU_WORKER_HOSTNAMES`` set on GKE): JAX reads the
   worker list and this worker's id from the TPU metadata server; on a one-host slice this gives 1 process;
4. otherwise: a single process, and nothing is initialised (a no-op).

``JRFT_DISTRIBUTED`` = ``auto`` (default) | ``off`` | ``slurm`` | ``tpu`` forces a choice: ``off`` skips
initialisation even under SLURM; ``slurm`` / ``tpu`` fail loudly when that cluster is not detected (the
``tpu/`` launcher sets ``tpu`` so a misconfigured worker stops instead of training alone).

The call is idempotent: a second call with the same (or no) settings returns the first result.

Example (two processes on one machine, each with 4 CPU devices; run once with process_id=0 and once with 1)::

    import jax
    jax.config.update("jax_num_cpu_devices", 4)
    info = initialize_distributed("127.0.0.1:12355", num_processes=2, process_id=0)
    assert info.global_device_count == 8
"""

from __future__ import annotations

import dataclasses
import glob
import logging
import os
from collections.abc import Callable, Mapping, Sequence

import numpy as np

ENV_COORDINATOR = "JRFT_COORDINATOR_ADDRESS"
ENV_NUM_PROCESSES = "JRFT_NUM_PROCESSES"
ENV_PROCESS_ID = "JRFT_PROCESS_ID"
ENV_LOCAL_DEVICE_IDS = "JRFT_LOCAL_DEVICE_IDS"
ENV_MODE = "JRFT_DISTRIBUTED"

_SLURM_STEP_VARS = ("SLURM_JOB_ID", "SLURM_STEP_NODELIST", "SLURM_NTASKS", "SLURM_PROCID", "SLURM_LOCALID")

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class DistributedSettings:
    """What ``jax.distributed.initialize`` will be called with; ``None`` fields are left to JAX's detection.

    Attributes:
      cluster: where the settings came from: ``"single"`` (no-op), ``"explicit"``, ``"slurm"`` or ``"tpu"``.
      coordinator_address: ``host:port`` of process 0's coordinator service.
      num_processes: number of processes in the job.
      process_id: this process's id in ``[0, num_processes)``.
      local_device_ids: the accelerator ids this process owns (GPU: one per process under SLURM by default).
    """

    cluster: str
    coordinator_address: str | None = None
    num_processes: int | None = None
    process_id: int | None = None
    local_device_ids: tuple[int, ...] | None = None

    @property
    def is_noop(self) -> bool:
        return self.cluster == "single"


@dataclasses.dataclass(frozen=True)
class DistributedInfo:
    """The runtime as JAX sees it after initialisation.

    Attributes:
      process_id: ``jax.process_index()``.
      num_processes: ``jax.process_count()``.
      local_device_count: devices this process drives (``jax.local_device_count()``).
      global_device_count: devices of the whole job (``jax.device_count()``).
      cluster: how the settings were found (see ``DistributedSettings.cluster``).
      coordinator_address: the coordinator, or ``None`` for a single process.
    """

    process_id: int
    num_processes: int
    local_device_count: int
    global_device_count: int
    cluster: str
    coordinator_address: str | None = None

    @property
    def is_main(self) -> bool:
        return self.process_id == 0

    @property
    def is_multiprocess(self) -> bool:
        return self.num_processes > 1


# --------------------------------------------------------------------------------------------- parsing


def _parse_int(value: str | int | None, source: str) -> int | None:
    if value is None or value == "":
        return None
    try:
        return int(value)
    except (TypeError, ValueError):
        raise ValueError(f"{source} must be an integer, got {value!r}") from None


def _parse_device_ids(value: str | int | Sequence[int] | None, source: str) -> tuple[int, ...] | None:
    if value is None or value == "":
        return None
    if isinstance(value, int):
        return (value,)
    if isinstance(value, str):
        parts = [p.strip() for p in value.split(",") if p.strip()]
        try:
            return tuple(int(p) for p in parts)
        except ValueError:
            raise ValueError(
                f"{source} must be comma-separated integers like '0,1,2,3', got {value!r}"
            ) from None
    return tuple(int(v) for v in value)


def _check_address(address: str | None, source: str) -> str | None:
    if address is None or address == "":
        return None
    host, sep, port = address.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"{source} must be 'host:port' (e.g. '10.0.0.2:8476'), got {address!r}")
    return address


def _merge(name: str, env_name: str, arg, env_value):
    """An argument wins only by agreeing with the environment: two different values are a config error."""
    if arg is not None and env_value is not None and arg != env_value:
        raise ValueError(
            f"inconsistent distributed settings: argument {name}={arg!r} "
            f"but environment {env_name}={env_value!r}"
        )
    return arg if arg is not None else env_value


# ------------------------------------------------------------------------------------ cluster detectors


def _slurm_present(environ: Mapping[str, str]) -> bool:
    """A multi-task SLURM step (``srun``): JAX's SLURM detection reads exactly these variables."""
    if not all(v in environ for v in _SLURM_STEP_VARS):
        return False
    return (_parse_int(environ["SLURM_NTASKS"], "SLURM_NTASKS") or 1) > 1


# Cloud TPU chips on the PCI bus: Google's vendor id and the device ids of TPU v3, v4, v5p, v5e, v6e, 7x
# (the ids JAX's own TPU detection uses).
_PCI_DEVICES = "/sys/bus/pci/devices"
_GOOGLE_PCI_VENDOR = "0x1ae0"
_TPU_PCI_DEVICE_IDS = frozenset({"0x0027", "0x005e", "0x0062", "0x0063", "0x006f", "0x0076"})


def _tpu_chips_present() -> bool:
    for vendor_file in glob.glob(os.path.join(_PCI_DEVICES, "*", "vendor")):
        try:
            with open(vendor_file) as f:
                if f.read().strip() != _GOOGLE_PCI_VENDOR:
                    continue
            with open(os.path.join(os.path.dirname(vendor_file), "device")) as f:
                if f.read().strip() in _TPU_PCI_DEVICE_IDS:
                    return True
        except OSError:
            continue
    return False


def _tpu_vm_present(environ: Mapping[str, str]) -> bool:
    """A Cloud TPU VM (TPU chips on the PCI bus) or a GKE TPU pod (worker host list in the environment)."""
    if environ.get("TPU_WORKER_HOSTNAMES") or environ.get("TPU_PROCESS_ADDRESSES"):
        return True
    return _tpu_chips_present()


# Checked in this order by mode "auto"; each maps an environment to "is this cluster here?".
CLUSTER_DETECTORS: dict[str, Callable[[Mapping[str, str]], bool]] = {
    "slurm": _slurm_present,
    "tpu": _tpu_vm_present,
}

_MODES = ("auto", "off", *CLUSTER_DETECTORS)


# Each explicit setting: its argument name, its environment variable, and the parser applied to both.
_EXPLICIT_SETTINGS = (
    ("coordinator_address", ENV_COORDINATOR, _check_address),
    ("num_processes", ENV_NUM_PROCESSES, _parse_int),
    ("process_id", ENV_PROCESS_ID, _parse_int),
    ("local_device_ids", ENV_LOCAL_DEVICE_IDS, _parse_device_ids),
)


def _explicit_values(coordinator_address, num_processes, process_id, local_device_ids, environ):
    """Arguments merged with their JRFT_* variables, parsed and range-checked."""
    args = (coordinator_address, num_processes, process_id, local_device_ids)
    address, nproc, pid, devices = (
        _merge(name, env_name, parse(arg, name), parse(environ.get(env_name), env_name))
        for (name, env_name, parse), arg in zip(_EXPLICIT_SETTINGS, args, strict=True)
    )
    if nproc is not None and nproc < 1:
        raise ValueError(f"num_processes must be >= 1, got {nproc}")
    if pid is not None and pid < 0:
        raise ValueError(f"process_id must be >= 0, got {pid}")
    if nproc is not None and pid is not None and pid >= nproc:
        raise ValueError(
            f"process_id={pid} is out of range for num_processes={nproc} (ids are 0..{nproc - 1})"
        )
    return address, nproc, pid, devices


def resolve_settings(
    coordinator_address: str | None = None,
    num_processes: int | None = None,
    process_id: int | None = None,
    local_device_ids: int | Sequence[int] | None = None,
    environ: Mapping[str, str] | None = None,
) -> DistributedSettings:
    """Decide how to initialise, from arguments and environment only (no JAX calls; unit-testable).

    Raises:
      ValueError: on malformed values, an argument that contradicts its environment variable, a process id
        outside ``[0, num_processes)``, incomplete explicit settings with no cluster to fill the gaps, or a
        forced ``JRFT_DISTRIBUTED`` cluster that is not detected.
    """
    environ = os.environ if environ is None else environ
    mode = environ.get(ENV_MODE, "auto").strip().lower() or "auto"
    if mode not in _MODES:
        raise ValueError(f"{ENV_MODE} must be one of {', '.join(_MODES)}; got {mode!r}")
    address, nproc, pid, devices = _explicit_values(
        coordinator_address, num_processes, process_id, local_device_ids, environ
    )

    if mode == "off" or nproc == 1:
        if pid not in (None, 0):
            raise ValueError(f"process_id={pid} given for a single-process run")
        return DistributedSettings("single", local_device_ids=devices)

    if mode in CLUSTER_DETECTORS:
        if not CLUSTER_DETECTORS[mode](environ):
            raise ValueError(f"{ENV_MODE}={mode} but no {mode} cluster was detected in this environment")
        cluster = mode
    else:
        cluster = next((name for name, present in CLUSTER_DETECTORS.items() if present(environ)), None)

    if cluster == "slurm":
        # Cross-check explicit values against SLURM's own view: a mismatch would hang at the barrier.
        slurm_n = int(environ["SLURM_NTASKS"])
        slurm_id = int(environ["SLURM_PROCID"])
        if nproc is not None and nproc != slurm_n:
            raise ValueError(f"num_processes={nproc} disagrees with SLURM_NTASKS={slurm_n}")
        if pid is not None and pid != slurm_id:
            raise ValueError(f"process_id={pid} disagrees with SLURM_PROCID={slurm_id}")
        return DistributedSettings("slurm", address, slurm_n, slurm_id, devices)

    explicit = (address, nproc, pid)
    if cluster is None and all(v is None for v in explicit):
        return DistributedSettings("single", local_device_ids=devices)
    if cluster == "tpu" and None in explicit:
        # JAX fills whatever is None from the TPU metadata.
        return DistributedSettings("tpu", address, nproc, pid, devices)
    missing = [
        f"{arg} ({env})"
        for arg, env, v in zip(
            ("coordinator_address", "num_processes", "process_id"),
            (ENV_COORDINATOR, ENV_NUM_PROCESSES, ENV_PROCESS_ID),
            explicit,
            strict=True,
        )
        if v is None
    ]
    if missing:
        raise ValueError(
            "incomplete distributed settings and no SLURM/TPU cluster detected to fill them: missing "
            + ", ".join(missing)
        )
    return DistributedSettings("explicit", address, nproc, pid, devices)


# ------------------------------------------------------------------------------------- initialisation

_STATE: dict[str, object] = {}


def _runtime_info(settings: DistributedSettings) -> DistributedInfo:
    import jax

    return DistributedInfo(
        process_id=jax.process_index(),
        num_processes=jax.process_count(),
        local_device_count=jax.local_device_count(),
        global_device_count=jax.device_count(),
        cluster=settings.cluster,
        coordinator_address=settings.coordinator_address,
    )


def initialize_distributed(
    coordinator_address: str | None = None,
    num_processes: int | None = None,
    process_id: int | None = None,
    local_device_ids: int | Sequence[int] | None = None,
) -> DistributedInfo:
    """Join this process to the job's JAX runtime (or do nothing for a single process); see the module doc.

    Call it first, before anything creates JAX arrays or lists devices: JAX cannot add processes to a backend
    that already exists.

    Args:
      coordinator_address: ``host:port`` of process 0 (falls back to ``JRFT_COORDINATOR_ADDRESS``).
      num_processes: processes in the job (falls back to ``JRFT_NUM_PROCESSES``).
      process_id: this process's id (falls back to ``JRFT_PROCESS_ID``).
      local_device_ids: accelerator ids this process uses (falls back to ``JRFT_LOCAL_DEVICE_IDS``).

    Returns:
      A ``DistributedInfo`` describing the runtime (process id/count, local and global device counts).

    Raises:
      ValueError: inconsistent or incomplete settings (see ``resolve_settings``), or a second call asking for
        different settings than the first.
      RuntimeError: JAX's backend was already started before a multi-process initialisation, or JAX's view
        after initialisation disagrees with the settings.
    """
    import jax

    settings = resolve_settings(coordinator_address, num_processes, process_id, local_device_ids)
    previous = _STATE.get("settings")
    if previous is not None:
        asked = (coordinator_address, num_processes, process_id, local_device_ids)
        if settings != previous and any(v is not None for v in asked):
            raise ValueError(
                f"initialize_distributed was already called with {previous}; "
                f"cannot re-initialise with {settings}"
            )
        return _STATE["info"]  # type: ignore[return-value]

    if settings.is_noop:
        info = _runtime_info(settings)
        if info.num_processes > 1:  # someone called jax.distributed.initialize directly: report it as is
            info = dataclasses.replace(info, cluster="external")
    elif jax.distributed.is_initialized():
        info = dataclasses.replace(_runtime_info(settings), cluster="external")
    else:
        try:
            jax.distributed.initialize(
                coordinator_address=settings.coordinator_address,
                num_processes=settings.num_processes,
                process_id=settings.process_id,
                local_device_ids=list(settings.local_device_ids) if settings.local_device_ids else None,
            )
        except RuntimeError as err:
            raise RuntimeError(
                f"jax.distributed.initialize failed for {settings}: {err}. It must run before any JAX "
                "computation or device query; call initialize_distributed() first thing in the program."
            ) from err
        info = _runtime_info(settings)
        _check_runtime(settings, info)

    _STATE["settings"] = settings
    _STATE["info"] = info
    if info.is_multiprocess:
        log_on_main(
            "jax.distributed: %d processes, %d devices (%d local), cluster=%s, coordinator=%s",
            info.num_processes,
            info.global_device_count,
            info.local_device_count,
            info.cluster,
            info.coordinator_address or "auto",
        )
    return info


def _check_runtime(settings: DistributedSettings, info: DistributedInfo) -> None:
    if settings.num_processes is not None and info.num_processes != settings.num_processes:
        raise RuntimeError(
            f"asked for {settings.num_processes} processes but JAX reports {info.num_processes} "
            f"(settings: {settings})"
        )
    if settings.process_id is not None and info.process_id != settings.process_id:
        raise RuntimeError(f"asked for process_id={settings.process_id} but JAX reports {info.process_id}")


# ---------------------------------------------------------------------------------- process-0 helpers


def is_main_process() -> bool:
    """True on process 0 (and in every single-process run): the one that logs, prints and exports.

    Safe to call before ``initialize_distributed``: it then never starts JAX's backend (which would make a
    later multi-process initialisation impossible) and reads the launcher's process id from the environment
    (``JRFT_PROCESS_ID``, ``SLURM_PROCID``, ``TPU_WORKER_ID``; none set means process 0).
    """
    info = _STATE.get("info")
    if info is not None:
        return info.is_main  # type: ignore[union-attr]
    import jax

    if jax.distributed.is_initialized():
        return jax.process_index() == 0
    for var in (ENV_PROCESS_ID, "SLURM_PROCID", "TPU_WORKER_ID"):
        value = os.environ.get(var, "").strip()
        if value.isdigit():
            return int(value) == 0
    return True


def log_on_main(msg: str, *args, level: int = logging.INFO, logger: logging.Logger | None = None) -> None:
    """``logger.log(level, msg, *args)`` on process 0 only; other processes stay silent."""
    if is_main_process():
        (logger or log).log(level, msg, *args)


class MainProcessFilter(logging.Filter):
    """Drops log records on every process but 0: ``handler.addFilter(MainProcessFilter())``."""

    def filter(self, record: logging.LogRecord) -> bool:
        return is_main_process()


# ------------------------------------------------------------------------------------ host gathers


def host_array(x) -> np.ndarray:
    """A (possibly multi-process) ``jax.Array``, or a host array, as one global numpy array on every process.

    An array split across processes is gathered with ``process_allgather``: a collective, so every process
    must call it (e.g. all of them before process 0 writes an export); anything else is copied to the host.
    """
    import jax

    if isinstance(x, jax.Array) and not x.is_fully_addressable:
        from jax.experimental import multihost_utils

        return np.asarray(multihost_utils.process_allgather(x, tiled=True))
    return np.asarray(jax.device_get(x))


def gather_rows(x: np.ndarray) -> np.ndarray:
    """``[n, ...]`` rows of this process -> ``[P * n, ...]`` rows of all processes in process order (every
    process gets the same array). The identity in a single-process run."""
    import jax

    if jax.process_count() == 1:
        return x
    from jax.experimental import multihost_utils

    # sent as raw bytes: JAX would turn float64 rewards (and int64, bool) into 32-bit values on the way
    x = np.ascontiguousarray(x)
    raw = x.view(np.uint8).reshape(x.shape[0], x.itemsize * int(np.prod(x.shape[1:], dtype=np.int64)))
    gathered = np.asarray(multihost_utils.process_allgather(raw, tiled=True))
    return np.ascontiguousarray(gathered).view(x.dtype).reshape(-1, *x.shape[1:])


def gather_lists(rows: Sequence[Sequence[int]]) -> list[list[int]]:
    """Ragged integer rows (token ids) of this process -> those of all processes in process order (every
    process gets the same list; each must pass the same number of rows). The identity, as lists, in a
    single-process run. Two collectives: the rows' lengths, then the rows padded to the longest."""
    import jax

    if jax.process_count() == 1:
        return [list(r) for r in rows]
    lengths = gather_rows(np.asarray([len(r) for r in rows], np.int64))  # [P * n]
    padded = np.zeros((len(rows), max(int(lengths.max(initial=0)), 1)), np.int64)
    for i, r in enumerate(rows):
        padded[i, : len(r)] = r
    everyone = gather_rows(padded)
    return [everyone[i, :n].tolist() for i, n in enumerate(lengths)]


def local_rows(x: np.ndarray) -> np.ndarray:
    """This process's contiguous slice of a ``[P * n, ...]`` global host array (the inverse of
    :func:`gather_rows`)."""
    import jax

    n = x.shape[0] // jax.process_count()
    return x[jax.process_index() * n : (jax.process_index() + 1) * n]


def host_local_rows(x) -> np.ndarray:
    """This process's rows of a global device array (e.g. per-row scores computed on the global batch) as a
    host array; in a single-process run, simply the whole array on the host."""
    import jax

    if jax.process_count() == 1:
        return np.asarray(jax.device_get(x))
    return local_rows(host_array(x))


def _reset_for_tests() -> None:
    """Forget the cached state (the JAX runtime itself is not torn down). Tests only."""
    _STATE.clear()
