"""``jrft compile OBJECTIVE CONFIG [key=value ...] --topology NAME``: compile a run's programs for a TPU
topology from any machine and say whether each fits.

The programs are built abstractly from the config and the model's ``config.json`` (``model.path`` may also
be a preset: ``llama3-1b``, ``llama3-8b``, ``qwen2.5-7b``, ...), with the config's mesh over the topology's
chips, and compiled by the real TPU compiler (libtpu: ``pip install 'jax[tpu]'``). One line per program:
fits / DOES NOT FIT, the per-chip total against the chip's HBM (arguments, temporaries, code, and device
arrays the run holds alongside), jrft's estimate, compile seconds.

Exit status: 0 all fit, 3 any does not, 2 bad input.
"""

from __future__ import annotations

import argparse
import sys


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="jrft compile", description=__doc__.splitlines()[0])
    parser.add_argument("objective", help="sft | reward | dpo | grpo")
    parser.add_argument("config", help="YAML run config (see configs/)")
    parser.add_argument("overrides", nargs="*", help="key=value overrides, e.g. train.batch_size=64")
    parser.add_argument("--topology", required=True, help="e.g. v5e:2x4, v5e-8, v5p:2x2x1, v6e:2x4, v4:2x2x1")
    parser.add_argument("--dump", default=None, help="write each program's optimized HLO to this directory")
    return parser


def main(argv: list[str]) -> int:
    args = _parser().parse_args(argv)
    from jrft.config import ConfigError, load_config

    try:
        config = load_config(args.config, [*args.overrides, f"objective={args.objective}"])
        reports = compile_run(config, args.topology, dump_dir=args.dump, log=print)
    except (ConfigError, ValueError, NotImplementedError, FileNotFoundError) as e:
        print(f"jrft compile: {e}", file=sys.stderr)
        return 2
    from jrft.aot import exit_code, format_reports

    print(format_reports(reports).splitlines()[-1])
    return exit_code(reports)


def compile_run(config, topology: str, *, dump_dir: str | None = None, log=lambda line: None):
    """Compiles every program of a run of ``config`` for ``topology``; returns the ``ProgramReport``s (each
    also passed to ``log`` as its one-line description as soon as it is compiled)."""
    from jrft.aot import chip_hbm_bytes, compile_program, parse_topology, topology_devices
    from jrft.aot.presets import model_config
    from jrft.aot.programs import run_programs
    from jrft.parallel import make_mesh
    from jrft.train.runs.setup import run_estimates

    name = parse_topology(topology)
    devices = topology_devices(name)
    m = config.mesh
    mesh = make_mesh(data=m.data, fsdp=m.fsdp, tensor=m.tensor, devices=devices)
    hbm = chip_hbm_bytes(devices)
    model_cfg = model_config(config.model.path)
    shape = [mesh.shape[a] for a in ("data", "fsdp", "tensor")]
    log(
        f"jrft compile: {config.objective} on {name} ({len(devices)} chips, {hbm / 2**30:.2f} GiB HBM each), "
        f"mesh data={shape[0]} fsdp={shape[1]} tensor={shape[2]}, {model_cfg.num_params / 1e9:.2f}B params"
    )
    estimates = run_estimates(config, model_cfg, shape, platform="tpu", hbm_bytes=hbm)
    reports = []
    for program in run_programs(config, model_cfg, mesh):
        program.estimate_bytes = _estimate(estimates, program.name)
        report = compile_program(
            program.name,
            program.fn,
            program.args,
            mesh=mesh,
            hbm_bytes=hbm,
            estimate_bytes=program.estimate_bytes,
            dump_dir=dump_dir,
            resident_bytes=program.resident_bytes,
        )
        log(report.describe())
        reports.append(report)
    return reports


def _estimate(estimates: dict, name: str) -> int | None:
    """jrft's estimate for the program ``name`` from ``run_estimates``: the step's for train steps and
    updates, the sampler's for the sampler, None for forward-only programs (the estimator does not model
    them)."""
    kind = name.split("/")[-1]
    if kind == "generate":
        return estimates.get("sampler")
    if kind == "train_step" or kind.endswith("update"):
        return estimates["step"].total
    return None
