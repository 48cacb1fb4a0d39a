"""GRPO/PPO held-out evaluation: pass@k against a brute-force count, and a GRPO run that evaluates
``data.eval`` (greedy and sampled rewards, pass@k) into its metrics."""

import itertools
import json
import math
import os

import numpy as np
import pytest

from jrft.config import load_config
from jrft.train.rl_eval import pass_at_k, pass_ks
from jrft.train.runs import run_config


@pytest.mark.parametrize(("n", "c", "k"), [(4, 0, 1), (4, 1, 1), (4, 1, 2), (4, 2, 3), (8, 3, 4), (8, 8, 8)])
def test_pass_at_k_is_the_chance_that_some_of_k_draws_pass(n, c, k):
    draws = list(itertools.combinations(range(n), k))  # without replacement, as the estimator assumes
    hit = sum(any(i < c for i in draw) for draw in draws) / len(draws)
    assert math.isclose(pass_at_k(n, c, k), hit, rel_tol=1e-12)


def test_pass_ks():
    assert pass_ks(8) == [1, 2, 4, 8] and pass_ks(6) == [1, 2, 4, 6] and pass_ks(1) == [1]


REWARDS = """
def ones(completions, **kwargs):
    return [c.count("1") / max(len(c), 1) for c in completions]
"""


@pytest.mark.slow  # ~30 s on the 2-core machine, mostly compiling the greedy and sampled programs
def test_grpo_evaluates_heldout_prompts(tiny_task, tmp_path):
    rewards = tmp_path / "r.py"
    rewards.write_text(REWARDS)
    held_out = tmp_path / "eval.jsonl"
    rows = [json.loads(line) for line in open(tiny_task["prompts"])][:5]  # 5 prompts: a filler-padded batch
    held_out.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "run"
    config = load_config(
        None,
        [
            "objective=grpo",
            f"output_dir={out}",
            f"model.path={tiny_task['model']}",
            f"data.train={tiny_task['prompts']}",
            f"data.eval={held_out}",
            "data.format=prompt_only",
            "data.buckets=16",
            "optim.lr=1e-3",
            "train.steps=1",
            "train.batch_size=2",
            "train.save_every=0",
            "grpo.num_generations=4",
            "grpo.max_new_tokens=6",
            "grpo.eval_pass_threshold=0.2",
            f"grpo.reward_functions=[{{spec: '{rewards}:ones', label: ones}}]",
        ],
    )
    result = run_config(config, progress=False)
    m = result.eval_metrics
    for key in ("greedy/rewards/mean", "greedy/rewards/ones/mean", "sampled/rewards/mean", "sampled/pass@4"):
        assert np.isfinite(m[key]), (key, m)
    passes = [m[f"sampled/pass@{k}"] for k in (1, 2, 4)]
    assert passes == sorted(passes) and 0.0 <= passes[0] <= passes[-1] <= 1.0
    assert m["sampled/ones/pass@1"] == m["sampled/pass@1"]  # one function of weight 1: the same pass test
    logged = [json.loads(line) for line in open(os.path.join(out, "metrics.jsonl"))]
    assert any("eval/sampled/pass@2" in r for r in logged)
