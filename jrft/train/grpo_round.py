"""One GRPO round: sample G completions per prompt, score them on the host, update the policy.

``GRPORound`` is the ``step_fn`` the shared loop calls with a prompt batch: one loop step is one
generation round, which takes ``num_iterations (mu) x num_mini_batches`` optimizer steps. Policy, sampler
and reference live in this one process and share the parameters: no weight transfer.

Multi-host: each process holds its rows of the global prompt batch; the sampler runs once over the global
batch and each process keeps, decodes and scores its own completions (whole groups, see
``jrft.train.rollout``; multi-turn: one global KV session, each process stepping its own trajectories, see
``jrft.agentic.rollout``). Rewards are gathered so that advantages (including ``scale_rewards: batch``) and
logged metrics are those of the global batch, the same numbers as a one-process run of the same config;
the update is fed global arrays. DAPO dynamic sampling agrees across processes through gathered counts: all
take the same number of sampling rounds and keep the same number of groups.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any

import jax
import jax.numpy as jnp
import numpy as np

from jrft.losses import group_advantages
from jrft.models.lora import adapters_only, zero_adapters
from jrft.parallel.distributed import gather_rows, local_rows
from jrft.train import rounds
from jrft.train.logprobs import make_completion_forward
from jrft.train.objectives import grpo
from jrft.train.placement import device_batch
from jrft.train.reference import FrozenModel
from jrft.train.rollout import (
    Rollout,
    SamplingSettings,
    concat_rollouts,
    global_reward_metrics,
    group_has_signal,
    sample_rollout,
    score_rollout,
    widen_rollout,
)
from jrft.train.step import jit_step, make_train_step

if TYPE_CHECKING:  # the engine takes the section's values; it never reads a config file
    from jrft.config import GRPOConfig

# One compiled program instead of a dozen eager ops per round.
_group_advantages = jax.jit(group_advantages, static_argnames=("group_size", "scale", "baseline", "std"))


def on_policy(config: GRPOConfig) -> bool:
    """One update per rollout (``mu = 1``, one mini-batch): the ratio is exactly 1 and no old log-probs are
    needed (what :class:`GRPORound` does, and ``jrft compile`` builds)."""
    return config.num_iterations == 1 and config.num_mini_batches == 1


def update_step(config: GRPOConfig, graphdef, optimizer, options: rounds.RoundOptions):
    """The jitted GRPO update ``(state, mini_batch) -> (state, metrics)`` of the ``grpo`` section
    ``config``, run inside the options' mesh (what :class:`GRPORound` calls, and ``jrft compile``
    compiles)."""
    c = config
    loss_fn = grpo.make_loss_fn(
        temperature=c.temperature,
        clip_eps_low=c.epsilon_low,
        clip_eps_high=c.epsilon_high,
        beta=c.beta,
        kl_estimator=c.kl_estimator,
        aggregation=c.loss_aggregation,
        importance_level=c.importance_level,
        max_completion_length=c.max_new_tokens,
        logits_chunk_size=options.logits_chunk_size,
        sapo_temperature_pos=c.sapo_temperature_pos,
        sapo_temperature_neg=c.sapo_temperature_neg,
    )
    step = make_train_step(graphdef, loss_fn, grpo.normalizers, optimizer, grad_accum=options.grad_accum)
    return jit_step(step, mesh=options.mesh, state_sharding=options.state_sharding)


class GRPORound:
    """Callable ``(state, prompt_batch) -> (state, metrics)`` for :func:`jrft.train.loop.train_loop`.

    Args:
      config: the ``grpo`` section.
      graphdef: the policy's nnx graphdef; ``state`` its initial train state (reference = a frozen copy).
      optimizer: the optax transformation of the train state.
      tokenizer: decodes completions for the reward functions; its EOS stops sampling.
      runner: a ``jrft.rewards.RewardRunner`` (group_size = G).
      prompts: the prompt iterator (dynamic sampling pulls extra batches from it).
      options: mesh, shardings, padding, accumulation, completions table, memory levers
        (:class:`jrft.train.rounds.RoundOptions`).
      sample_fn: ``(model, prompt_batch, tokenizer, settings, rng=, mesh=) -> Rollout``, how a rollout is
        sampled (default :func:`~jrft.train.rollout.sample_rollout`; multi-turn: ``jrft.agentic``).
      score_fn: ``(rollout, runner) -> Rollout`` (default :func:`~jrft.train.rollout.score_rollout`).
    """

    def __init__(
        self,
        config: GRPOConfig,
        graphdef,
        state,
        optimizer,
        tokenizer,
        runner,
        prompts,
        options: rounds.RoundOptions,
        *,
        sample_fn=None,
        score_fn=None,
    ):
        c, o = config, options
        self.sample_fn, self.score_fn = sample_fn or sample_rollout, score_fn or score_rollout
        self.c, self.graphdef, self.tokenizer, self.runner, self.prompts = (
            c,
            graphdef,
            tokenizer,
            runner,
            prompts,
        )
        self.mesh, self.options = o.mesh, o
        self.sampling = SamplingSettings(
            c.num_generations,
            c.max_new_tokens,
            c.temperature,
            c.top_k,
            c.top_p,
            o.pad_token_id,
            o.gather_sampler_weights,
        )
        self.completion_log = rounds.CompletionLog(
            o.completions_path, c.log_completions_every, max_rows=2 * c.num_generations
        )
        self.update = update_step(c, graphdef, optimizer, o)
        self.logps_fn = make_completion_forward(
            graphdef, temperature=c.temperature, logits_chunk_size=o.logits_chunk_size
        )
        # The reference is the starting policy, frozen (a copy: the train state's buffers are donated). With
        # LoRA it is the same forward with the adapters off: zero adapters (tiny) over the train state's own
        # base weights, read from the current state at each call, so the base is held once.
        self.reference, self.ref_adapters = None, None
        if c.beta > 0 and adapters_only(state.params):
            self.ref_adapters = zero_adapters(state.params)
        elif c.beta > 0:
            self.reference = FrozenModel(state.params, state.rest, offload=o.offload_reference)
        self.ref_logp_calls = 0  # beta == 0 must never compute reference log-probs (tested)
        self.on_policy = on_policy(c)
        self.rounds = 0

    # -- rollout ----------------------------------------------------------------------------------------

    def _policy(self, state):
        from flax import nnx

        return nnx.merge(self.graphdef, state.params, state.rest)

    def _rollout(self, state, prompt_batch, salt: int) -> Rollout:
        policy = self._policy(state)
        rollout = self.sample_fn(
            policy, prompt_batch, self.tokenizer, self.sampling, rng=state.key(salt), mesh=self.mesh
        )
        rollout = self.score_fn(rollout, self.runner)
        rollout.reward_metrics = global_reward_metrics(rollout, self.c.num_generations)
        return rollout

    def collect(self, state, prompt_batch) -> tuple[Rollout, dict[str, float]]:
        """A scored rollout; with dynamic sampling, only groups with reward spread, topped up from more
        prompt batches for at most ``max_sampling_rounds`` rounds (then what there is).

        Multi-host: the loop goes on while ANY process has fewer than its wanted groups, and every process
        then keeps the smallest count any process has, so all feed the update the same number of rows."""
        c, g = self.c, self.c.num_generations
        rollout = self._rollout(state, prompt_batch, salt=1)
        seconds = dict(rollout.seconds)
        stats = {"sampling_rounds": 1.0}
        if not c.dynamic_sampling:
            return rollout, {**stats, **{f"time/{k}": v for k, v in seconds.items()}}
        wanted = rollout.num_rows // g
        keep = group_has_signal(rollout.rewards, g)
        kept, total = [rollout.select_groups(keep, g)], int(keep.size)
        last_metrics = rollout.reward_metrics
        rounds = 1

        def fewest_kept() -> int:  # groups kept so far, the smallest over processes (collective)
            return int(gather_rows(np.asarray([sum(r.num_rows for r in kept) // g])).min())

        while fewest_kept() < wanted and rounds < c.max_sampling_rounds:
            more = self._rollout(state, next(self.prompts), salt=1 + rounds)
            for k, v in more.seconds.items():
                seconds[k] = seconds.get(k, 0.0) + v
            keep = group_has_signal(more.rewards, g)
            kept.append(more.select_groups(keep, g))
            total += int(keep.size)
            last_metrics = more.reward_metrics
            rounds += 1
        counts = gather_rows(np.asarray([[sum(r.num_rows for r in kept) // g, total]]))  # [P, 2]
        take = min(int(counts[:, 0].min()), wanted)
        kept = [r for r in kept if r.num_rows]
        merged = concat_rollouts(kept) if kept else rollout.select_groups(np.zeros(wanted, bool), g)
        if merged.num_rows > take * g:
            merged = merged.select_groups(np.arange(merged.num_rows // g) < take, g)
        if jax.process_count() > 1:  # one global batch shape: the widest parts of any process
            widths = gather_rows(np.asarray([[merged.prompt_length, merged.completion_mask.shape[1]]]))
            merged = widen_rollout(merged, int(widths[:, 0].max()), int(widths[:, 1].max()))
            merged.reward_metrics = last_metrics  # the last round's global metrics, as one process reports
        stats.update(
            sampling_rounds=float(rounds),
            kept_group_fraction=float(counts[:, 0].sum()) / max(int(counts[:, 1].sum()), 1),
        )
        return merged, {**stats, **{f"time/{k}": v for k, v in seconds.items()}}

    # -- update -----------------------------------------------------------------------------------------

    def _batch(self, state, rollout: Rollout, inputs: rounds.UpdateInputs) -> dict[str, jax.Array]:
        """The rollout's per-row arrays (``completion_mask``, ``advantages``, old / reference log-probs) on
        the device; the model inputs (padded or packed rows) come from ``inputs``."""
        c = self.c
        # the global batch's rewards (each process scored its own rows), so batch-level baselines and scales
        # see every completion; then this process's rows
        advantages = np.asarray(
            _group_advantages(
                jnp.asarray(gather_rows(rollout.rewards), jnp.float32),
                group_size=c.num_generations,
                scale=c.scale_rewards,
                baseline=c.baseline,
                std=c.reward_std,
            )
        )
        if jax.process_count() > 1:
            advantages = local_rows(advantages)
        completion_mask = rollout.completion_mask.copy()
        if c.mask_truncated_completions:
            completion_mask[rollout.truncated] = 0  # DAPO overlong filtering: no gradient from cut-off rows
        host = {"completion_mask": completion_mask, "advantages": advantages.astype(np.float32)}
        if not self.on_policy and c.old_logprobs == "sampler":
            host["old_logps"] = rollout.sampler_logps
        batch = device_batch(host, self.mesh)
        if (not self.on_policy and c.old_logprobs == "recompute") or c.beta > 0:
            forward = {**inputs.full(), "completion_mask": batch["completion_mask"]}
        if not self.on_policy and c.old_logprobs == "recompute":
            batch["old_logps"] = self.logps_fn(state.params, state.rest, forward)["logps"]
        if c.beta > 0:
            self.ref_logp_calls += 1
            self.ref_logps_this_round = 1.0
            if self.ref_adapters is not None:
                batch["ref_logps"] = self.logps_fn(self.ref_adapters, state.rest, forward)["logps"]
            else:
                batch["ref_logps"] = self.reference.call(self.logps_fn, forward)["logps"]
        return batch

    def __call__(self, state, prompt_batch) -> tuple[Any, dict[str, Any]]:
        c = self.c
        t0 = time.perf_counter()
        rollout, metrics = self.collect(state, prompt_batch)
        if rollout.num_rows == 0:  # dynamic sampling found no group with signal: nothing to learn from
            return state, {**metrics, **rollout.reward_metrics, "skipped_update": 1.0}
        t1 = time.perf_counter()
        self.ref_logps_this_round = 0.0
        inputs = rounds.UpdateInputs(rollout, self.options)
        batch = self._batch(state, rollout, inputs)
        jax.block_until_ready(batch)
        t2 = time.perf_counter()
        n = int(batch["completion_mask"].shape[0])  # global rows (all processes)
        update_metrics = []
        for iteration in range(c.num_iterations):
            for rows in rounds.mini_batches(state, n, c.num_mini_batches, iteration):
                state, m = self.update(state, {**rounds.take_rows(batch, rows), **inputs.mini(rows)})
                update_metrics.append(m)
        update_metrics = jax.device_get(update_metrics)
        t3 = time.perf_counter()
        metrics.update(rollout.reward_metrics)
        metrics.update(rounds.round_metrics(rollout, update_metrics, metrics.get("time/sample", 0.0)))
        metrics.update(
            {
                "time/logps": t2 - t1,
                "time/update": t3 - t2,
                "time/round": t3 - t0,
                "ref_logps_computed": self.ref_logps_this_round,
                "padded_fraction": inputs.padded_fraction(),
                "batch/zero_std_groups": float(
                    np.mean(~group_has_signal(gather_rows(rollout.rewards), c.num_generations))
                ),
            }
        )
        self.rounds += 1
        self.completion_log.write(rollout, self.rounds)
        return state, metrics
