"""jrft.aot: compile jrft's programs ahead of time for a TPU topology from any host (no TPU needed) and
report whether each fits in a chip's HBM."""

from jrft.aot.compile import ProgramReport as ProgramReport
from jrft.aot.compile import abstract as abstract
from jrft.aot.compile import compile_program as compile_program
from jrft.aot.compile import count_sharding_constraints as count_sharding_constraints
from jrft.aot.compile import exit_code as exit_code
from jrft.aot.compile import format_reports as format_reports
from jrft.aot.topology import chip_hbm_bytes as chip_hbm_bytes
from jrft.aot.topology import parse_topology as parse_topology
from jrft.aot.topology import topology_devices as topology_devices
