"""``jrft grpo``: from a :class:`jrft.config.RunConfig` to a policy trained on its own samples.

config -> :func:`~jrft.train.runs.setup.setup_run` -> prompt iterator -> reward runner -> one
:class:`~jrft.train.grpo_round.GRPORound` per loop step (sample, score on the host, update) -> shared loop
(checkpoints, resume, metrics) -> export.
"""

from __future__ import annotations

from jrft.config import RunConfig
from jrft.train.grpo_round import GRPORound
from jrft.train.loop import LoopResult
from jrft.train.runs.export import loop_and_export
from jrft.train.runs.rl import policy_eval_fn, prompts_and_options, round_step
from jrft.train.runs.setup import memory_summary, reward_runner_from_config, setup_run


def run_grpo(config: RunConfig, *, progress: bool = True, runner=None, model_eval_fn=None) -> LoopResult:
    """GRPO; ``runner`` overrides the reward runner built from ``grpo.reward_functions`` (tests).

    ``model_eval_fn(model) -> metrics`` (optional) is called with the current policy every
    ``train.eval_every`` steps and at the end; its metrics are logged with an ``eval/`` prefix (e.g. held-out
    accuracy).
    """
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
    prompts, options = prompts_and_options(
        config, run, state_sharding=run.shardings, num_mini_batches=c.num_mini_batches
    )
    round_fn = GRPORound(
        c, run.graphdef, run.state, run.tx, run.tokenizer, runner, prompts, options, **agent_kwargs
    )
    step_fn = round_step(config, run, round_fn, runner, policy_of=lambda s: s)
    eval_fn = policy_eval_fn(
        config, run, c, policy_of=lambda s: s, num_generations=c.num_generations, model_eval_fn=model_eval_fn
    )
    memory = memory_summary(config, run.mesh, run.state)
    try:
        return loop_and_export(
            run,
            step_fn,
            run.state,
            prompts,
            eval_fn=eval_fn,
            bar_keys=("rewards/mean", "kl_mean", "clip_frac", "completion_length"),
            progress=progress,
            summary=run.train_ds.summary() + "\n" + memory,
        )
    finally:
        if toolbox is not None:
            toolbox.close()  # the tool worker processes
