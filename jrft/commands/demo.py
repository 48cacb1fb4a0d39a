"""``jrft demo``: train a tiny reasoning model from scratch on CPU and show that it learned.

Default (``--objective grpo``): build a character tokenizer and a ~0.8M-parameter Llama from scratch (saved
in transformers format), SFT it on 200 labelled 3-digit additions with ``<think>…</think><answer>…</answer>``
traces, evaluate held-out exact match and format rate (greedy), run GRPO on fresh unlabelled prompts with the
``accuracy`` + ``format`` reward built-ins, evaluate again, export the final model and load it back (jrft and,
with torch, transformers), then write a report: ``report.png`` (loss, reward, KL, held-out accuracy),
``report.md``, ``result.json`` and the stages' ``metrics.jsonl``.

``--objective dpo``: SFT, then DPO on synthetic preference pairs (chosen = correct trace, rejected = a wrong
or malformed one); reports held-out preference accuracy before/after. ``--objective rlhf``: SFT, a reward
model on the same pairs with the SFT policy's own mistakes as rejected answers where it made one, then PPO
against it; reports the reward model's score before/after.
"""

from __future__ import annotations

import argparse
import sys

EPILOG = """\
Settings come from configs/demo.yaml when it exists (or --config), then --quick, then key=value overrides:
  jrft demo                          # SFT -> GRPO, ~5-10 minutes on 2 CPU cores, report in runs/demo/
  jrft demo --quick                  # the same stages at toy sizes (plumbing only, no learning)
  jrft demo --objective dpo          # SFT -> DPO on preference pairs
  jrft demo --objective tools        # SFT -> multi-turn GRPO with a calc tool (a*b=)
  jrft demo --lora                   # the stage after SFT trains LoRA adapters (lora.rank, lora.lr, ...)
  jrft demo grpo.steps=100 seed=1    # overrides (see configs/demo.yaml for every key)
"""

DEFAULT_CONFIG = "configs/demo.yaml"


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="jrft demo",
        description=__doc__.splitlines()[0].split(": ", 1)[1],
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("overrides", nargs="*", help="key=value overrides of the demo settings")
    parser.add_argument(
        "--objective", choices=("grpo", "dpo", "rlhf", "tools"), default=None, help="default: grpo"
    )
    parser.add_argument("--out", default=None, help="output directory (default: runs/demo)")
    parser.add_argument("--seed", type=int, default=None, help="seed of everything random (default: 0)")
    parser.add_argument(
        "--config", default=None, help=f"demo settings YAML (default: {DEFAULT_CONFIG} if present)"
    )
    parser.add_argument(
        "--lora", action="store_true", help="LoRA adapters on the stage after SFT (settings: lora.* keys)"
    )
    parser.add_argument("--quick", action="store_true", help="toy sizes: checks the plumbing in < 1 minute")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    return parser


def main(argv: list[str] | None = None) -> int:
    import os

    from jrft.config import ConfigError

    args = _parser().parse_args(argv)
    from jrft.demo import load_demo_config, run_demo
    from jrft.demo.report import write_report

    path = args.config or (DEFAULT_CONFIG if os.path.exists(DEFAULT_CONFIG) else None)
    flags = [
        f"{k}={v}"
        for k, v in (("objective", args.objective), ("output_dir", args.out), ("seed", args.seed))
        if v is not None
    ] + (["lora.enabled=true"] if args.lora else [])
    try:
        cfg = load_demo_config(path, [*flags, *args.overrides], quick=args.quick)
    except ConfigError as e:
        print(f"jrft demo: {e}", file=sys.stderr)
        return 2
    quick = (", quick" if args.quick else "") + (f", LoRA rank {cfg.lora.rank}" if cfg.lora.enabled else "")
    print(f"jrft demo --objective {cfg.objective} (seed {cfg.seed}{quick}) -> {cfg.output_dir}")
    result = run_demo(cfg, progress=not args.no_progress, log=lambda m: print(m, flush=True))
    text, _ = write_report(result)
    print()
    print(text)
    print(f"\njrft demo: done in {result.seconds['total'] / 60:.1f} min")
    return 0
