"""resolve_settings: where jax.distributed's settings come from (arguments, JRFT_* env, SLURM, TPU)."""

import logging

import pytest

from jrft.parallel import distributed as dist
from jrft.parallel.distributed import DistributedSettings, resolve_settings

SLURM_4 = {
    "SLURM_JOB_ID": "1234",
    "SLURM_STEP_NODELIST": "gpu[001-002]",
    "SLURM_NTASKS": "4",
    "SLURM_PROCID": "3",
    "SLURM_LOCALID": "1",
}


@pytest.fixture(autouse=True)
def no_tpu(monkeypatch, tmp_path):
    # Whatever machine runs the tests: an empty PCI bus unless a test adds devices.
    monkeypatch.setattr(dist, "_PCI_DEVICES", str(tmp_path / "pci"))


def add_pci_device(tmp_path, slot: str, vendor: str, device: str) -> None:
    d = tmp_path / "pci" / slot
    d.mkdir(parents=True)
    (d / "vendor").write_text(vendor + "\n")
    (d / "device").write_text(device + "\n")


def test_nothing_set_is_single_process_noop():
    s = resolve_settings(environ={})
    assert s == DistributedSettings("single")
    assert s.is_noop


def test_explicit_arguments():
    s = resolve_settings("10.0.0.1:1234", 2, 1, environ={})
    assert s == DistributedSettings("explicit", "10.0.0.1:1234", 2, 1, None)


def test_explicit_from_env_with_device_ids():
    env = {
        "JRFT_COORDINATOR_ADDRESS": "host-0:8476",
        "JRFT_NUM_PROCESSES": "4",
        "JRFT_PROCESS_ID": "2",
        "JRFT_LOCAL_DEVICE_IDS": "0, 1,2,3",
    }
    s = resolve_settings(environ=env)
    assert s == DistributedSettings("explicit", "host-0:8476", 4, 2, (0, 1, 2, 3))


def test_argument_and_env_agreeing_is_fine_disagreeing_is_an_error():
    env = {"JRFT_NUM_PROCESSES": "2", "JRFT_PROCESS_ID": "0", "JRFT_COORDINATOR_ADDRESS": "h:1"}
    assert resolve_settings(num_processes=2, environ=env).num_processes == 2
    with pytest.raises(ValueError, match=r"num_processes=4 but environment JRFT_NUM_PROCESSES='?2"):
        resolve_settings(num_processes=4, environ=env)


@pytest.mark.parametrize(
    "kwargs, env, match",
    [
        ({"num_processes": 2, "process_id": 2, "coordinator_address": "h:1"}, {}, "out of range"),
        ({"num_processes": 0}, {}, "num_processes must be >= 1"),
        ({"coordinator_address": "no-port"}, {}, "host:port"),
        ({}, {"JRFT_NUM_PROCESSES": "two"}, "JRFT_NUM_PROCESSES must be an integer"),
        ({}, {"JRFT_LOCAL_DEVICE_IDS": "0;1"}, "JRFT_LOCAL_DEVICE_IDS must be comma-separated"),
        ({"num_processes": 2}, {}, r"missing coordinator_address \(JRFT_COORDINATOR_ADDRESS\), process_id"),
        ({}, {"JRFT_DISTRIBUTED": "mpi"}, "JRFT_DISTRIBUTED must be one of"),
        ({}, {"JRFT_DISTRIBUTED": "slurm"}, "no slurm cluster was detected"),
        ({"num_processes": 1, "process_id": 1}, {}, "out of range"),
    ],
)
def test_inconsistent_settings_raise_clear_errors(kwargs, env, match):
    with pytest.raises(ValueError, match=match):
        resolve_settings(**kwargs, environ=env)


def test_one_process_is_a_noop_even_with_an_address():
    assert resolve_settings("h:1", 1, 0, environ={}).is_noop


def test_slurm_detected_and_cross_checked():
    s = resolve_settings(environ=SLURM_4)
    assert s == DistributedSettings("slurm", None, 4, 3, None)
    # An explicit coordinator (the sbatch script exports one) and per-node device ids pass through.
    env = {**SLURM_4, "JRFT_COORDINATOR_ADDRESS": "gpu001:29500", "JRFT_LOCAL_DEVICE_IDS": "0,1,2,3,4,5,6,7"}
    s = resolve_settings(environ=env)
    assert s.coordinator_address == "gpu001:29500" and s.local_device_ids == tuple(range(8))
    with pytest.raises(ValueError, match="disagrees with SLURM_NTASKS=4"):
        resolve_settings(num_processes=8, environ=SLURM_4)
    with pytest.raises(ValueError, match="disagrees with SLURM_PROCID=3"):
        resolve_settings(process_id=0, environ=SLURM_4)


def test_single_task_slurm_and_off_are_noops():
    assert resolve_settings(environ={**SLURM_4, "SLURM_NTASKS": "1", "SLURM_PROCID": "0"}).is_noop
    assert resolve_settings(environ={**SLURM_4, "JRFT_DISTRIBUTED": "off"}).is_noop
    # sbatch's batch step without srun lacks SLURM_STEP_NODELIST: not a multi-process step.
    env = {k: v for k, v in SLURM_4.items() if k != "SLURM_STEP_NODELIST"}
    assert resolve_settings(environ=env).is_noop


def test_tpu_vm_detected_from_pci_chips(tmp_path):
    add_pci_device(tmp_path, "0000:00:04.0", "0x1ae0", "0x0042")  # Google's virtual NIC: not a TPU
    add_pci_device(tmp_path, "0000:00:05.0", "0x10de", "0x2330")  # an NVIDIA GPU
    assert resolve_settings(environ={}).is_noop
    add_pci_device(tmp_path, "0000:00:06.0", "0x1ae0", "0x0063")  # a TPU v5e chip
    assert resolve_settings(environ={}) == DistributedSettings("tpu")
    assert resolve_settings(num_processes=4, environ={}) == DistributedSettings("tpu", num_processes=4)
    # Complete explicit settings need no detection, even on a TPU VM.
    assert resolve_settings("h:1", 2, 1, environ={}).cluster == "explicit"


def test_tpu_leaves_the_rest_to_jax():
    env = {"TPU_WORKER_HOSTNAMES": "w0,w1,w2,w3"}
    assert resolve_settings(environ=env) == DistributedSettings("tpu")
    assert resolve_settings(environ={**env, "JRFT_DISTRIBUTED": "tpu"}).cluster == "tpu"
    with pytest.raises(ValueError, match="no tpu cluster was detected"):
        resolve_settings(environ={"JRFT_DISTRIBUTED": "tpu"})


def test_is_main_process_before_initialisation_reads_the_environment(monkeypatch):
    dist._reset_for_tests()
    for var in ("JRFT_PROCESS_ID", "SLURM_PROCID", "TPU_WORKER_ID"):
        monkeypatch.delenv(var, raising=False)
    assert dist.is_main_process()
    monkeypatch.setenv("SLURM_PROCID", "3")
    assert not dist.is_main_process()
    monkeypatch.setenv("JRFT_PROCESS_ID", "0")  # checked first
    assert dist.is_main_process()
    monkeypatch.setenv("JRFT_PROCESS_ID", "1")
    assert not dist.MainProcessFilter().filter(logging.makeLogRecord({"msg": "x"}))


def test_single_process_runtime_and_main_process_logging(caplog):
    # In the test process (8 fake CPU devices, one process) initialisation is a no-op.
    dist._reset_for_tests()
    try:
        info = dist.initialize_distributed()
        assert (info.num_processes, info.process_id, info.cluster) == (1, 0, "single")
        assert info.global_device_count == info.local_device_count >= 1
        assert dist.initialize_distributed() is info  # idempotent
        with pytest.raises(ValueError, match="already called"):
            dist.initialize_distributed("127.0.0.1:1", 2, 0)
        assert dist.is_main_process()
        with caplog.at_level(logging.INFO, logger="jrft.parallel.distributed"):
            dist.log_on_main("hello %d", 7)
        assert "hello 7" in caplog.text
        assert dist.MainProcessFilter().filter(logging.makeLogRecord({"msg": "x"}))
    finally:
        dist._reset_for_tests()
