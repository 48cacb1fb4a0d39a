"""One PPO (RLHF) round: sample, score (reward model and/or reward functions), GAE, clipped updates.

``PPORound`` is the ``step_fn`` the shared loop calls with a prompt batch; one loop step is one rollout, which
takes ``num_epochs x num_mini_batches`` optimizer steps of the policy (and of the value model). It reuses
GRPO's machinery: :mod:`jrft.train.rounds` (sampling, mini-batches, round metrics, completions table) with
one completion per prompt, the generic :func:`jrft.train.step.make_train_step` with the loss terms of
:mod:`jrft.train.objectives.ppo`, and the shared loop, checkpoints and export.

The value function is either a separate decoder with a scalar head (its own train state and optimizer;
the checkpointed state is a :class:`PPOState` holding both) or a scalar head on the policy (one train state,
loss = policy loss + vf_coef x value loss). TRL's ``PPOTrainer`` and OpenRLHF have the same semantics.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any

import jax
import numpy as np
from flax import nnx, struct

from jrft.models.lora import adapters_only, zero_adapters
from jrft.parallel.distributed import gather_rows, host_local_rows
from jrft.train import rounds
from jrft.train.logprobs import make_completion_forward
from jrft.train.objectives import ppo
from jrft.train.placement import device_batch
from jrft.train.reference import FrozenModel
from jrft.train.rollout import Rollout, SamplingSettings, global_reward_metrics, sample_rollout, score_rollout
from jrft.train.state import TrainState
from jrft.train.step import jit_step, make_train_step

if TYPE_CHECKING:  # the engine takes the section's values; it never reads a config file
    from jrft.config import PPOConfig


@struct.dataclass
class PPOState:
    """The checkpointed state: the policy's train state and, for ``value_model: separate``, the value
    model's (``None`` when the value is a head on the policy)."""

    policy: TrainState
    value: TrainState | None = None


def update_steps(
    config: PPOConfig, policy_graphdef, value_graphdef, optimizers, options: rounds.RoundOptions
):
    """The jitted PPO updates ``(state, mini_batch) -> (state, metrics)`` of the ``ppo`` section ``config``:
    ``(policy update, value update or None)``; with a value head (``value_graphdef`` None) the policy update
    trains both terms. Run inside the options' mesh (what :class:`PPORound` calls, ``jrft compile``
    compiles)."""
    c, o = config, options
    policy_tx, value_tx = optimizers
    hyper = dict(
        temperature=c.temperature,
        cliprange=c.cliprange,
        cliprange_value=c.cliprange_value,
        vf_coef=c.vf_coef,
        logits_chunk_size=o.logits_chunk_size,
    )

    def update(graphdef, terms, tx, sharding):
        loss = ppo.make_loss_fn(terms=terms, **hyper)
        step = make_train_step(graphdef, loss, ppo.normalizers, tx, grad_accum=o.grad_accum)
        return jit_step(step, mesh=o.mesh, state_sharding=sharding)

    if value_graphdef is None:
        return update(policy_graphdef, ("policy", "value"), policy_tx, o.state_sharding.policy), None
    return (
        update(policy_graphdef, ("policy",), policy_tx, o.state_sharding.policy),
        update(value_graphdef, ("value",), value_tx, o.state_sharding.value),
    )


class PPORound:
    """Callable ``(PPOState, prompt_batch) -> (PPOState, metrics)`` for :func:`jrft.train.loop.train_loop`.

    Args:
      config: the ``ppo`` section.
      policy_graphdef: the policy's graphdef (with a scalar head when ``value_model`` is ``head``).
      value_graphdef: the separate value model's graphdef (``None`` for ``head``).
      state: the initial :class:`PPOState` (the reference is a frozen copy of its policy parameters).
      optimizers: ``(policy_tx, value_tx or None)``.
      tokenizer: decodes completions; its EOS stops sampling.
      runner: a ``jrft.rewards.RewardRunner`` or ``None`` (reward model only).
      reward_model: ``(graphdef, FrozenModel)`` of the frozen reward model, or ``None`` (functions only).
        Its scores come from the global batch; each process keeps its rows.
      options: mesh, shardings (a :class:`PPOState` of them), padding, accumulation, completions table,
        memory levers (:class:`jrft.train.rounds.RoundOptions`).
    """

    def __init__(
        self,
        config: PPOConfig,
        policy_graphdef,
        value_graphdef,
        state: PPOState,
        optimizers,
        tokenizer,
        runner,
        reward_model,
        options: rounds.RoundOptions,
    ):
        c = self.c = config
        o = self.options = options
        self.policy_graphdef, self.tokenizer, self.runner, self.mesh = (
            policy_graphdef,
            tokenizer,
            runner,
            o.mesh,
        )
        self.sampling = SamplingSettings(
            1, c.max_new_tokens, c.temperature, c.top_k, c.top_p, o.pad_token_id, o.gather_sampler_weights
        )
        self.completion_log = rounds.CompletionLog(o.completions_path, c.log_completions_every, max_rows=8)
        self.head = value_graphdef is None
        self.update_policy, self.update_value = update_steps(
            c, policy_graphdef, value_graphdef, optimizers, options
        )
        self.policy_forward = make_completion_forward(
            policy_graphdef,
            temperature=c.temperature,
            logps=True,
            values=self.head,
            logits_chunk_size=o.logits_chunk_size,
        )
        if not self.head:
            self.value_forward = make_completion_forward(
                value_graphdef, temperature=1.0, logps=False, values=True
            )
        self.advantage_fn = ppo.make_advantage_fn(
            kl_coef=c.kl_coef,
            kl_estimator=c.kl_estimator,
            gamma=c.gamma,
            lam=c.lam,
            whiten_rewards=c.whiten_rewards,
            whiten_advantages=c.whiten_advantages,
        )
        # The reference is the starting policy, frozen (a copy: the train state's buffers are donated);
        # kl_coef = 0 never needs it.
        # With LoRA: the same forward with the adapters off (zero adapters over the policy state's own base
        # weights, read at each call), so the base is held once.
        self.reference, self.ref_adapters = None, None
        if c.kl_coef > 0 and adapters_only(state.policy.params):
            self.ref_adapters = zero_adapters(state.policy.params)
        elif c.kl_coef > 0:
            self.reference = FrozenModel(state.policy.params, state.policy.rest, offload=o.offload_reference)
        self.reward_model = None
        if reward_model is not None:
            rm_graphdef, self.reward_model = reward_model
            self.score_fn = ppo.make_score_fn(rm_graphdef, logits_chunk_size=o.logits_chunk_size)
        self.rounds = 0
        self.ref_logp_calls = 0  # kl_coef = 0 must never compute reference log-probs (tested)

    # -- rollout and rewards ----------------------------------------------------------------------------

    def _rollout(self, state: PPOState, prompt_batch) -> Rollout:
        policy = nnx.merge(self.policy_graphdef, state.policy.params, state.policy.rest)
        rng = state.policy.key(1)
        return sample_rollout(policy, prompt_batch, self.tokenizer, self.sampling, rng=rng, mesh=self.mesh)

    def _scores(self, rollout: Rollout, batch) -> tuple[np.ndarray, dict[str, np.ndarray], dict[str, float]]:
        """``[N]`` scalar reward per completion: reward functions (NaN = none applied -> 0) + reward-model
        score - ``missing_eos_penalty`` for truncated completions. Also per-row parts and metrics.

        Multi-host: rows are this process's (reward functions score them on its host; the reward model
        scores the global batch and each process keeps its rows); metrics are over all processes' rows."""
        t0 = time.perf_counter()
        n = rollout.num_rows
        scores, parts, metrics = np.zeros(n, np.float64), {}, {}
        if self.runner is not None:
            score_rollout(rollout, self.runner)
            scores += np.nan_to_num(rollout.rewards, nan=0.0)
            # the whole global batch is the one "group" (as in a single-process run)
            metrics.update(global_reward_metrics(rollout, rollout.num_rows * jax.process_count()))
        if self.reward_model is not None:
            rm = host_local_rows(self.reward_model.call(self.score_fn, batch))
            scores += rm
            parts["rm_score"] = rm
            metrics["rm_score/mean"] = float(gather_rows(rm).mean())
        if self.c.missing_eos_penalty is not None:
            scores -= self.c.missing_eos_penalty * rollout.truncated
        all_scores = gather_rows(scores)
        metrics["score/mean"] = float(all_scores.mean())
        metrics["score/std"] = float(all_scores.std())
        metrics["time/rewards"] = time.perf_counter() - t0
        return scores, parts, metrics

    # -- old log-probs / values, advantages -------------------------------------------------------------

    def _prepare(
        self, state: PPOState, batch, inputs: rounds.UpdateInputs
    ) -> tuple[dict[str, jax.Array], dict[str, jax.Array]]:
        """Adds ``old_logps``, ``old_values``, ``ref_logps`` (kl_coef > 0), ``advantages`` and ``returns`` to
        the per-row ``batch``; the forwards run on ``inputs`` (padded or packed rows)."""
        forward = {**inputs.full(), "completion_mask": batch["completion_mask"]}
        out = self.policy_forward(state.policy.params, state.policy.rest, forward)
        batch = {**batch, "old_logps": out["logps"]}
        if self.head:
            batch["old_values"] = out["values"]
        else:
            batch["old_values"] = self.value_forward(state.value.params, state.value.rest, forward)["values"]
        if self.ref_adapters is not None:
            batch["ref_logps"] = self.policy_forward(self.ref_adapters, state.policy.rest, forward)["logps"]
            self.ref_logp_calls += 1
        elif self.reference is not None:
            # The policy's own jitted forward (same graph): no second compilation for the reference
            # (offloaded: one wrapper program that first copies the reference parameters to the device).
            ref = self.reference.call(self.policy_forward, forward)
            batch["ref_logps"] = ref["logps"]
            self.ref_logp_calls += 1
        targets, metrics = self.advantage_fn(batch)
        metrics = {**metrics, "ref_logps_computed": "ref_logps" in batch}
        batch.update(targets)
        batch.pop("scores")
        batch.pop("ref_logps", None)
        return batch, metrics

    # -- update -----------------------------------------------------------------------------------------

    def _update(
        self, state: PPOState, batch, inputs: rounds.UpdateInputs
    ) -> tuple[PPOState, list[dict[str, Any]]]:
        n = batch["completion_mask"].shape[0]
        metrics = []
        for epoch in range(self.c.num_epochs):
            for rows in rounds.mini_batches(state.policy, n, self.c.num_mini_batches, epoch):
                mini = {**rounds.take_rows(batch, rows), **inputs.mini(rows)}
                policy, m = self.update_policy(state.policy, mini)
                if not self.head:
                    value, vm = self.update_value(state.value, mini)
                    m = {
                        **m,
                        "loss": m["loss"] + vm["loss"],
                        "policy_grad_norm": m["grad_norm"],
                        "value_grad_norm": vm["grad_norm"],
                        **{k: vm[k] for k in ("value_loss", "value_clip_frac", "value_mean")},
                    }
                    state = state.replace(policy=policy, value=value)
                else:
                    state = state.replace(policy=policy)
                metrics.append(m)
        return state, metrics

    def __call__(self, state: PPOState, prompt_batch) -> tuple[PPOState, dict[str, Any]]:
        t0 = time.perf_counter()
        rollout = self._rollout(state, prompt_batch)
        inputs = rounds.UpdateInputs(rollout, self.options)
        batch = device_batch({"completion_mask": rollout.completion_mask}, self.mesh)
        padded = None  # the padded rows, for the reward model's scores
        if self.reward_model is not None:
            # completion_mask over the whole row: a likelihood-scoring reward model sums the completion's
            # log-probs (model tokens only; tool results in multi-turn rollouts are 0)
            rows = {"completion_mask": rollout.row_completion_mask()}
            if self.options.pack_rows:
                rows.update(tokens=rollout.tokens, attention_mask=rollout.attention_mask)
            padded = device_batch(rows, self.mesh)
            if not self.options.pack_rows:
                padded = {**inputs.full(), **padded}
        scores, parts, metrics = self._scores(rollout, padded)
        batch["scores"] = device_batch({"scores": scores.astype(np.float32)}, self.mesh)["scores"]
        t1 = time.perf_counter()
        batch, adv_metrics = self._prepare(state, batch, inputs)
        jax.block_until_ready(batch)
        t2 = time.perf_counter()
        state, update_metrics = self._update(state, batch, inputs)
        update_metrics, adv_metrics = jax.device_get((update_metrics, adv_metrics))
        t3 = time.perf_counter()
        sample_s = rollout.seconds["sample"]
        metrics.update(rounds.round_metrics(rollout, update_metrics, sample_s))
        metrics.update({k: float(v) for k, v in adv_metrics.items()})
        metrics.update(
            {
                "time/sample": sample_s,
                "time/logps_values": t2 - t1,
                "time/update": t3 - t2,
                "time/round": t3 - t0,
                "padded_fraction": inputs.padded_fraction(),
            }
        )
        self.rounds += 1
        self.completion_log.write(rollout, self.rounds, extra={"score": scores, **parts})
        return state, metrics


def policy_export_model(policy_graphdef):
    """``PPOState -> Decoder``: the policy as a causal LM (a value head on it is dropped from the export)."""

    def export(state: PPOState):
        model = nnx.merge(policy_graphdef, state.policy.params, state.policy.rest)
        model.scalar_head = None
        return model

    return export
