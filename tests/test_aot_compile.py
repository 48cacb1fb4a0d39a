"""jrft.aot.compile: AOT-compile programs for TPU topologies from this host and read the compiler's per-chip
memory; sharding constraints counted in lowered programs (needs libtpu for the TPU cases; no TPU)."""

import importlib.util
import re

import jax
import jax.numpy as jnp
import pytest
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

from jrft.aot import (
    ProgramReport,
    abstract,
    compile_program,
    count_sharding_constraints,
    exit_code,
    format_reports,
)
from jrft.models import Decoder, ModelConfig
from jrft.models.testing import tiny_hf_config
from jrft.parallel import logical_to_spec, make_mesh, state_shardings

needs_libtpu = pytest.mark.skipif(
    importlib.util.find_spec("libtpu") is None, reason="needs libtpu (the jax[tpu] extra)"
)
LINE = re.compile(
    r"^\S+: (fits|DOES NOT FIT)  total (>= )?\d+\.\d\d GiB / HBM \d+\.\d\d GiB per chip "
    r"\(args \S+, temp \S+, code \S+ GiB; estimate (-|\d+\.\d\d GiB)\)  compiled in \d+\.\d s"
)


def _tpu_mesh(name):
    from jrft.aot import topology_devices

    devices = topology_devices(name)
    return make_mesh(data=-1, fsdp=2, devices=devices)


def _matmul_reduce(x, w):
    return jnp.sum(jnp.tanh(x @ w), axis=-1)  # [B]


def _matmul_args(mesh):
    x = jax.ShapeDtypeStruct((64, 256), jnp.float32)
    w = jax.ShapeDtypeStruct((256, 512), jnp.float32)
    return (
        abstract(x, NamedSharding(mesh, PartitionSpec(("data", "fsdp")))),
        abstract(w, NamedSharding(mesh, PartitionSpec(None, "fsdp"))),
    )


@needs_libtpu
@pytest.mark.parametrize("topology", ["v5e:2x4", "v5p:2x2x1"])
def test_compile_sharded_program_for_tpu(topology, tmp_path):
    from jrft.aot import chip_hbm_bytes

    mesh = _tpu_mesh(topology)
    hbm = chip_hbm_bytes(mesh)
    report = compile_program(
        "matmul_reduce",
        _matmul_reduce,
        _matmul_args(mesh),
        mesh=mesh,
        hbm_bytes=hbm,
        estimate_bytes=123_456,
        dump_dir=str(tmp_path),
    )
    assert report.fits and report.error is None
    assert report.hbm_bytes == hbm and report.estimate_bytes == 123_456
    n = mesh.devices.size
    b, d, f = 64, 256, 512  # per chip: x [B/n, D] and w [D, F/2] float32 (fsdp=2)
    assert report.argument_bytes >= 4 * (b // n * d + d * f // 2)
    assert report.output_bytes > 0 and report.code_bytes > 0 and report.compile_s > 0
    assert report.temp_bytes >= 0 and report.alias_bytes == 0
    assert report.total_bytes == (
        report.argument_bytes
        + report.output_bytes
        - report.alias_bytes
        + report.temp_bytes
        + report.code_bytes
    )
    assert LINE.match(report.describe()), report.describe()
    hlo = (tmp_path / "matmul_reduce.hlo.txt").read_text()
    assert report.hlo_path == str(tmp_path / "matmul_reduce.hlo.txt")
    assert "ENTRY" in hlo and re.search(r"\b(convolution|dot)\(", hlo)
    assert exit_code([report]) == 0


@needs_libtpu
def test_donated_argument_is_an_alias():
    mesh = _tpu_mesh("v5e:2x4")
    x, _ = _matmul_args(mesh)
    report = compile_program("scale", lambda x: x * 2.0, (x,), mesh=mesh, hbm_bytes=2**34, donate_argnums=0)
    assert report.alias_bytes == report.output_bytes > 0
    assert report.total_bytes == report.argument_bytes + report.temp_bytes + report.code_bytes


@needs_libtpu
def test_already_jitted_function_is_used_as_is():
    mesh = _tpu_mesh("v5p:2x2x1")
    args = _matmul_args(mesh)
    out = NamedSharding(mesh, PartitionSpec())
    jitted = jax.jit(_matmul_reduce, out_shardings=out)
    report = compile_program("jitted", jitted, args, mesh=mesh, hbm_bytes=2**34)
    assert report.fits and report.output_bytes >= 64 * 4  # replicated [64] float32 (TPU pads to 512 bytes)
    with pytest.raises(ValueError, match="already jitted"):
        compile_program("jitted", jitted, args, mesh=mesh, hbm_bytes=2**34, out_shardings=out)


@needs_libtpu
def test_temporaries_over_hbm_are_reported_not_raised():
    from jrft.aot import chip_hbm_bytes

    mesh = _tpu_mesh("v5e:2x4")
    x = abstract(jax.ShapeDtypeStruct((2**17,), jnp.float32), NamedSharding(mesh, PartitionSpec()))

    def huge(x):  # [2^17, 2^17] float32 = 64 GiB kept whole
        return jax.lax.optimization_barrier(jnp.outer(x, x)).sum()

    hbm = chip_hbm_bytes(mesh)
    report = compile_program("huge", huge, (x,), mesh=mesh, hbm_bytes=hbm, estimate_bytes=2**30)
    assert not report.fits
    assert report.temp_bytes == report.total_bytes >= 64 * 2**30
    assert "available HBM" in report.error and "\n" not in report.error
    line = report.describe()
    assert LINE.match(line) and "DOES NOT FIT" in line and "estimate 1.00 GiB" in line, line
    assert exit_code([report]) == 3


@needs_libtpu
def test_compiled_total_over_hbm_does_not_fit():
    mesh = _tpu_mesh("v5e:2x4")
    report = compile_program("tight", _matmul_reduce, _matmul_args(mesh), mesh=mesh, hbm_bytes=1024)
    assert report.error is None and not report.fits and report.total_bytes > 1024


def test_other_errors_propagate():
    mesh = make_mesh(data=-1)
    x = jax.ShapeDtypeStruct((4, 3), jnp.float32)
    with pytest.raises(TypeError):
        compile_program("bad", lambda x: x @ x, (x,), mesh=mesh, hbm_bytes=2**30)


def test_abstract_takes_one_sharding_or_a_matching_tree():
    mesh = make_mesh(data=-1)
    rep, rows = NamedSharding(mesh, PartitionSpec()), NamedSharding(mesh, PartitionSpec("data"))
    tree = {"a": jnp.zeros((8, 2), jnp.bfloat16), "b": jax.ShapeDtypeStruct((8,), jnp.int32)}
    one = abstract(tree, rep)
    assert one["a"] == jax.ShapeDtypeStruct((8, 2), jnp.bfloat16, sharding=rep)
    assert one["b"].sharding == rep and one["b"].dtype == jnp.int32
    both = abstract(tree, {"a": rows, "b": rep})
    assert both["a"].sharding == rows and both["b"].sharding == rep


def _report(name, fits):
    return ProgramReport(name, fits, 3 * 2**30, 2**30, 0, 0, 2**30, 2**30, 16 * 2**30, 1.5)


def test_format_reports_and_exit_code():
    ok, bad = _report("a", True), _report("b", False)
    assert exit_code([ok]) == 0 and exit_code([ok, bad]) == 3
    lines = format_reports([ok, bad]).splitlines()
    assert lines[0] == (
        "a: fits  total 3.00 GiB / HBM 16.00 GiB per chip (args 1.00, temp 1.00, code 1.00 GiB; "
        "estimate -)  compiled in 1.5 s"
    )
    assert lines[1].startswith("b: DOES NOT FIT  total 3.00 GiB")
    assert lines[-1] == "1 of 2 programs DO NOT FIT: b"
    assert format_reports([ok]).splitlines()[-1] == "all 1 programs fit"


def _tiny_forward(mesh):
    """A tiny Decoder's forward pass, its abstract sharded state and a sharded token batch."""
    cfg = ModelConfig.from_hf(tiny_hf_config("llama"))
    model = nnx.eval_shape(lambda: Decoder(cfg, rngs=nnx.Rngs(0)))
    graphdef, state = nnx.split(model)
    state = abstract(state, state_shardings(state, mesh))
    shape = (8, 16)
    tokens = abstract(
        jax.ShapeDtypeStruct(shape, jnp.int32),
        NamedSharding(mesh, logical_to_spec(("batch", "seq"), shape, mesh)),
    )

    def forward(state, tokens):
        return nnx.merge(graphdef, state)(tokens)  # [B, T, V]

    return jax.jit(forward), (state, tokens)


def test_logical_constraints_bind_only_under_the_mesh():
    """The fact behind the [tpu-fit] issue: jrft's logical activation constraints are dropped (and
    activations replicated) unless the program is lowered inside ``jax.set_mesh(mesh)``."""
    if jax.device_count() < 8:
        pytest.skip("needs 8 devices (XLA_FLAGS=--xla_force_host_platform_device_count=8)")
    mesh = make_mesh(data=2, fsdp=2, tensor=2)
    forward, args = _tiny_forward(mesh)
    outside = forward.lower(*args)
    with jax.set_mesh(mesh):
        inside = forward.lower(*args)
    assert count_sharding_constraints(outside) == 0
    assert count_sharding_constraints(inside) >= 3  # embeddings, per-layer activations, logits
    assert count_sharding_constraints(inside.as_text()) == count_sharding_constraints(inside)


@needs_libtpu
def test_tiny_decoder_forward_compiles_for_v5e():
    from jrft.aot import chip_hbm_bytes

    mesh = make_mesh(data=2, fsdp=2, tensor=2, devices=_tpu_mesh("v5e:2x4").devices.flat)
    forward, args = _tiny_forward(mesh)
    report = compile_program("forward", forward, args, mesh=mesh, hbm_bytes=chip_hbm_bytes(mesh))
    assert report.fits and report.argument_bytes > 0 and report.output_bytes > 0
