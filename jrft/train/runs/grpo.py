"""``jrft grpo``: from a :class:`jrft.config.RunConfig` to a policy trained on its own samples.

config -> :func:`~jrft.train.runs.setup.setup_run` -> prompt iterator -> reward runner -> one
:class:`~jrft.train.grpo_round.GRPORound` per loop step (sample, score on the host, update) -> shared loop
(checkpoints, resume, metrics) -> export.
"""

from __future__ import annotations

import jax
from flax import nnx

from jrft.config import RunConfig
from jrft.train.grpo_round import GRPORound
from jrft.train.loop import LoopResult
from jrft.train.runs.export import loop_and_export
from jrft.train.runs.setup import (
    memory_summary,
    reward_runner_from_config,
    rl_eval_fn,
    round_options,
    setup_run,
    total_updates,
)


def run_grpo(config: RunConfig, *, progress: bool = True, runner=None, model_eval_fn=None) -> LoopResult:
    """GRPO; ``runner`` overrides the reward runner built from ``grpo.reward_functions`` (tests).

    ``model_eval_fn(model) -> metrics`` (optional) is called with the current policy every
    ``train.eval_every`` steps and at the end; its metrics are logged with an ``eval/`` prefix (e.g. held-out
    accuracy).
    """
    from jrft.data import pad_token_id, train_iterator_from_config

    c = config.grpo
    run = setup_run(config)
    if runner is None and c.reward_functions:
        runner = reward_runner_from_config(
            c,
            group_size=c.num_generations,
            max_new_tokens=c.max_new_tokens,
            mesh=run.mesh,
            dtype=config.model.dtype,
        )
    agent_kwargs, toolbox = {}, None
    if c.tools or c.environment:  # multi-turn rollouts: tools or an environment answer between turns
        from jrft.agentic.agent import make_agent, round_functions

        agent, toolbox = make_agent(
            tools=[t.as_entry() for t in c.tools],
            environment=c.environment,
            parser=c.tool_parser,
            tool_timeout=c.tool_timeout_s,
            max_turns=c.max_turns,
        )
        agent_kwargs = round_functions(agent)
    prompts = train_iterator_from_config(
        config, run.train_ds, process_index=jax.process_index(), process_count=jax.process_count()
    )
    options = round_options(
        config,
        run.mesh,
        state_sharding=run.shardings,
        num_mini_batches=c.num_mini_batches,
        pad_token_id=pad_token_id(run.tokenizer),
    )
    round_fn = GRPORound(
        c, run.graphdef, run.state, run.tx, run.tokenizer, runner, prompts, options, **agent_kwargs
    )

    rows, per_round = max(len(run.train_ds), 1), total_updates(config) // config.train.steps

    def step_fn(state, batch):
        done = int(state.step) // per_round  # TRL's trainer_state for the rewards: steps done, epochs so far
        getattr(runner, "set_trainer_state", lambda **_: None)(
            global_step=done, epoch=done * config.train.batch_size / rows, max_steps=config.train.steps
        )
        state, metrics = round_fn(state, batch)
        return state, {**metrics, "lr": run.schedule(max(int(state.step) - 1, 0))}

    held_out = rl_eval_fn(
        config, run, c, run.graphdef, lambda s: (s.params, s.rest), num_generations=c.num_generations
    )

    def eval_state(state):
        metrics = held_out(state) if held_out is not None else {}
        if model_eval_fn is not None:
            metrics.update(model_eval_fn(nnx.merge(run.graphdef, state.params, state.rest)))
        return metrics

    memory = memory_summary(config, run.mesh, run.state)
    try:
        return loop_and_export(
            run,
            step_fn,
            run.state,
            prompts,
            eval_fn=None if model_eval_fn is None and held_out is None else eval_state,
            bar_keys=("rewards/mean", "kl_mean", "clip_frac", "completion_length"),
            progress=progress,
            summary=run.train_ds.summary() + "\n" + memory,
        )
    finally:
        if toolbox is not None:
            toolbox.close()  # the tool worker processes
