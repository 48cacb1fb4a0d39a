"""The sampler's decode attention on TPU, proven by AOT compilation from this host (no TPU needed): the
XLA step over a cache grown segment by segment vs the ragged decode kernel over one preallocated cache.

    PYTHONPATH=. .venv/bin/python scripts/decode_memory.py generate --new 1024 --decode ragged-decode
    PYTHONPATH=. .venv/bin/python scripts/decode_memory.py generate --new 4096 --decode xla
    PYTHONPATH=. .venv/bin/python scripts/decode_memory.py step --new 1024 4096

``generate``: the GRPO sampler of ``jrft compile`` (Llama-3.2-1B shape, bf16, 8 prompts of 256 tokens x G = 8,
mesh fsdp 8 on v5e:2x4; ``--prompts`` to change) compiled whole: per-chip memory from ``memory_analysis``
and whether the kernel's ``tpu_custom_call`` sits inside the decode loop (the outer ``while``).

``step``: one decode step alone (same shapes, cache allocated for ``256 + new`` slots): ``cost_analysis``
FLOPs and bytes of the XLA step (which attends over all the allocated slots, as the last segment does) and
of the kernel step. The kernel's call carries no ``pl.CostEstimate`` (a static estimate cannot know how
full the cache is), so XLA counts the program around it; the kernel's own traffic is its visited blocks
(``ragged_decode.blocks_read``: the index map's distinct blocks, whose skipping the interpret-mode tests
prove), printed per row for a cache filled to 256 + 100 slots.
"""

from __future__ import annotations

import argparse
import os
import time

OVERRIDES = [
    "objective=grpo",
    "model.path=llama3-1b",
    "model.dtype=bfloat16",
    "model.param_dtype=bfloat16",
    "model.remat=full",
    "data.max_length=2048",
    "data.max_prompt_length=256",
    "grpo.num_generations=8",
    "grpo.reward_functions=[{name: accuracy}]",
    "mesh.data=1",
    "mesh.fsdp=8",
    "mesh.tensor=1",
    "train.logits_chunk_size=256",
]
GIB = 2**30


def _setup(new: int, prompts: int):
    from jrft.aot import topology_devices
    from jrft.aot.presets import model_config
    from jrft.config import load_config
    from jrft.parallel import make_mesh

    config = load_config(
        "configs/grpo.yaml", [*OVERRIDES, f"grpo.max_new_tokens={new}", f"train.batch_size={prompts}"]
    )
    mesh = make_mesh(data=1, fsdp=8, tensor=1, devices=topology_devices("v5e:2x4"))
    return config, model_config(config.model.path), mesh


def _decode_loop_calls(hlo: str, target: str = "tpu_custom_call") -> int:
    """Custom calls to ``target`` reachable from the outer ``while`` bodies (loops holding a loop: the decode
    loop, whose body scans the layers)."""
    from jrft.aot.hlo import custom_calls_in_loops

    return custom_calls_in_loops(hlo, target, outer_only=True)


def generate(new: int, decode: str, prompts: int) -> None:
    from jrft.aot import chip_hbm_bytes, compile_program
    from jrft.aot.programs import grpo_programs

    if decode == "xla":
        os.environ["JRFT_ATTENTION"] = "xla"  # kernels.forced: the XLA decode step
    config, model_cfg, mesh = _setup(new, prompts)
    program = grpo_programs(config, model_cfg, mesh)[0]
    assert program.name == "grpo/generate", program.name
    hbm = chip_hbm_bytes(list(mesh.devices.flat))
    start = time.perf_counter()
    report = compile_program(
        program.name, program.fn, program.args, mesh=mesh, hbm_bytes=hbm, dump_dir="/tmp/decode_memory"
    )
    with open(report.hlo_path) as f:
        hlo = f.read()
    print(
        f"generate new={new} decode={decode}: {report.describe()} | tpu_custom_call in decode loop: "
        f"{_decode_loop_calls(hlo)} | compile {time.perf_counter() - start:.0f} s"
    )


def step(news: list[int], prompts: int) -> None:
    import jax
    import jax.numpy as jnp
    import numpy as np
    from flax import nnx
    from jax.sharding import NamedSharding, PartitionSpec

    from jrft.aot.programs import abstract_train_state
    from jrft.models import kernels
    from jrft.models.decoder import CACHE_AXES, KVCache
    from jrft.models.ragged_decode import blocks_read
    from jrft.parallel.sharding import logical_to_spec
    from jrft.sampling.decode import decode_step, fuse_decode_weights, ranged_decode_step
    from jrft.sampling.generate import gather_decode_weights
    from jrft.train.runs.setup import optimizer_from_config

    for new in news:
        config, model_cfg, mesh = _setup(new, prompts)
        tx, _ = optimizer_from_config(config, total_steps=10)
        graphdef, state, _ = abstract_train_state(config, model_cfg, tx, mesh)
        tp, rows = 256, prompts * config.grpo.num_generations
        s = tp + new  # a multiple of kernels.DECODE_BLOCK here
        c = model_cfg
        shape = (c.num_layers, rows, c.num_kv_heads, s, c.head_dim)
        cache_sh = NamedSharding(mesh, logical_to_spec(CACHE_AXES, shape, mesh))
        row_sh = NamedSharding(mesh, logical_to_spec(("batch",), (rows,), mesh))
        rep = NamedSharding(mesh, PartitionSpec())
        cache = KVCache(*(jax.ShapeDtypeStruct(shape, jnp.bfloat16, sharding=cache_sh) for _ in range(2)))
        vec = jax.ShapeDtypeStruct((rows,), jnp.int32, sharding=row_sh)
        slot = jax.ShapeDtypeStruct((), jnp.int32, sharding=rep)

        def run(params, rest, tok, pos, cache, slot, first, ragged, graphdef=graphdef, s=s):
            params = gather_decode_weights(params, jnp.bfloat16)
            model = nnx.merge(graphdef, params, rest)
            w = fuse_decode_weights(model, False)
            if ragged:
                return ranged_decode_step(model, w, first, block=kernels.DECODE_BLOCK)(tok, pos, cache, slot)
            slots = jnp.arange(s)
            key_valid = (slots[None] >= first[:, None]) & (slots[None] <= slot)  # [B, S]
            return decode_step(model, w, tok, pos, cache, slot, key_valid)

        for ragged in (False, True):
            fn = jax.jit(run, static_argnums=7, donate_argnums=4)
            with jax.set_mesh(mesh):
                compiled = fn.lower(state.params, state.rest, vec, vec, cache, slot, vec, ragged).compile()
            cost = compiled.cost_analysis()
            mem = compiled.memory_analysis()
            calls = compiled.as_text().count('custom_call_target="tpu_custom_call"')
            name = "ragged-decode" if ragged else "xla (all allocated slots)"
            print(
                f"step new={new} slots={s} {name}: flops {cost['flops'] / 1e9:.3f} G, bytes accessed "
                f"{cost['bytes accessed'] / 1e9:.3f} GB, temporaries {mem.temp_size_in_bytes / GIB:.3f} GiB, "
                f"tpu_custom_call {calls}"
            )
        block = kernels.DECODE_BLOCK
        read = blocks_read(np.array([0, 100, 200]), np.array([tp + 100] * 3), block)
        print(
            f"  kernel blocks read per row and layer at slot {tp + 100} (rows starting at 0 / 100 / 200): "
            f"{read.tolist()} of {s // block} allocated ({block} slots each)"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("what", choices=["generate", "step"])
    parser.add_argument("--new", type=int, nargs="+", default=[1024])
    parser.add_argument("--decode", choices=["xla", "ragged-decode"], default="ragged-decode")
    parser.add_argument("--prompts", type=int, default=8)
    args = parser.parse_args()
    if args.what == "generate":
        for new in args.new:
            generate(new, args.decode, args.prompts)
    else:
        step(args.new, args.prompts)


if __name__ == "__main__":
    main()
