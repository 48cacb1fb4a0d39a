"""``jrft sft|reward|dpo|kto|grpo|ppo CONFIG [key=value ...]``: train one objective from a YAML config."""

from __future__ import annotations

import argparse
import functools
import sys

HELP_EPILOG = """\
Overrides are dotted keys parsed as YAML values, applied after the file:
  jrft {objective} configs/{objective}.yaml optim.lr=1e-4 train.steps=200 data.train=my.jsonl
A rerun with the same output_dir resumes from its latest checkpoint (train.resume=true); changing the
model, tokenizer, data or objective on resume is refused unless --allow-config-change is given.
"""


def _parser(objective: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=f"jrft {objective}",
        description=f"Train with the {objective} objective.",
        epilog=HELP_EPILOG.format(objective=objective),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("config", help="YAML run config (see configs/)")
    parser.add_argument("overrides", nargs="*", help="key=value overrides, e.g. optim.lr=1e-4")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar (logs only)")
    parser.add_argument(
        "--allow-config-change",
        action="store_true",
        help="resume even if the model, tokenizer, data or objective differ from the checkpoint's",
    )
    parser.add_argument("--debug", action="store_true", help="show the traceback of user-facing errors")
    parser.add_argument(
        "--print-config",
        action="store_true",
        help="print the resolved config (YAML, jrft's names for TRL's aliases) and exit",
    )
    return parser


def _user_errors() -> tuple[type[BaseException], ...]:
    """Errors about the user's inputs or the run's state: one line and exit 2 (``--debug``: the traceback)."""
    from jrft.config import ConfigError
    from jrft.data.errors import DataError
    from jrft.models.pretrained import CheckpointError
    from jrft.rewards.loading import RewardLoadError
    from jrft.rewards.protocol import RewardSignatureError
    from jrft.train.lock import RunLockedError
    from jrft.train.loop import NonFiniteError
    from jrft.train.runs.resume import ConfigDriftError

    return (
        ConfigError,
        DataError,
        CheckpointError,
        RewardLoadError,
        RewardSignatureError,
        RunLockedError,
        ConfigDriftError,
        NonFiniteError,
        FileNotFoundError,
    )


def run(objective: str, argv: list[str]) -> int:
    from jrft.config import load_config
    from jrft.parallel.distributed import initialize_distributed

    args = _parser(objective).parse_intermixed_args(argv)  # flags before, between or after the overrides
    if args.print_config:
        return _print_config(objective, args)
    initialize_distributed()  # multi-host: joins the other processes (TPU VM, SLURM, JRFT_* env); else no-op
    try:
        config = load_config(args.config, [*args.overrides, f"objective={objective}"])
        from jrft.train.runs import run_config

        result = run_config(
            config, progress=not args.no_progress, allow_config_change=args.allow_config_change
        )
    except _user_errors() as e:
        if args.debug:
            raise
        print(f"jrft {objective}: {e} (--debug for the traceback)", file=sys.stderr)
        return 2
    summary = ", ".join(f"{k}={v:.4g}" for k, v in sorted(result.last_metrics.items()) if k in ("loss",))
    print(f"jrft {objective}: finished at step {result.step}; {summary}")
    return 0


def _print_config(objective: str, args) -> int:
    from jrft.config import ConfigError, load_config

    try:
        config = load_config(args.config, [*args.overrides, f"objective={objective}"])
    except ConfigError as e:
        print(f"jrft {objective}: {e}", file=sys.stderr)
        return 2
    print(config.to_yaml(), end="")
    return 0


# The commands cli.COMMANDS names: ``jrft <objective> ARGV`` is ``run(objective, ARGV)``.
sft = functools.partial(run, "sft")
reward = functools.partial(run, "reward")
dpo = functools.partial(run, "dpo")
kto = functools.partial(run, "kto")
grpo = functools.partial(run, "grpo")
ppo = functools.partial(run, "ppo")
