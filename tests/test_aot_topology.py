"""jrft.aot.topology: TPU topology names, device-less devices and the compiler's HBM per chip (needs libtpu,
the ``jax[tpu]`` extra; no TPU)."""

import jax
import pytest

pytest.importorskip("libtpu")

from jrft.aot import chip_hbm_bytes, parse_topology, topology_devices  # noqa: E402
from jrft.aot.topology import COMPILER_HBM_GIB, GIB, available_hbm_in  # noqa: E402


@pytest.mark.parametrize(
    "name, canonical",
    [
        ("v5e:2x4", "v5e:2x4"),
        ("v5p:2x2x1", "v5p:2x2x1"),
        ("v6e:2x4", "v6e:2x4"),
        ("v4:2x2x1", "v4:2x2x1"),
        ("  V5E:2X4 ", "v5e:2x4"),
        ("v5e-8", "v5e:2x4"),  # v5e / v6e: N chips
        ("v6e-8", "v6e:2x4"),
        ("v5litepod-16", "v5e:4x4"),
        ("v5e-1", "v5e:1x1"),
        ("v5e-4", "v5e:2x2"),
        ("v5e-32", "v5e:4x8"),
        ("v5p-8", "v5p:2x2x1"),  # v4 / v5p: N TensorCores, 2 per chip
        ("v4-8", "v4:2x2x1"),
        ("v5p-16", "v5p:2x2x2"),
        ("v5p-32", "v5p:2x2x4"),
        ("v5p-64", "v5p:2x4x4"),
        ("v5p-128", "v5p:4x4x4"),
    ],
)
def test_parse_topology(name, canonical):
    assert parse_topology(name) == canonical


@pytest.mark.parametrize(
    "name", ["v5e", "v5e-3", "v5e-0", "v5p-2", "v5p-12", "v7-8", "v5e:2x2x1", "v4:2x2", "v5e:0x4", "", "tpu"]
)
def test_parse_topology_rejects_bad_names_in_one_line(name):
    with pytest.raises(ValueError, match="accepted: v5e:AxB") as info:
        parse_topology(name)
    assert "\n" not in str(info.value)


@pytest.mark.parametrize(
    "name, count, kind",
    [
        ("v5e:2x4", 8, "TPU v5 lite"),
        ("v6e-8", 8, "TPU v6 lite"),
        ("v5p-8", 4, "TPU v5"),
        ("v4-8", 4, "TPU v4"),  # megacore: one device per chip, as on a TPU VM
        ("v5e-1", 1, "TPU v5 lite"),
    ],
)
def test_topology_devices(name, count, kind):
    devices = topology_devices(name)
    assert len(devices) == count
    assert {d.platform for d in devices} == {"tpu"}
    assert {d.device_kind for d in devices} == {kind}
    assert topology_devices(name) == devices  # cached: the same device objects


def test_topology_libtpu_rejection_is_a_value_error():
    with pytest.raises(ValueError, match="libtpu says"):
        topology_devices("v5e:3x3")  # well-formed, but not a shape libtpu builds


@pytest.mark.parametrize(
    "name, gen", [("v5e:2x4", "v5e"), ("v5p:2x2x1", "v5p"), ("v6e:2x4", "v6e"), ("v4-8", "v4")]
)
def test_chip_hbm_bytes_is_the_compilers_figure(name, gen):
    hbm = chip_hbm_bytes(name)
    assert abs(hbm / GIB - COMPILER_HBM_GIB[gen]) < 0.01
    assert chip_hbm_bytes(topology_devices(name)) == hbm


def test_chip_hbm_bytes_refuses_cpu_devices():
    with pytest.raises(ValueError, match="cpu"):
        chip_hbm_bytes(jax.devices("cpu"))


def test_available_hbm_in_parses_both_message_forms():
    new = "RESOURCE_EXHAUSTED: ... HLO temporaries (256.00G) exceeds available HBM (15.75G)."
    old = "HLO temporaries 37.88G exceed available HBM 15.75G"
    assert available_hbm_in(new) == available_hbm_in(old) == int(15.75 * GIB)
    assert available_hbm_in("something else") is None
