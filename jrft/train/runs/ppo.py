"""``jrft ppo`` (RLHF): from a :class:`jrft.config.RunConfig` to a policy trained against a reward model
and/or reward functions, with a learned value function.

config -> :func:`~jrft.train.runs.setup.setup_run` (the policy) + the value model and the frozen reward model
-> one :class:`~jrft.train.ppo_round.PPORound` per loop step -> shared loop -> export of the policy.
"""

from __future__ import annotations

import jax

from jrft.config import RunConfig
from jrft.train.loop import LoopResult
from jrft.train.placement import place_state
from jrft.train.ppo_round import PPORound, PPOState, policy_export_model
from jrft.train.reference import FrozenModel
from jrft.train.runs.export import loop_and_export
from jrft.train.runs.rl import policy_eval_fn, prompts_and_options, round_step
from jrft.train.runs.setup import (
    build_model,
    memory_summary,
    optimizer_from_config,
    reward_runner_from_config,
    setup_run,
    total_updates,
)
from jrft.train.state import create_train_state, split_model


def run_ppo(config: RunConfig, *, progress: bool = True, runner=None, model_eval_fn=None) -> LoopResult:
    """PPO; ``runner`` overrides the reward runner built from ``ppo.reward_functions`` (tests).

    ``model_eval_fn(model) -> metrics`` (optional) is called with the current policy every
    ``train.eval_every`` steps and at the end, as in ``run_grpo``; its metrics are logged with an ``eval/``
    prefix.
    """
    c = config.ppo  # RunConfig checked that num_mini_batches divides train.batch_size
    head = c.value_model == "head"
    run = setup_run(config, scalar_head=head)
    mesh = run.mesh
    value_graphdef = value_state = value_tx = None
    if not head:
        # The value model starts from value_model_path, else the reward model (its head is a good start),
        # else the policy (fresh head).
        value_path = c.value_model_path or c.reward_model or config.model.path
        value_tx, _ = optimizer_from_config(config, total_steps=total_updates(config))
        value_graphdef, value_state = create_train_state(
            build_model(config, mesh, scalar_head=True, path=value_path), value_tx, seed=config.seed + 1
        )
    state, shardings = place_state(PPOState(run.state, value_state), mesh)
    reward_model = None
    if c.reward_model is not None:
        rm_graphdef, rm_params, rm_rest = split_model(
            build_model(config, mesh, scalar_head=True, path=c.reward_model)
        )
        reward_model = (rm_graphdef, FrozenModel(rm_params, rm_rest, copy=False))
    if runner is None and c.reward_functions:
        # One completion per prompt: the rollout is one "group" for normalize_then_sum (multi-host: this
        # process's rows, the ones its runner scores).
        runner = reward_runner_from_config(
            c,
            group_size=config.train.batch_size // jax.process_count(),
            max_new_tokens=c.max_new_tokens,
            mesh=mesh,
            dtype=config.model.dtype,
        )
    prompts, options = prompts_and_options(
        config, run, state_sharding=shardings, num_mini_batches=c.num_mini_batches
    )
    graphdefs, optimizers = (run.graphdef, value_graphdef), (run.tx, value_tx)
    round_fn = PPORound(c, *graphdefs, state, optimizers, run.tokenizer, runner, reward_model, options)
    step_fn = round_step(config, run, round_fn, runner, policy_of=lambda s: s.policy)
    eval_fn = policy_eval_fn(
        config, run, c, policy_of=lambda s: s.policy, num_generations=1, model_eval_fn=model_eval_fn
    )

    return loop_and_export(
        run,
        step_fn,
        state,
        prompts,
        eval_fn=eval_fn,
        bar_keys=("score/mean", "kl_mean", "clip_frac", "value_loss"),
        progress=progress,
        summary=run.train_ds.summary() + "\n" + memory_summary(config, mesh, run.state),
        export_model=policy_export_model(run.graphdef),
    )
