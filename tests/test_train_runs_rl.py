"""The plumbing the GRPO and PPO runners share (jrft.train.runs.rl), on stand-in runs and states: the loop
step tells the reward functions TRL's trainer_state and logs the learning rate; the loop's evaluation calls
the caller's model_eval_fn on the policy picked out of the state, and is None without anything to run."""

import types

import jax.numpy as jnp
from flax import nnx

from jrft.config import load_config
from jrft.models import Decoder, ModelConfig
from jrft.models.testing import tiny_hf_config
from jrft.train.runs.rl import policy_eval_fn, round_step


class _Runner:
    def __init__(self):
        self.calls = []

    def set_trainer_state(self, **state):
        self.calls.append(state)


def _config(*overrides):
    return load_config(None, ["objective=grpo", "grpo.reward_functions=[{name: accuracy}]", *overrides])


def _run(graphdef=None):  # 16 training prompts, no eval data, lr = update / 2
    return types.SimpleNamespace(
        train_ds=[None] * 16, eval_ds=None, schedule=lambda update: 0.5 * update, graphdef=graphdef
    )


def test_round_step_sets_the_trainer_state_then_runs_the_round_and_logs_the_lr():
    config = _config("train.steps=3", "train.batch_size=8", "grpo.num_iterations=2")
    state = types.SimpleNamespace(policy=types.SimpleNamespace(step=jnp.asarray(4)))  # 2 rounds done

    def round_fn(state, batch):
        return types.SimpleNamespace(policy=types.SimpleNamespace(step=state.policy.step + 2)), {"loss": 1.0}

    runner = _Runner()
    step_fn = round_step(config, _run(), round_fn, runner, policy_of=lambda s: s.policy)
    state, metrics = step_fn(state, batch=None)
    assert runner.calls == [{"global_step": 2, "epoch": 2 * 8 / 16, "max_steps": 3}]
    assert int(state.policy.step) == 6 and metrics == {"loss": 1.0, "lr": 0.5 * 5}
    # no runner (PPO with a reward model only): the round alone
    assert (
        round_step(config, _run(), round_fn, None, policy_of=lambda s: s.policy)(state, None)[1]["lr"]
        == 0.5 * 7
    )


def test_policy_eval_fn_merges_the_policy_for_model_eval_fn_and_is_none_without_evaluations():
    config = _config()
    model = Decoder(ModelConfig.from_hf(tiny_hf_config("llama")), rngs=nnx.Rngs(0))
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    state = types.SimpleNamespace(policy=types.SimpleNamespace(params=params, rest=rest))
    run = _run(graphdef)
    assert (
        policy_eval_fn(
            config, run, config.grpo, policy_of=lambda s: s.policy, num_generations=1, model_eval_fn=None
        )
        is None
    )

    def model_eval_fn(m):
        return {"vocab": m.config.vocab_size}

    evaluate = policy_eval_fn(
        config, run, config.grpo, policy_of=lambda s: s.policy, num_generations=1, model_eval_fn=model_eval_fn
    )
    assert evaluate(state) == {"vocab": model.config.vocab_size}
