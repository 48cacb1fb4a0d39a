"""``jrft grpo | ppo``: from a :class:`jrft.config.RunConfig` to a policy trained on its own samples.

config -> tokenizer + policy on the mesh -> prompt iterator -> reward runner -> one round per loop step
(sample, score on the host, update) -> shared loop (checkpoints, resume, metrics) -> export.
"""

from __future__ import annotations

import os

import jax

from jrft.config import RunConfig
from jrft.train.loop import LoopResult
from jrft.train.offline import build_model, loop_and_export, memory_summary, optimizer_from_config
from jrft.train.sharding import mesh_from_config, place_state
from jrft.train.state import create_train_state


def reward_runner_from_config(section, *, group_size: int, max_new_tokens: int):
    """A ``RewardRunner`` for the ``grpo`` / ``ppo`` section; DAPO's soft overlong penalty is added as one
    more reward function when ``overlong_buffer`` > 0."""
    from jrft.rewards import RewardRunner

    entries = [f.as_runner_spec() for f in section.reward_functions]
    buffer = getattr(section, "overlong_buffer", 0)
    if buffer:
        entries.append(
            {
                "name": "soft_overlong",
                "weight": getattr(section, "overlong_penalty", 1.0),
                "max_length": max_new_tokens,
                "cache_length": buffer,
            }
        )
    return RewardRunner.from_config(
        entries, timeout=section.reward_timeout_s, combine=section.reward_combine, group_size=group_size
    )


def run_online(config: RunConfig, *, progress: bool = True) -> LoopResult:
    """Trains ``config.objective`` (grpo or ppo) and exports the policy; returns the loop's result."""
    if config.objective == "grpo":
        return run_grpo(config, progress=progress)
    if config.objective == "ppo":
        from jrft.train.ppo_trainer import run_ppo

        return run_ppo(config, progress=progress)
    raise ValueError(f"run_online: objective {config.objective!r} is not online; use grpo or ppo")


def run_grpo(config: RunConfig, *, progress: bool = True, runner=None, model_eval_fn=None) -> LoopResult:
    """GRPO; ``runner`` overrides the reward runner built from ``grpo.reward_functions`` (tests).

    ``model_eval_fn(model) -> metrics`` (optional) is called with the current policy every
    ``train.eval_every`` steps and at the end; its metrics are logged with an ``eval/`` prefix (e.g. held-out
    accuracy).
    """
    from transformers import AutoTokenizer

    from jrft.data import datasets_from_config, pad_token_id, train_iterator_from_config
    from jrft.train.grpo_trainer import GRPORound

    c = config.grpo
    mesh = mesh_from_config(config.mesh.data, config.mesh.fsdp, config.mesh.tensor)
    tokenizer = AutoTokenizer.from_pretrained(config.model.tokenizer_path)
    train_ds, _ = datasets_from_config(config, tokenizer)
    model = build_model(config, mesh)
    updates = config.train.steps * c.num_iterations * c.num_mini_batches
    tx, schedule = optimizer_from_config(config, total_steps=updates)
    graphdef, state = create_train_state(model, tx, seed=config.seed)
    del model
    state, shardings = place_state(state, mesh)
    if runner is None:
        runner = reward_runner_from_config(c, group_size=c.num_generations, max_new_tokens=c.max_new_tokens)
    prompts = train_iterator_from_config(
        config, train_ds, process_index=jax.process_index(), process_count=jax.process_count()
    )
    micro = config.train.micro_batch_size
    rows = config.train.batch_size * c.num_generations // c.num_mini_batches
    grad_accum = 1 if micro is None else max(rows // (micro * c.num_generations), 1)
    round_fn = GRPORound(
        c,
        graphdef,
        state,
        tx,
        tokenizer,
        runner,
        prompts,
        mesh=mesh,
        state_sharding=shardings,
        pad_token_id=pad_token_id(tokenizer),
        grad_accum=grad_accum,
        completions_path=os.path.join(config.output_dir, "completions.jsonl"),
        logits_chunk_size=config.train.logits_chunk_size,
        offload_reference=config.train.offload_reference,
    )

    def step_fn(state, batch):
        state, metrics = round_fn(state, batch)
        return state, {**metrics, "lr": schedule(max(int(state.step) - 1, 0))}

    def eval_state(state):
        from flax import nnx

        return model_eval_fn(nnx.merge(graphdef, state.params, state.rest))

    return loop_and_export(
        config,
        step_fn,
        state,
        prompts,
        graphdef,
        tokenizer,
        eval_fn=None if model_eval_fn is None else eval_state,
        bar_keys=("rewards/mean", "kl_mean", "clip_frac", "completion_length"),
        progress=progress,
        summary=train_ds.summary()
        + "\n"
        + memory_summary(
            config,
            mesh,
            state,
            rows=config.train.batch_size * c.num_generations,
            cache_rows=config.train.batch_size * c.num_generations,
            cache_len=config.data.max_prompt_length + c.max_new_tokens,
        ),
    )
