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
    from jrft.train.runs.setup import estimate_for

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
    reports = []
    for program in run_programs(config, model_cfg, mesh):
        program.estimate_bytes = _estimate(config, model_cfg, shape, program.name, estimate_for)
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


def _estimate(config, model_cfg, mesh_shape, name: str, estimate_for) -> int | None:
    """jrft's own per-chip estimate (``jrft.parallel.memory``) for the program ``name``: the run's estimate
    without the KV cache for train steps and updates; for the sampler the train state it runs beside, the
    KV cache, the reference and the weights gathered whole for decoding (XLA hoists the fsdp all-gather out
    of the decode loop: measured on Llama-3-1B, v5e:2x4); None for forward-only programs, which the
    estimator does not model."""
    import jax.numpy as jnp

    kind = name.split("/")[-1]
    if config.objective in ("grpo", "ppo"):
        c = getattr(config, config.objective)
        rows = config.train.batch_size * getattr(c, "num_generations", 1)
        cache_len = config.data.max_prompt_length + c.max_new_tokens
        est = estimate_for(
            config,
            model_cfg,
            mesh_shape,
            rows=rows // c.num_mini_batches,
            cache_rows=rows,
            cache_len=cache_len,
            seq_len=cache_len,  # rollout rows: prompt then completion
            platform="tpu",
        )
        if kind == "generate":  # the train state stays; decoding gathers every weight once (fsdp > 1)
            gathered = model_cfg.num_params * jnp.dtype(config.model.dtype).itemsize // mesh_shape[2]
            gathered = gathered if mesh_shape[1] * mesh_shape[2] > 1 else 0
            return est.params + est.optimizer + est.reference + est.kv_cache + gathered
        return est.total - est.kv_cache if kind.endswith("update") else None
    if kind != "train_step":
        return None
    return estimate_for(config, model_cfg, mesh_shape, rows=config.train.batch_size, platform="tpu").total
