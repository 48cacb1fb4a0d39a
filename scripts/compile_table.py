"""The compiled-vs-estimated memory table of the README: each case's programs AOT-compiled for a TPU
topology from this machine (``jrft compile``'s machinery) beside jrft's own estimate.

    .venv/bin/python scripts/compile_table.py                 # every case (~1 h on a 2-core CPU host)
    .venv/bin/python scripts/compile_table.py --only 1b-sft   # cases whose name contains the string

Prints one markdown row per program: case, program, compiled total per chip, estimate, estimate/compiled,
fits. Cases are Llama-3 shapes (presets), bf16 compute, batch x 2048 tokens unless the case says otherwise.
"""

from __future__ import annotations

import argparse
import os
import time

BASE = ["model.dtype=bfloat16", "data.max_length=2048", "data.buckets=64"]
SFT = ["objective=sft", *BASE]
FSDP8 = ["mesh.data=1", "mesh.fsdp=8", "mesh.tensor=1"]
FSDP4 = ["mesh.data=1", "mesh.fsdp=4", "mesh.tensor=1"]
GRPO = [
    "objective=grpo",
    *BASE,
    "data.max_prompt_length=256",
    "grpo.max_new_tokens=1024",
    "grpo.num_generations=8",
    "grpo.reward_functions=[{name: accuracy}]",
]

# name -> (topology, overrides)
CASES = {
    "1b-sft-fp32-chunk0-full": (
        "v5e:2x4",
        [*SFT, *FSDP8, "model.path=llama3-1b", "model.remat=full", "train.batch_size=32"],
    ),
    "1b-sft-fp32-chunk256-full": (
        "v5e:2x4",
        [
            *SFT,
            *FSDP8,
            "model.path=llama3-1b",
            "model.remat=full",
            "train.batch_size=32",
            "train.logits_chunk_size=256",
        ],
    ),
    "1b-sft-bf16-chunk0-none": (
        "v5e:2x4",
        [
            *SFT,
            *FSDP8,
            "model.path=llama3-1b",
            "model.param_dtype=bfloat16",
            "model.remat=none",
            "train.batch_size=8",
        ],
    ),
    "1b-sft-bf16-chunk256-full": (
        "v5e:2x4",
        [
            *SFT,
            *FSDP8,
            "model.path=llama3-1b",
            "model.param_dtype=bfloat16",
            "model.remat=full",
            "train.batch_size=32",
            "train.logits_chunk_size=256",
        ],
    ),
    "1b-dpo-bf16-chunk256-ref": (
        "v5e:2x4",
        [
            "objective=dpo",
            *BASE,
            *FSDP8,
            "model.path=llama3-1b",
            "model.param_dtype=bfloat16",
            "model.remat=full",
            "train.batch_size=16",
            "train.logits_chunk_size=256",
        ],
    ),
    "1b-dpo-bf16-chunk256-offload": (
        "v5e:2x4",
        [
            "objective=dpo",
            *BASE,
            *FSDP8,
            "model.path=llama3-1b",
            "model.param_dtype=bfloat16",
            "model.remat=full",
            "train.batch_size=16",
            "train.logits_chunk_size=256",
            "train.offload_reference=true",
        ],
    ),
    "1b-grpo-bf16": (
        "v5e:2x4",
        [
            *GRPO,
            *FSDP8,
            "model.path=llama3-1b",
            "model.param_dtype=bfloat16",
            "model.remat=full",
            "train.batch_size=8",
            "train.logits_chunk_size=256",
        ],
    ),
    "8b-sft-bf16-chunk256-full": (
        "v5e:2x4",
        [
            *SFT,
            *FSDP8,
            "model.path=llama3-8b",
            "model.param_dtype=bfloat16",
            "model.remat=full",
            "train.batch_size=8",
            "train.logits_chunk_size=256",
        ],
    ),
    "8b-grpo-bf16-v5p": (
        "v5p:2x2x1",
        [
            *GRPO,
            *FSDP4,
            "model.path=llama3-8b",
            "model.param_dtype=bfloat16",
            "model.remat=full",
            "train.batch_size=8",
            "train.logits_chunk_size=256",
        ],
    ),
}

# The largest batches of the README's "fits" list: the base case at a bigger batch.
LARGEST = {
    "1b-grpo-bf16-16prompts": ("1b-grpo-bf16", ["train.batch_size=16"]),
    "8b-sft-bf16-chunk256-full-b24": ("8b-sft-bf16-chunk256-full", ["train.batch_size=24"]),
    "8b-sft-bf16-chunk256-full-b32": ("8b-sft-bf16-chunk256-full", ["train.batch_size=32"]),
    "8b-grpo-bf16-v5p-32prompts": ("8b-grpo-bf16-v5p", ["train.batch_size=32"]),
}
for _name, (_base, _extra) in LARGEST.items():
    CASES[_name] = (CASES[_base][0], [*CASES[_base][1], *_extra])


def main() -> None:
    from jrft.commands.compile import compile_run
    from jrft.config import load_config

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", default="", help="run the cases whose name contains this")
    parser.add_argument(
        "--estimates", action="store_true", help="print jrft's estimates only (no compile: seconds)"
    )
    parser.add_argument("--dump", default=None, help="write each program's optimized HLO under DIR/<case>/")
    parser.add_argument("overrides", nargs="*", help="extra key=value overrides for every case")
    args = parser.parse_args()
    print("| case | topology | program | compiled GiB/chip | estimate GiB | estimate/compiled | fits |")
    print("|---|---|---|---|---|---|---|")
    for name, (topology, overrides) in CASES.items():
        if args.only not in name:
            continue
        config = load_config(None, [*overrides, "output_dir=/tmp/jrft-compile-table", *args.overrides])
        if args.estimates:
            for program, est in estimates(config, topology):
                shown = "-" if est is None else f"{est / 2**30:.2f}"
                print(f"| {name} | {topology} | {program} | | {shown} | | |")
            continue
        t0 = time.perf_counter()
        dump = None if args.dump is None else os.path.join(args.dump, name)
        for r in compile_run(config, topology, dump_dir=dump):
            est = "-" if r.estimate_bytes is None else f"{r.estimate_bytes / 2**30:.2f}"
            ratio = (
                "-"
                if not r.estimate_bytes or not r.total_bytes
                else f"{r.estimate_bytes / r.total_bytes:.2f}"
            )
            total = f"{r.total_bytes / 2**30:.2f}" + ("" if r.error is None else " (compiler's first check)")
            verdict = "yes" if r.fits else "**no**"
            print(f"| {name} | {topology} | {r.name} | {total} | {est} | {ratio} | {verdict} |", flush=True)
        print(f"<!-- {name}: {time.perf_counter() - t0:.0f} s -->", flush=True)


def estimates(config, topology: str):
    """``(program name, jrft's estimate)`` for every program of the case, without compiling."""
    from jrft.aot import parse_topology, topology_devices
    from jrft.aot.presets import model_config
    from jrft.aot.programs import run_programs
    from jrft.commands.compile import _estimate
    from jrft.parallel import make_mesh
    from jrft.train.runs.setup import run_estimates

    m = config.mesh
    mesh = make_mesh(
        data=m.data, fsdp=m.fsdp, tensor=m.tensor, devices=topology_devices(parse_topology(topology))
    )
    model_cfg = model_config(config.model.path)
    shape = [mesh.shape[a] for a in ("data", "fsdp", "tensor")]
    estimates = run_estimates(config, model_cfg, shape, platform="tpu")
    return [(p.name, _estimate(estimates, p.name)) for p in run_programs(config, model_cfg, mesh)]


if __name__ == "__main__":
    main()
