"""The sampler's platform choices (CPU-only XLA options, cache/loop layout) follow the devices of the mesh
the program is compiled for, not the host's backend ([tpu-fit] item 3)."""

import jax
import jax.numpy as jnp
import pytest
from jax.sharding import NamedSharding, PartitionSpec

from jrft.parallel import make_mesh
from jrft.sampling.generate import Sampler, _compiler_options, program_platform


def test_program_platform_on_cpu():
    assert program_platform() == "cpu"
    assert program_platform(make_mesh(data=-1)) == "cpu"
    assert program_platform(None, {"w": jnp.zeros(3)}) == "cpu"
    assert _compiler_options("cpu") == {"xla_cpu_copy_insertion_use_region_analysis": True}


def test_program_platform_of_a_tpu_topology_mesh():
    pytest.importorskip("libtpu")
    from jrft.aot import topology_devices

    mesh = make_mesh(data=-1, devices=topology_devices("v5e:2x4"))
    assert program_platform(mesh) == "tpu"
    # no mesh: the parameters' placement decides (abstract TPU parameters on a CPU host)
    w = jax.ShapeDtypeStruct((8, 4), jnp.float32, sharding=NamedSharding(mesh, PartitionSpec()))
    assert program_platform(None, {"w": w}) == "tpu"
    assert _compiler_options("tpu") is None
    sampler = Sampler(compiler_options={"xla_cpu_multi_thread_eigen": False})
    assert sampler.program("tpu") is sampler.program("tpu") is not sampler.program("cpu")


def test_generate_program_compiles_for_tpu_with_tpu_choices():
    """The tiny sampler program (prefill, KV cache, decode loop), built abstractly with the choices a TPU
    mesh gets (scan layout, unfused projections, no CPU options), compiles for v5e:2x4 from this host."""
    pytest.importorskip("libtpu")
    from flax import nnx

    from jrft.aot import abstract, chip_hbm_bytes, compile_program, topology_devices
    from jrft.models import Decoder, ModelConfig
    from jrft.models.testing import tiny_hf_config
    from jrft.parallel import state_shardings
    from jrft.sampling.generate import _Counter, _ProgramKey, _segments, _structure
    from jrft.sampling.logits import SamplingParams

    mesh = make_mesh(data=-1, devices=topology_devices("v5e:2x4"))
    cfg = ModelConfig.from_hf(tiny_hf_config("llama"))
    graphdef, state = nnx.split(nnx.eval_shape(lambda: Decoder(cfg, rngs=nnx.Rngs(0))))
    state = abstract(state, state_shardings(state, mesh))
    platform = program_platform(None, state)
    assert platform == "tpu"
    params = SamplingParams(temperature=1.0, top_p=0.9)
    key = _ProgramKey(4, 32, _segments(32), _structure(params), "bfloat16", False, "scan")
    rep, rows = NamedSharding(mesh, PartitionSpec()), NamedSharding(mesh, PartitionSpec("data"))

    def sds(shape, dtype, sharding=rep):
        return jax.ShapeDtypeStruct(shape, dtype, sharding=sharding)

    values = jax.tree.map(lambda v: sds(jnp.shape(v), jnp.asarray(v).dtype), params.dynamic_values())
    args = (
        graphdef,
        key,
        _Counter(),
        state,
        sds((8, 16), jnp.int32, rows),  # prompt tokens [B, Tp]
        sds((8, 16), jnp.int32, rows),  # prompt mask
        sds((8,), jnp.int32),  # stop ids
        values,
        sds((), jnp.int32),  # max_new_tokens
        sds((), jnp.int32),  # pad id
        sds((), jax.random.key(0).dtype),
    )
    program = Sampler().program(platform)
    report = compile_program("generate", program, args, mesh=mesh, hbm_bytes=chip_hbm_bytes(mesh))
    assert report.fits and report.argument_bytes > 0
