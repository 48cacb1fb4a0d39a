"""Runs ``jrft demo`` on several seeds and prints one table: held-out exact match before/after, gain, minutes.

    PYTHONPATH=. .venv/bin/python scripts/demo_seeds.py --seeds 0-9 [--objective grpo|rlhf|tools]
        [--out runs/seeds] [--curve] [key=value ...]

Each seed runs in its own process (``jrft demo --seed N --out OUT/seedN --no-progress``, one after another,
so the minutes are wall time of one demo on this machine); the overrides go to every run (e.g.
``grpo.dynamic_sampling=false`` for the ablation). ``--curve`` also prints each seed's held-out accuracy
at every evaluation (step 0 = the SFT model). Seeds already finished in OUT (their ``result.json``) are
read, not rerun, unless ``--rerun``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys


def seed_list(text: str) -> list[int]:
    """``"0-9"`` or ``"0,3,5"`` -> seeds."""
    seeds: list[int] = []
    for part in text.split(","):
        lo, _, hi = part.partition("-")
        seeds.extend(range(int(lo), int(hi or lo) + 1))
    return seeds


def run_seed(seed: int, out: str, objective: str, overrides: list[str], rerun: bool) -> dict:
    path = os.path.join(out, "result.json")
    if rerun or not os.path.exists(path):
        cmd = [
            sys.executable,
            "-m",
            "jrft.cli",
            "demo",
            f"--objective={objective}",
            f"--seed={seed}",
            f"--out={out}",
            "--no-progress",
            *overrides,
        ]
        with open(os.path.join(os.path.dirname(out) or ".", f"seed{seed}.log"), "w") as log:
            subprocess.run(cmd, check=True, stdout=log, stderr=subprocess.STDOUT)
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("overrides", nargs="*", help="key=value demo settings for every seed")
    parser.add_argument("--seeds", default="0-2")
    parser.add_argument("--objective", default="grpo", choices=("grpo", "rlhf", "tools"))
    parser.add_argument("--out", default="runs/seeds")
    parser.add_argument("--curve", action="store_true", help="print each seed's held-out accuracy curve")
    parser.add_argument("--rerun", action="store_true", help="rerun seeds that already have a result")
    args = parser.parse_args(argv)
    os.makedirs(args.out, exist_ok=True)
    rows = []
    print(f"{'seed':>4}  {'before':>7}  {'after':>7}  {'gain':>7}  {'final':>7}  {'minutes':>7}", flush=True)
    for seed in seed_list(args.seeds):
        r = run_seed(seed, os.path.join(args.out, f"seed{seed}"), args.objective, args.overrides, args.rerun)
        before, after = 100 * r["before"]["accuracy"], 100 * r["after"]["accuracy"]
        final = 100 * r["after"].get("final_accuracy", r["after"]["accuracy"])
        minutes = r["seconds"]["total"] / 60
        rows.append((seed, before, after, after - before, minutes))
        line = (
            f"{seed:>4}  {before:6.1f}%  {after:6.1f}%  {after - before:+6.1f}  {final:6.1f}%  {minutes:7.1f}"
        )
        if args.objective == "rlhf":
            line += f"  rm score {r['before']['rm_score']:.3f} -> {r['after']['rm_score']:.3f}"
        if args.objective == "tools":
            b, a = r["before"], r["after"]
            line += (
                f"  tool calls {100 * b['tool_call_rate']:.1f}% -> {100 * a['tool_call_rate']:.1f}%, "
                f"failed {100 * b['tool_failure_rate']:.1f}% -> {100 * a['tool_failure_rate']:.1f}%"
            )
        print(line, flush=True)
        if args.curve and r.get("evals"):
            print("      curve: " + " ".join(f"{s}:{100 * a:.1f}" for s, a, _ in r["evals"]), flush=True)
    gains = [g for *_, g, _ in rows]
    if len(gains) > 1:
        print(
            f"gain: mean {statistics.mean(gains):+.1f}, std {statistics.stdev(gains):.1f}, "
            f"min {min(gains):+.1f}, max {max(gains):+.1f}; minutes: max {max(r[-1] for r in rows):.1f}"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
