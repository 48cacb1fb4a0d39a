"""Ahead-of-time compilation of a jitted program for a target mesh, and a one-line memory report of it.

``compile_program`` lowers a program on abstract arguments (``ShapeDtypeStruct``s with ``NamedSharding``s,
see ``abstract``) inside ``jax.set_mesh(mesh)`` (so jrft's logical activation constraints bind), compiles
it for the mesh's devices (device-less TPU devices from ``jrft.aot.topology`` compile on any host) and
reads the compiler's per-chip ``memory_analysis()``:

    total = arguments + outputs - aliases (donated buffers reused for outputs) + temporaries + code

A program whose temporaries the TPU compiler already finds larger than HBM does not compile
("RESOURCE_EXHAUSTED: ... HLO temporaries (37.88G) exceeds available HBM (15.75G)"); that is reported as
DOES NOT FIT with the sizes the message names, not raised. A program that compiles may still not fit: its
total is compared with ``hbm_bytes``.
"""

from __future__ import annotations

import dataclasses
import os
import re
import time
from collections.abc import Callable, Sequence
from typing import Any

import jax
from jax.sharding import Mesh, Sharding

from jrft.aot.topology import GIB, available_hbm_in, parse_size
from jrft.models import kernels

EXIT_ALL_FIT = 0
EXIT_DOES_NOT_FIT = 3

_TEMPORARIES = re.compile(r"HLO temporaries\s*\(?\s*([0-9]+(?:\.[0-9]+)?)\s*([KMGT]?)i?B?")
_OUT_OF_MEMORY = re.compile(r"RESOURCE_EXHAUSTED|[Rr]an out of memory|exceeds? available HBM")
# Shardy (the default partitioner) and GSPMD spellings of jax.lax.with_sharding_constraint
_CONSTRAINT = re.compile(r"sdy\.sharding_constraint|custom_call_target=\"Sharding\"|@Sharding\b")


@dataclasses.dataclass
class ProgramReport:
    """What the compiler says one program needs per chip (bytes; one device of the mesh).

    ``fits`` is ``total_bytes <= hbm_bytes`` for a compiled program, False when the compiler refused it for
    memory; then ``error`` holds its message, ``temp_bytes`` and ``total_bytes`` the size it names (0 when
    it names none) and the other sizes are 0. ``estimate_bytes`` is the caller's own prediction, shown
    beside the compiler's figure. ``resident_bytes`` are device arrays the run holds while this program runs
    that are not its arguments (e.g. the train state during the sampler, a frozen reference during the
    step); they are counted in ``total_bytes``.
    """

    name: str
    fits: bool
    total_bytes: int
    argument_bytes: int
    output_bytes: int
    alias_bytes: int
    temp_bytes: int
    code_bytes: int
    hbm_bytes: int
    compile_s: float
    estimate_bytes: int | None = None
    error: str | None = None
    hlo_path: str | None = None
    resident_bytes: int = 0
    attention: str | None = None  # the attention implementation(s) traced into it (jrft.models.kernels)

    def describe(self) -> str:
        """One line: ``name: fits|DOES NOT FIT  total X GiB / HBM Y GiB per chip (args, temp, code;
        estimate)  compiled in S s``."""
        verdict = "fits" if self.fits else "DOES NOT FIT"
        estimate = "-" if self.estimate_bytes is None else f"{_gib(self.estimate_bytes)} GiB"
        if self.error is None:
            total = _gib(self.total_bytes)
            args, temp, code = (_gib(n) for n in (self.argument_bytes, self.temp_bytes, self.code_bytes))
            parts = f"args {args}, temp {temp}, code {code}"
            if self.resident_bytes:
                parts += f", resident {_gib(self.resident_bytes)}"
        else:  # the compiler stopped at its first check: only the size it names is known
            total = f">= {_gib(self.total_bytes)}" if self.total_bytes else "?"
            parts = f"args ?, temp {_gib(self.temp_bytes) if self.temp_bytes else '?'}, code ?"
        line = (
            f"{self.name}: {verdict}  total {total} GiB / HBM {_gib(self.hbm_bytes)} GiB per chip "
            f"({parts} GiB; estimate {estimate})  compiled in {self.compile_s:.1f} s"
        )
        if self.error is not None:
            line += f"  [{_first_line(self.error)}]"
        if self.attention is not None:
            line += f"  attention: {self.attention}"
        return line


def _gib(n: int) -> str:
    return f"{n / GIB:.2f}"


def _first_line(text: str) -> str:
    lines = [line.strip() for line in str(text).strip().splitlines() if line.strip()]
    return lines[0] if lines else ""


def abstract(tree, shardings):
    """``ShapeDtypeStruct(shape, dtype, sharding=...)`` for every leaf of ``tree`` (arrays or
    ``ShapeDtypeStruct``s), with ``shardings`` a matching pytree of ``Sharding``s or one ``Sharding`` for
    all (e.g. ``abstract(nnx.state(model), state_shardings(nnx.state(model), mesh))``)."""

    def one(x, sharding):
        return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding)

    if isinstance(shardings, Sharding):
        return jax.tree.map(lambda x: one(x, shardings), tree)
    return jax.tree.map(one, tree, shardings)


def _memory_report(name, compiled, hbm_bytes, compile_s, estimate_bytes, resident_bytes) -> ProgramReport:
    stats = compiled.memory_analysis()
    sizes = dict(
        argument_bytes=int(stats.argument_size_in_bytes),
        output_bytes=int(stats.output_size_in_bytes),
        alias_bytes=int(stats.alias_size_in_bytes),
        temp_bytes=int(stats.temp_size_in_bytes),
        code_bytes=int(stats.generated_code_size_in_bytes),
    )
    total = (
        sizes["argument_bytes"]
        + sizes["output_bytes"]
        - sizes["alias_bytes"]
        + sizes["temp_bytes"]
        + sizes["code_bytes"]
        + resident_bytes
    )
    return ProgramReport(
        name=name,
        fits=total <= hbm_bytes,
        total_bytes=total,
        hbm_bytes=int(hbm_bytes),
        compile_s=compile_s,
        estimate_bytes=estimate_bytes,
        resident_bytes=resident_bytes,
        **sizes,
    )


def _out_of_memory_report(name, error, hbm_bytes, compile_s, estimate_bytes) -> ProgramReport:
    message = str(error).strip()
    m = _TEMPORARIES.search(message)
    named = parse_size(m[1], m[2]) if m else 0
    available = available_hbm_in(message)
    return ProgramReport(
        name=name,
        fits=False,
        total_bytes=named,
        argument_bytes=0,
        output_bytes=0,
        alias_bytes=0,
        temp_bytes=named,
        code_bytes=0,
        hbm_bytes=int(hbm_bytes if hbm_bytes else available or 0),
        compile_s=compile_s,
        estimate_bytes=estimate_bytes,
        error=_first_line(message),
    )


def _dump_path(dump_dir: str, name: str) -> str:
    safe = re.sub(r"[^A-Za-z0-9_.-]+", "_", name)
    os.makedirs(dump_dir, exist_ok=True)
    return os.path.join(dump_dir, f"{safe}.hlo.txt")


def compile_program(
    name: str,
    fn: Callable,
    args: Sequence[Any],
    *,
    mesh: Mesh,
    hbm_bytes: int,
    estimate_bytes: int | None = None,
    dump_dir: str | None = None,
    in_shardings=None,
    out_shardings=None,
    donate_argnums: int | Sequence[int] = (),
    static_argnums: int | Sequence[int] = (),
    resident_bytes: int = 0,
) -> ProgramReport:
    """AOT-compiles ``fn(*args)`` for ``mesh``'s devices and reports its per-chip memory.

    Args:
      name: the program's name in the report (and the dump's file name).
      fn: a function (jitted here with the sharding / donation / static arguments below) or an already
        jitted one (anything with ``.lower``: used as is; then those arguments must stay unset).
      args: positional arguments: ``ShapeDtypeStruct``s with shardings (``abstract``), arrays, or the
        values of static arguments.
      mesh: the mesh the program runs under (lowered inside ``jax.set_mesh(mesh)``).
      hbm_bytes: usable HBM per chip (``jrft.aot.chip_hbm_bytes``).
      estimate_bytes: the caller's own per-chip estimate, shown beside the compiler's.
      dump_dir: write the optimized HLO to ``<dump_dir>/<name>.hlo.txt`` (a program the compiler refused
        has none: ``hlo_path`` stays None).
      in_shardings, out_shardings, donate_argnums, static_argnums: passed to ``jax.jit``.
      resident_bytes: per-chip bytes of device arrays held alongside the program (counted in the total).

    Returns:
      A ``ProgramReport``; ``fits=False`` (not an exception) when the compiler runs out of HBM. Other
      lowering and compile errors propagate.
    """
    if hasattr(fn, "lower"):
        unset = in_shardings is None and out_shardings is None and not donate_argnums and not static_argnums
        if not unset:
            raise ValueError(
                f"compile_program({name!r}): fn is already jitted; give shardings, donation and static "
                "arguments to its jax.jit instead"
            )
        jitted = fn
    else:
        options: dict[str, Any] = dict(donate_argnums=donate_argnums, static_argnums=static_argnums)
        if in_shardings is not None:
            options["in_shardings"] = in_shardings
        if out_shardings is not None:
            options["out_shardings"] = out_shardings
        jitted = jax.jit(fn, **options)
    start = time.perf_counter()
    with jax.set_mesh(mesh), kernels.recording() as attention:
        lowered = jitted.lower(*args)
        try:
            compiled = lowered.compile()
        except jax.errors.JaxRuntimeError as e:
            if not _OUT_OF_MEMORY.search(str(e)):
                raise
            report = _out_of_memory_report(name, e, hbm_bytes, time.perf_counter() - start, estimate_bytes)
            report.attention = kernels.describe(attention)
            return report
    seconds = time.perf_counter() - start
    report = _memory_report(name, compiled, hbm_bytes, seconds, estimate_bytes, resident_bytes)
    report.attention = kernels.describe(attention)
    if dump_dir is not None:
        report.hlo_path = _dump_path(dump_dir, name)
        with open(report.hlo_path, "w") as f:
            f.write(compiled.as_text())
    return report


def count_sharding_constraints(lowered) -> int:
    """How many sharding constraints (``with_sharding_constraint`` / jrft's ``with_logical_constraint``) a
    lowered program holds: ``sdy.sharding_constraint`` ops (Shardy) or ``Sharding`` custom calls (GSPMD).

    Args:
      lowered: a ``jax.stages.Lowered`` (``jax.jit(f).lower(...)``) or its text.

    A program lowered outside ``jax.set_mesh(mesh)`` has none of jrft's logical constraints: they return
    early without a mesh, and activations are then replicated.
    """
    text = lowered if isinstance(lowered, str) else lowered.as_text()
    return len(_CONSTRAINT.findall(text))


def format_reports(reports: Sequence[ProgramReport]) -> str:
    """One ``describe()`` line per program, then a summary line."""
    lines = [r.describe() for r in reports]
    bad = [r.name for r in reports if not r.fits]
    if bad:
        lines.append(f"{len(bad)} of {len(reports)} programs DO NOT FIT: {', '.join(bad)}")
    else:
        lines.append(f"all {len(reports)} programs fit")
    return "\n".join(lines)


def exit_code(reports: Sequence[ProgramReport]) -> int:
    """0 when every program fits, 3 when any does not (``jrft compile``'s exit status)."""
    return EXIT_ALL_FIT if all(r.fits for r in reports) else EXIT_DOES_NOT_FIT
