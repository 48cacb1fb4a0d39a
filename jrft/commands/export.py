"""``jrft export RUN_DIR OUT [--step N]``: a run's checkpoint -> a transformers-format directory.

Runs export automatically when they finish; this command exports any kept checkpoint (e.g. the best one
so far, or one of a run that was stopped). It reads the run's config from the checkpoint, rebuilds the
model from ``model.path`` (the starting checkpoint must still be reachable), restores the trained
parameters and writes them with ``jrft.models.save_pretrained`` together with the tokenizer.
"""

from __future__ import annotations

import argparse
import os
import sys


def export_checkpoint(run_dir: str, out: str, *, step: int | None = None) -> str:
    """Exports checkpoint ``step`` (default: the latest) of the run in ``run_dir`` to ``out``."""
    import jax
    from flax import nnx
    from transformers import AutoTokenizer

    from jrft.config import config_from_dict
    from jrft.models import save_pretrained
    from jrft.train.checkpoint import Checkpointer
    from jrft.train.offline import build_model, optimizer_from_config
    from jrft.train.sharding import mesh_from_config
    from jrft.train.state import create_train_state

    checkpointer = Checkpointer(os.path.join(run_dir, "checkpoints"))
    try:
        meta = checkpointer.read_meta(step)
        step = step if step is not None else checkpointer.latest_step()
        config = config_from_dict(meta["config"])
        if config.objective == "ppo":
            raise NotImplementedError(
                "jrft export: PPO checkpoints hold policy and value states; exporting one mid-run is not "
                "built yet (the run exports its policy when it finishes)"
            )
        mesh = mesh_from_config(1, 1, 1)
        model = build_model(config, mesh, scalar_head=config.objective == "reward")
        tx, _ = optimizer_from_config(config, total_steps=config.train.steps)
        graphdef, target = create_train_state(model, tx, seed=config.seed)
        state, _ = checkpointer.restore(step, target)
    finally:
        checkpointer.close()
    model = nnx.merge(graphdef, state.params, state.rest)
    tokenizer = AutoTokenizer.from_pretrained(config.model.tokenizer_path)
    jax.block_until_ready(state.params)
    return save_pretrained(model, out, tokenizer)


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="jrft export", description=__doc__.splitlines()[0])
    parser.add_argument("run_dir", help="a run's output_dir (holds checkpoints/)")
    parser.add_argument("out", help="where to write the transformers-format model")
    parser.add_argument("--step", type=int, default=None, help="checkpoint step (default: the latest)")
    args = parser.parse_args(argv)
    try:
        path = export_checkpoint(args.run_dir, args.out, step=args.step)
    except (FileNotFoundError, NotImplementedError) as e:
        print(f"jrft export: {e}", file=sys.stderr)
        return 2
    print(f"jrft export: wrote {path}")
    return 0
