"""The plumbing the GRPO and PPO runners share, as functions (they differ in their rounds and states, not
in how a round is fed, stepped and evaluated): this process's prompt iterator and the round options, the
loop's step around a round, and the loop's evaluation of the policy.

``policy_of(state)`` picks the policy's train state out of the loop state (GRPO: the state itself; PPO:
``PPOState.policy``).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

import jax
from flax import nnx

from jrft.config import RunConfig
from jrft.train.rounds import RoundOptions
from jrft.train.runs.setup import Run, rl_eval_fn, round_options, total_updates

if TYPE_CHECKING:  # jrft.data is imported when a run starts
    from jrft.data.iterator import BatchIterator


def prompts_and_options(
    config: RunConfig, run: Run, *, state_sharding, num_mini_batches: int
) -> tuple[BatchIterator, RoundOptions]:
    """This process's prompt iterator over ``run.train_ds`` and the rounds' options
    (:func:`~jrft.train.runs.setup.round_options`) for the loop state placed as ``state_sharding``."""
    from jrft.data import pad_token_id, train_iterator_from_config

    prompts = train_iterator_from_config(
        config, run.train_ds, process_index=jax.process_index(), process_count=jax.process_count()
    )
    options = round_options(
        config,
        run.mesh,
        state_sharding=state_sharding,
        num_mini_batches=num_mini_batches,
        pad_token_id=pad_token_id(run.tokenizer),
    )
    return prompts, options


def round_step(config: RunConfig, run: Run, round_fn: Callable, runner, policy_of: Callable) -> Callable:
    """The loop's ``(state, batch) -> (state, metrics)``: TRL's ``trainer_state`` for the reward functions
    of ``runner`` (steps done, epochs so far; ``runner`` may be None), one ``round_fn``, and the learning
    rate in the metrics."""
    rows, per_round = max(len(run.train_ds), 1), total_updates(config) // config.train.steps

    def step_fn(state, batch):
        if runner is not None:
            done = int(policy_of(state).step) // per_round
            getattr(runner, "set_trainer_state", lambda **_: None)(
                global_step=done, epoch=done * config.train.batch_size / rows, max_steps=config.train.steps
            )
        state, metrics = round_fn(state, batch)
        return state, {**metrics, "lr": run.schedule(max(int(policy_of(state).step) - 1, 0))}

    return step_fn


def policy_eval_fn(
    config: RunConfig,
    run: Run,
    section,
    policy_of: Callable,
    *,
    num_generations: int,
    model_eval_fn: Callable | None,
) -> Callable | None:
    """The loop's ``state -> metrics``: the policy evaluated on ``data.eval`` with the ``section``'s reward
    functions (:func:`~jrft.train.runs.setup.rl_eval_fn`, ``num_generations`` per prompt) and/or by the
    caller's ``model_eval_fn(model) -> metrics``; None when there is neither."""

    def params_of(state):
        policy = policy_of(state)
        return policy.params, policy.rest

    held_out = rl_eval_fn(config, run, section, run.graphdef, params_of, num_generations=num_generations)
    if held_out is None and model_eval_fn is None:
        return None

    def evaluate(state):
        metrics = held_out(state) if held_out is not None else {}
        if model_eval_fn is not None:
            metrics.update(model_eval_fn(nnx.merge(run.graphdef, *params_of(state))))
        return metrics

    return evaluate
