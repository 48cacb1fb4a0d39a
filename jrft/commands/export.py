"""``jrft export RUN_DIR OUT [--step N]``: a run's checkpoint -> a transformers-format directory.

Runs export automatically when they finish; this command exports any kept checkpoint (e.g. the best one
so far, or one of a run that was stopped): ``jrft.train.runs.export.export_checkpoint``.
"""

from __future__ import annotations

import argparse
import sys


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="jrft export", description=__doc__.splitlines()[0])
    parser.add_argument("run_dir", help="a run's output_dir (holds checkpoints/)")
    parser.add_argument("out", help="where to write the transformers-format model")
    parser.add_argument("--step", type=int, default=None, help="checkpoint step (default: the latest)")
    parser.add_argument("--debug", action="store_true", help="show the traceback of an error")
    args = parser.parse_args(argv)
    from jrft.train.loop import NonFiniteError
    from jrft.train.runs.export import export_checkpoint

    try:
        path = export_checkpoint(args.run_dir, args.out, step=args.step)
    except (OSError, ValueError, KeyError, NotImplementedError, NonFiniteError) as e:
        # a missing run or step, an unreadable checkpoint or config, a model file that fails validation
        # (ConfigError and DataError are ValueErrors): one line naming the cause, exit 2
        if args.debug:
            raise
        print(f"jrft export: {type(e).__name__}: {e}", file=sys.stderr)
        return 2
    print(f"jrft export: wrote {path}")
    return 0
