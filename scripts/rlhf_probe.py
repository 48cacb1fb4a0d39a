"""Why PPO does or does not raise exact match in the RLHF demo: the reward model on the SFT policy's samples,
and PPO from the SFT checkpoint against the reward model or against the task's checker.

Reads a finished ``jrft demo --objective rlhf --out RUN`` directory (``base/``, ``data/``, ``sft/export``,
``reward/export``) and prints:

1. On ``--prompts`` held-out preference prompts, ``--samples`` draws of the SFT policy each (temperature 1):
   their accuracy, the reward model's within-prompt pairwise accuracy (a correct draw scored above a wrong
   draw of the same prompt: what PPO's update direction depends on), and best-of-n (the draw the reward
   model scores highest, right or wrong) against the greedy answer (the demo's own ranking lines,
   ``jrft.demo.stages.rank_sft_draws``), and held-out exact match of the reward model's own language model
   decoding greedily (``rm_lm_exact_match``).
2. With ``--ppo model`` or ``--ppo checker``: PPO from the SFT checkpoint with the demo's ``ppo:`` settings
   (``key=value`` demo overrides apply) and held-out exact match every ``--eval-every`` steps. ``checker``
   swaps the reward model for the demo's GRPO reward functions (exact answer + format): a control that
   shows whether PPO's settings can learn the task at all.

    PYTHONPATH=. .venv/bin/python scripts/rlhf_probe.py runs/demo seed=0 --ppo checker
    PYTHONPATH=. .venv/bin/python scripts/rlhf_probe.py runs/demo seed=0 reward.likelihood_coef=0 \
        --train-rm runs/demo/rm_head_only --ppo model

``--train-rm DIR`` first trains a reward model as the demo does (RUN's pairs and SFT checkpoint) with the
overrides' ``reward:`` settings, for ablations of the reward model.
"""

from __future__ import annotations

import argparse
import json
import os
import time


def train_reward_model(run: str, cfg, out: str) -> str:
    """A reward model trained as the demo trains one, on RUN's pairs (its on-policy file when
    ``reward.on_policy_samples`` > 0), from RUN's SFT checkpoint, with ``cfg``'s ``reward:`` settings (e.g.
    ``reward.likelihood_coef=0`` for the head alone); returns its export directory."""
    from jrft.demo.stages import preference_config
    from jrft.train.runs.offline import run_offline
    from jrft.train.runs.setup import export_dir

    data = os.path.join(run, "data")
    paths = {name[: -len(".jsonl")]: os.path.join(data, name) for name in os.listdir(data)}
    if cfg.reward.on_policy_samples:
        paths["pref_train"] = paths["pref_train_on_policy"]
    config = preference_config(cfg, out, paths, os.path.join(run, "sft", "export"), "reward")
    run_offline(config, progress=False)
    return export_dir(config)


def reward_model_lm_accuracy(run: str, cfg, tokenizer, reward_model: str) -> float:
    """Held-out exact match of the reward model's own language model, decoding greedily."""
    from jrft.demo.stages import _load, _task_eval, read_jsonl

    heldout = read_jsonl(os.path.join(run, "data", "prompts_heldout.jsonl"))
    return _task_eval(cfg, _load(reward_model), tokenizer, heldout).accuracy


def reward_model_on_samples(run: str, cfg, tokenizer, *, reward_model: str | None = None) -> dict:
    """The reward model's ranking of the SFT policy's draws (part 1), as the demo reports it."""
    from jrft.demo.stages import _load, rank_sft_draws, read_jsonl
    from jrft.models import from_pretrained

    pairs = read_jsonl(os.path.join(run, "data", "pref_heldout.jsonl"))
    rm = from_pretrained(reward_model or os.path.join(run, "reward", "export"), scalar_head=True)
    return rank_sft_draws(cfg, rm, _load(os.path.join(run, "sft", "export")), tokenizer, pairs)


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
    parser.add_argument(
        "--train-rm",
        metavar="DIR",
        help="first train a reward model into DIR as the demo does, with the overrides' reward: settings "
        "(e.g. reward.likelihood_coef=0), and probe that one",
    )
    parser.add_argument("--out", help="PPO output directory (default: RUN/probe_ppo_<reward>)")
    args = parser.parse_args(argv)

    from jrft.demo.settings import load_demo_config
    from jrft.demo.stages import tokenizer_of

    cfg = load_demo_config(
        None, [f"reward.rank_prompts={args.prompts}", f"reward.rank_samples={args.samples}", *args.overrides]
    )
    tokenizer = tokenizer_of({"base": os.path.join(args.run, "base")})
    t0 = time.time()
    if args.train_rm:
        args.rm = train_reward_model(args.run, cfg, args.train_rm)
    stats = reward_model_on_samples(args.run, cfg, tokenizer, reward_model=args.rm)
    stats["rm_lm_exact_match"] = reward_model_lm_accuracy(
        args.run, cfg, tokenizer, args.rm or os.path.join(args.run, "reward", "export")
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
