"""A real two-process JAX run on loopback: jax.distributed over 127.0.0.1, 4 CPU devices per process.

Each process joins through ``initialize_distributed`` (process 0 by arguments, process 1 by JRFT_* environment
variables), builds the global (2, 4) mesh over all 8 devices and checks a sharded matmul, a psum across both
processes, ``process_allgather`` and ``gather_lists`` (ragged rows) against NumPy. The worker writes its
results as JSON; the test compares.
"""

import json
import os
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]

WORKER = textwrap.dedent(
    """
    import json, sys
    import jax
    jax.config.update("jax_num_cpu_devices", 4)  # before anything touches the backend
    import jax.numpy as jnp
    import numpy as np
    from jax.experimental import multihost_utils
    from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
    from jrft.parallel.distributed import gather_lists, initialize_distributed, is_main_process

    pid, port, out, mode = int(sys.argv[1]), sys.argv[2], sys.argv[3], sys.argv[4]
    pre_main = is_main_process()  # before initialisation: must not start the backend
    if mode == "explicit" and pid == 0:
        info = initialize_distributed(f"127.0.0.1:{port}", num_processes=2, process_id=0)
    else:
        info = initialize_distributed()  # from the JRFT_* or SLURM_* environment variables
    again = initialize_distributed()

    mesh = Mesh(np.array(jax.devices()).reshape(2, 4), ("data", "model"))
    x_np = np.arange(8 * 6, dtype=np.float32).reshape(8, 6) / 10.0
    w_np = np.cos(np.arange(6 * 8, dtype=np.float32)).reshape(6, 8)

    def global_array(a, spec):
        sharding = NamedSharding(mesh, spec)
        return jax.make_array_from_callback(a.shape, sharding, lambda idx: a[idx])

    x = global_array(x_np, P("data", None))
    w = global_array(w_np, P(None, "model"))
    y = jax.jit(lambda a, b: a @ b, out_shardings=NamedSharding(mesh, P("data", "model")))(x, w)
    y_all = multihost_utils.process_allgather(y, tiled=True)

    # psum over the whole mesh: each device holds one value (its global index); every device gets the sum.
    v = global_array(np.arange(8, dtype=np.float32).reshape(2, 4), P("data", "model"))
    total = jax.jit(jax.shard_map(lambda b: jax.lax.psum(b, ("data", "model")), mesh=mesh,
                                  in_specs=P("data", "model"), out_specs=P("data", "model")))(v)
    local_totals = [float(s.data.reshape(-1)[0]) for s in total.addressable_shards]

    gathered = multihost_utils.process_allgather(jnp.array([jax.process_index(), 10 + jax.process_index()]))
    ragged = gather_lists([[pid] * (1 + 2 * pid), []])  # token rows of different lengths per process
    with open(out, "w") as f:
        json.dump({
            "process_id": info.process_id, "num_processes": info.num_processes, "cluster": info.cluster,
            "local_devices": info.local_device_count, "global_devices": info.global_device_count,
            "idempotent": again is info, "is_main": is_main_process(), "pre_main": pre_main,
            "y": np.asarray(y_all).tolist(), "psum": local_totals, "gathered": np.asarray(gathered).tolist(),
            "n_addressable": len(y.addressable_shards), "ragged": ragged,
        }, f)
    """
)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env(mode: str, pid: int, port: int) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("JRFT_", "SLURM_", "TPU_"))}
    env.update(XLA_FLAGS="", JAX_PLATFORMS="cpu", PYTHONPATH=str(REPO))  # not conftest's 8 devices
    if mode == "explicit" and pid == 1:
        env.update(JRFT_COORDINATOR_ADDRESS=f"127.0.0.1:{port}", JRFT_NUM_PROCESSES="2", JRFT_PROCESS_ID="1")
    if mode == "slurm":  # what srun sets for a 2-task step on one node; JAX derives the coordinator
        env.update(
            SLURM_JOB_ID="4242",
            SLURM_STEP_NODELIST="127.0.0.1",
            SLURM_NTASKS="2",
            SLURM_PROCID=str(pid),
            SLURM_LOCALID=str(pid),
            JAX_COORDINATOR_PORT=str(port),
        )
    return env


@pytest.mark.parametrize("mode", ["explicit", "slurm"])
def test_two_process_loopback(tmp_path, mode):
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    port = _free_port()
    procs, logs = [], []
    try:
        for pid in range(2):
            cmd = [sys.executable, str(script), str(pid), str(port), str(tmp_path / f"out{pid}.json"), mode]
            logs.append(open(tmp_path / f"log{pid}.txt", "w"))
            env = _env(mode, pid, port)
            procs.append(subprocess.Popen(cmd, env=env, stdout=logs[-1], stderr=subprocess.STDOUT))
        deadline = time.monotonic() + 60
        for p in procs:
            p.wait(timeout=max(1.0, deadline - time.monotonic()))
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()  # a hung peer (e.g. a port clash) must not outlive the test
                p.wait()
        for f in logs:
            f.close()
    output = "\n---\n".join((tmp_path / f"log{i}.txt").read_text() for i in range(len(procs)))
    assert [p.returncode for p in procs] == [0, 0], output

    expected_y = (np.arange(48, dtype=np.float32).reshape(8, 6) / 10.0) @ np.cos(
        np.arange(48, dtype=np.float32)
    ).reshape(6, 8)
    for pid in range(2):
        r = json.loads((tmp_path / f"out{pid}.json").read_text())
        assert r["process_id"] == pid and r["num_processes"] == 2 and r["cluster"] == mode
        assert (r["local_devices"], r["global_devices"], r["n_addressable"]) == (4, 8, 4)
        assert r["idempotent"] and r["is_main"] == r["pre_main"] == (pid == 0)
        np.testing.assert_allclose(np.array(r["y"]), expected_y, rtol=1e-5, atol=1e-5)
        assert r["psum"] == [28.0] * 4
        assert r["gathered"] == [[0, 10], [1, 11]]
        assert r["ragged"] == [[0], [], [1, 1, 1], []]
