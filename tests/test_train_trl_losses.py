"""The loss types added for TRL users run end to end through the real runners (2 steps each, finite, the
right metrics): GRPO cispo and sapo written with TRL's names, the sample std, a TRL reward function that
uses trainer_state / log_metric / log_extra; DPO aot and discopop."""

import json
import math
import os

import pytest

from jrft.config import load_config
from jrft.train.runs import run_config

REWARDS = """
def ones(completions, trainer_state, log_metric, log_extra, **kwargs):
    # A TRL reward function: reads the trainer state, logs a metric and a completions-table column.
    log_metric("seen_step", trainer_state.global_step)
    log_extra("ones", [c.count("1") for c in completions])
    return [c.count("1") / max(len(c), 1) for c in completions]
"""


def _rows(out):
    return [json.loads(line) for line in open(os.path.join(out, "metrics.jsonl"))]


@pytest.mark.parametrize(
    "extra",
    [
        ("grpo.loss_type=cispo", "grpo.epsilon_high=5.0", "grpo.reward_std=sample"),
        ("grpo.loss_type=sapo", "grpo.scale_rewards=batch", "grpo.num_iterations=2"),
    ],
    ids=["cispo", "sapo"],
)
def test_grpo_trl_loss_types_run(tiny_task, tmp_path, extra):
    rewards = tmp_path / "r.py"
    rewards.write_text(REWARDS)
    out = tmp_path / "run"
    config = load_config(
        None,
        [
            "objective=grpo",
            f"output_dir={out}",
            f"model.path={tiny_task['model']}",
            f"data.train={tiny_task['prompts']}",
            "data.format=prompt_only",
            "data.buckets=16",
            "learning_rate=1e-3",
            "max_steps=2",
            "train.batch_size=2",
            "logging_steps=1",
            "save_steps=0",
            "grpo.log_completions_every=1",
            "grpo.num_generations=4",
            "grpo.max_completion_length=6",
            f"grpo.reward_functions=[{{spec: '{rewards}:ones'}}]",
            *extra,
        ],
    )
    run_config(config, progress=False)
    rows = [r for r in _rows(out) if "loss" in r]
    assert len(rows) == 2 and all(math.isfinite(r["loss"]) for r in rows)
    # The reward function's hooks: trainer_state counted the steps, log_metric reached the metrics (the
    # function ran in a worker process), log_extra a column of the completions table.
    assert [r["seen_step"] for r in rows] == [0, 1]
    table = [json.loads(line) for line in open(out / "completions.jsonl")]
    assert table and all(isinstance(r["ones"], int) for r in table)


# discopop (~7 s) in the slow suite: its loss is tested against NumPy (test_losses_dpo), aot runs the path
@pytest.mark.parametrize("loss_type", ["aot", pytest.param("discopop", marks=pytest.mark.slow)])
def test_dpo_trl_loss_types_run(tiny_task, tmp_path, loss_type):
    out = tmp_path / loss_type
    config = load_config(
        None,
        [
            "objective=dpo",
            f"output_dir={out}",
            f"model.path={tiny_task['model']}",
            f"data.train={tiny_task['pref_train']}",
            f"data.eval={tiny_task['pref_eval']}",
            "train.eval_batches=1",
            "train.eval_every=2",
            "data.buckets=32",
            "data.max_length=64",
            "optim.lr=1e-3",
            "train.steps=2",
            "train.batch_size=4",
            "train.log_every=1",
            "train.save_every=0",
            f"dpo.loss_type={loss_type}",
        ],
    )
    run_config(config, progress=False)
    rows = _rows(out)
    assert all(math.isfinite(r["loss"]) for r in rows if "loss" in r)
    assert any(math.isfinite(r.get("eval/loss", math.nan)) for r in rows)


@pytest.mark.slow  # ~35 s, mostly compiling PPO's programs; GRPO's run above covers the hooks by default
def test_ppo_reward_function_hooks(tiny_task, tmp_path):
    """PPO hands its reward functions the same trainer_state / log_metric as GRPO (TRL's names in the
    config: num_ppo_epochs, response_length)."""
    rewards = tmp_path / "r.py"
    rewards.write_text(REWARDS)
    out = tmp_path / "ppo"
    config = load_config(
        None,
        [
            "objective=ppo",
            f"output_dir={out}",
            f"model.path={tiny_task['model']}",
            f"data.train={tiny_task['prompts']}",
            "data.format=prompt_only",
            "data.buckets=16",
            "optim.lr=1e-3",
            "train.steps=2",
            "train.batch_size=4",
            "train.log_every=1",
            "train.save_every=0",
            "ppo.response_length=6",
            "ppo.num_ppo_epochs=1",
            "ppo.value_model=head",
            f"ppo.reward_functions=[{{spec: '{rewards}:ones'}}]",
        ],
    )
    run_config(config, progress=False)
    assert [r["seen_step"] for r in _rows(out) if "seen_step" in r] == [0, 1]
