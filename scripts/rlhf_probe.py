"""Why PPO does or does not raise exact match in the RLHF demo: the reward model on the SFT policy's samples,
and PPO from the SFT checkpoint against the reward model or against the task's checker.

Reads a finished ``jrft demo --objective rlhf --out RUN`` directory (``base/``, ``data/``, ``sft/export``,
``reward/export``) and prints:

1. On ``--prompts`` held-out preference prompts, ``--samples`` draws of the SFT policy each (temperature 1):
   their accuracy, the reward model's within-prompt pairwise accuracy (a correct draw scored above a wrong
   draw of the same prompt: what PPO's update direction depends on), and best-of-n (the draw the reward
   model scores highest, right or wrong) against the greedy answer.
2. With ``--ppo model`` or ``--ppo checker``: PPO from the SFT checkpoint with the demo's ``ppo:`` settings
   (``key=value`` demo overrides apply) and held-out exact match every ``--eval-every`` steps. ``checker``
   swaps the reward model for the demo's GRPO reward functions (exact answer + format): a control that
   shows whether PPO's settings can learn the task at all.

    PYTHONPATH=. .venv/bin/python scripts/rlhf_probe.py runs/demo seed=0 --ppo checker
"""

from __future__ import annotations

import argparse
import json
import os
import time

import numpy as np


def reward_model_on_samples(
    run: str, cfg, tokenizer, *, num_prompts: int, num_samples: int, reward_model: str | None = None
) -> dict:
    """The reward model's ranking of the SFT policy's draws (part 1 of the module docstring)."""
    from jrft.demo.evaluate import EXACT_MATCH, reward_scores, sampled_completions
    from jrft.demo.preferences import answer_of
    from jrft.demo.stages import _load, _task_eval, read_jsonl
    from jrft.models import from_pretrained

    rows = read_jsonl(os.path.join(run, "data", "pref_heldout.jsonl"))[:num_prompts]
    prompts = [r["prompt"] for r in rows]
    policy = _load(os.path.join(run, "sft", "export"))
    draws = sampled_completions(
        policy,
        tokenizer,
        prompts,
        max_new_tokens=cfg.eval.max_new_tokens,
        batch_size=cfg.eval.batch_size,
        num_samples=num_samples,
        temperature=1.0,
        seed=cfg.seed + 5,
    )
    flat = [c for group in draws for c in group]
    answers = [answer_of(r["chosen"]) for r in rows for _ in range(num_samples)]
    right = (np.asarray(EXACT_MATCH(completions=flat, answer=answers)) > 0).reshape(-1, num_samples)
    reward_model = from_pretrained(reward_model or os.path.join(run, "reward", "export"), scalar_head=True)
    repeated = [p for p in prompts for _ in range(num_samples)]
    scores = np.asarray(reward_scores(reward_model, tokenizer, repeated, flat)).reshape(-1, num_samples)
    wins = [
        scores[i, a] > scores[i, b]
        for i in range(len(rows))
        for a in np.flatnonzero(right[i])
        for b in np.flatnonzero(~right[i])
    ]
    greedy_rows = [{"prompt": r["prompt"], "answer": answer_of(r["chosen"])} for r in rows]
    greedy = _task_eval(cfg, policy, tokenizer, greedy_rows)
    mean_prompt = scores.mean(axis=1, keepdims=True)
    return {
        "prompts": len(rows),
        "samples_per_prompt": num_samples,
        "sample_accuracy": float(right.mean()),
        "within_prompt_pairs": len(wins),
        "within_prompt_pairwise_accuracy": float(np.mean(wins)) if wins else float("nan"),
        "best_of_n_accuracy": float(right[np.arange(len(rows)), scores.argmax(axis=1)].mean()),
        "greedy_accuracy": greedy.accuracy,
        "score_variance_between_prompts": float(mean_prompt.var()),
        "score_variance_within_prompts": float(((scores - mean_prompt) ** 2).mean()),
    }


def ppo_curve(
    run: str, cfg, tokenizer, *, reward: str, out: str, eval_every: int, reward_model: str | None = None
) -> list[dict]:
    """PPO from the SFT checkpoint (part 2): ``[{step, exact_match, score, kl}]``, step 0 = the SFT model."""
    from jrft.demo.stages import _load, _task_eval, ppo_config, read_jsonl, rewards_yaml
    from jrft.train.runs.ppo import run_ppo

    data = os.path.join(run, "data")
    paths = {name[: -len(".jsonl")]: os.path.join(data, name) for name in os.listdir(data)}
    heldout = read_jsonl(paths["prompts_heldout"])
    extra = [f"train.eval_every={eval_every}"]
    if reward == "checker":
        extra += ["ppo.reward_model=null", f"ppo.reward_functions={rewards_yaml(cfg)}"]
    config = ppo_config(
        cfg,
        out,
        paths,
        os.path.join(run, "sft", "export"),
        reward_model or os.path.join(run, "reward", "export"),
        extra,
    )

    def exact_match(model) -> dict:
        return {"exact_match": _task_eval(cfg, model, tokenizer, heldout).accuracy}

    curve = [{"step": 0, **exact_match(_load(os.path.join(run, "sft", "export")))}]
    run_ppo(config, progress=False, model_eval_fn=exact_match)
    last: dict = {}
    with open(os.path.join(config.output_dir, "metrics.jsonl")) as f:
        for line in f:
            row = json.loads(line)
            if "score/mean" in row:
                last = {"score": row["score/mean"], "kl": row.get("kl_mean")}
            if "eval/exact_match" in row:
                curve.append({"step": row["step"], "exact_match": row["eval/exact_match"], **last})
    return curve


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run", help="output directory of a finished `jrft demo --objective rlhf`")
    parser.add_argument(
        "overrides", nargs="*", help="key=value demo settings as for the run (seed=N), then e.g. ppo.lr=5e-5"
    )
    parser.add_argument("--prompts", type=int, default=300)
    parser.add_argument("--samples", type=int, default=8)
    parser.add_argument("--ppo", choices=("model", "checker"), help="also run PPO with this reward")
    parser.add_argument("--eval-every", type=int, default=10)
    parser.add_argument("--rm", help="this reward model instead of RUN/reward/export")
    parser.add_argument("--out", help="PPO output directory (default: RUN/probe_ppo_<reward>)")
    args = parser.parse_args(argv)

    from jrft.demo.settings import load_demo_config
    from jrft.demo.stages import tokenizer_of

    cfg = load_demo_config(None, args.overrides)
    tokenizer = tokenizer_of({"base": os.path.join(args.run, "base")})
    t0 = time.time()
    stats = reward_model_on_samples(
        args.run, cfg, tokenizer, num_prompts=args.prompts, num_samples=args.samples
    )
    print(json.dumps(stats, indent=1))
    if args.ppo:
        out = args.out or os.path.join(args.run, f"probe_ppo_{args.ppo}")
        curve = ppo_curve(
            args.run,
            cfg,
            tokenizer,
            reward=args.ppo,
            out=out,
            eval_every=args.eval_every,
            reward_model=args.rm,
        )
        for row in curve:
            print(json.dumps(row))
    print(f"{time.time() - t0:.0f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
