"""One PPO (RLHF) round: sample, score (reward model and/or reward functions), GAE, clipped updates.

``PPORound`` is the ``step_fn`` the shared loop calls with a prompt batch; one loop step is one rollout, which
takes ``num_epochs x num_mini_batches`` optimizer steps of the policy (and of the value model). It reuses
GRPO's machinery: :func:`jrft.train.rollout.sample_rollout` / ``score_rollout`` (one completion per prompt),
the generic :func:`jrft.train.step.make_train_step` with the loss terms of
:mod:`jrft.train.objectives.ppo`, and the loop, checkpoints and export of :mod:`jrft.train.offline`.

The value function is either a separate decoder with a scalar head (its own train state and optimizer;
the checkpointed state is a :class:`PPOState` holding both) or a scalar head on the policy (one train state,
loss = policy loss + vf_coef x value loss). TRL's ``PPOTrainer`` and OpenRLHF have the same semantics.
"""

from __future__ import annotations

import os
import time
from typing import Any

import jax
import numpy as np
from flax import nnx, struct

from jrft.config import PPOConfig, RunConfig
from jrft.train.loop import LoopResult
from jrft.train.objectives import ppo
from jrft.train.reference import FrozenParams
from jrft.train.rollout import (
    Rollout,
    append_completions,
    gather_rows,
    global_reward_metrics,
    host_local_rows,
    sample_rollout,
    score_rollout,
)
from jrft.train.sharding import device_batch
from jrft.train.state import TrainState
from jrft.train.step import jit_step, make_train_step


@struct.dataclass
class PPOState:
    """The checkpointed state: the policy's train state and, for ``value_model: separate``, the value
    model's (``None`` when the value is a head on the policy)."""

    policy: TrainState
    value: TrainState | None = None


@struct.dataclass
class FrozenModel:
    """A model that is only evaluated (reward model, reference): its parameters and other variables."""

    params: Any
    rest: Any


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
      mesh, state_sharding: where the state lives (a :class:`PPOState` of shardings).
      grad_accum: micro-batches per mini-batch.
      completions_path: JSONL table of sample completions (None: not written).
      logits_chunk_size: ``train.logits_chunk_size`` (policy log-probs over LM-head chunks; 0 = off).
      offload_reference: ``train.offload_reference`` (the frozen reference in host memory).
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
        *,
        mesh,
        state_sharding: PPOState,
        pad_token_id: int,
        grad_accum: int = 1,
        completions_path: str | None = None,
        logits_chunk_size: int = 0,
        offload_reference: bool = False,
    ):
        c = self.c = config
        self.policy_graphdef, self.tokenizer, self.runner = policy_graphdef, tokenizer, runner
        self.mesh, self.pad_token_id, self.completions_path = mesh, pad_token_id, completions_path
        self.head = value_graphdef is None
        policy_tx, value_tx = optimizers
        hyper = dict(
            temperature=c.temperature,
            cliprange=c.cliprange,
            cliprange_value=c.cliprange_value,
            vf_coef=c.vf_coef,
            logits_chunk_size=logits_chunk_size,
        )
        policy_terms = ("policy", "value") if self.head else ("policy",)
        policy_step = make_train_step(
            policy_graphdef,
            ppo.make_loss_fn(terms=policy_terms, **hyper),
            ppo.normalizers,
            policy_tx,
            grad_accum=grad_accum,
        )
        self.update_policy = jit_step(policy_step, state_sharding=state_sharding.policy)
        self.policy_forward = ppo.make_forward_fn(
            policy_graphdef,
            temperature=c.temperature,
            logps=True,
            values=self.head,
            logits_chunk_size=logits_chunk_size,
        )
        if not self.head:
            value_loss = ppo.make_loss_fn(terms=("value",), **hyper)
            value_step = make_train_step(
                value_graphdef, value_loss, ppo.normalizers, value_tx, grad_accum=grad_accum
            )
            self.update_value = jit_step(value_step, state_sharding=state_sharding.value)
            self.value_forward = ppo.make_forward_fn(
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
        self.reference = None
        if c.kl_coef > 0:
            self.reference = FrozenParams(state.policy.params, offload=offload_reference)
            self.reference_rest = state.policy.rest
        self.reward_model = None
        if reward_model is not None:
            rm_graphdef, self.reward_model = reward_model
            self.score_fn = ppo.make_score_fn(rm_graphdef)
        self.rounds = 0
        self.ref_logp_calls = 0  # kl_coef = 0 must never compute reference log-probs (tested)

    # -- rollout and rewards ----------------------------------------------------------------------------

    def _rollout(self, state: PPOState, prompt_batch) -> Rollout:
        c = self.c
        policy = nnx.merge(self.policy_graphdef, state.policy.params, state.policy.rest)
        return sample_rollout(
            policy,
            prompt_batch,
            self.tokenizer,
            num_generations=1,
            max_new_tokens=c.max_new_tokens,
            temperature=c.temperature,
            top_k=c.top_k,
            top_p=c.top_p,
            rng=state.policy.key(1),
            mesh=self.mesh,
            pad_token_id=self.pad_token_id,
        )

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
            rm = host_local_rows(self.score_fn(self.reward_model.params, self.reward_model.rest, batch))
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

    def _prepare(self, state: PPOState, batch) -> tuple[dict[str, jax.Array], dict[str, jax.Array]]:
        """Adds ``old_logps``, ``old_values``, ``ref_logps`` (kl_coef > 0), ``advantages`` and ``returns``."""
        out = self.policy_forward(state.policy.params, state.policy.rest, batch)
        batch = {**batch, "old_logps": out["logps"]}
        if self.head:
            batch["old_values"] = out["values"]
        else:
            batch["old_values"] = self.value_forward(state.value.params, state.value.rest, batch)["values"]
        if self.reference is not None:
            # The policy's own jitted forward (same graph): no second compilation for the reference
            # (offloaded: one wrapper program that first copies the reference parameters to the device).
            ref = self.reference.call(self.policy_forward, self.reference_rest, batch)
            batch["ref_logps"] = ref["logps"]
            self.ref_logp_calls += 1
        targets, metrics = self.advantage_fn(batch)
        metrics = {**metrics, "ref_logps_computed": "ref_logps" in batch}
        batch.update(targets)
        batch.pop("scores")
        batch.pop("ref_logps", None)
        return batch, metrics

    # -- update -----------------------------------------------------------------------------------------

    def _mini_batches(self, state: PPOState, n: int, epoch: int) -> list[np.ndarray]:
        """Row indices of each mini-batch of one epoch: a fresh permutation per epoch (deterministic in the
        state's rng and step, so a resumed run shuffles the same way); one mini-batch: all rows in order."""
        m = self.c.num_mini_batches
        if m == 1:
            return [np.arange(n)]
        seed = [*np.asarray(jax.device_get(state.policy.rng)).tolist(), int(state.policy.step), epoch]
        order = np.random.default_rng(seed).permutation(n)
        return np.array_split(order, m)

    def _update(self, state: PPOState, batch) -> tuple[PPOState, list[dict[str, Any]]]:
        n = batch["tokens"].shape[0]
        metrics = []
        for epoch in range(self.c.num_epochs):
            for rows in self._mini_batches(state, n, epoch):
                mini = {k: v[rows] if len(rows) < n else v for k, v in batch.items()}
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
        host = {
            "tokens": rollout.tokens,
            "attention_mask": rollout.attention_mask,
            "completion_mask": rollout.completion_mask,
        }
        batch = device_batch(host, self.mesh)
        scores, parts, metrics = self._scores(rollout, batch)
        batch["scores"] = device_batch({"scores": scores.astype(np.float32)}, self.mesh)["scores"]
        t1 = time.perf_counter()
        batch, adv_metrics = self._prepare(state, batch)
        jax.block_until_ready(batch)
        t2 = time.perf_counter()
        state, update_metrics = self._update(state, batch)
        update_metrics, adv_metrics = jax.device_get((update_metrics, adv_metrics))
        t3 = time.perf_counter()
        metrics.update({k: float(np.mean([m[k] for m in update_metrics])) for k in update_metrics[0]})
        metrics.update({k: float(v) for k, v in adv_metrics.items()})
        lengths = gather_rows(rollout.completion_mask.sum(axis=1))  # all processes' rows
        sample_s = rollout.seconds["sample"]
        metrics.update(
            {
                "completion_length": float(lengths.mean()),
                "truncated_fraction": float(gather_rows(rollout.truncated).mean()),
                "time/sample": sample_s,
                "time/logps_values": t2 - t1,
                "time/update": t3 - t2,
                "time/round": t3 - t0,
                "rollout_tokens_per_s": float(lengths.sum()) / max(sample_s, 1e-9),
            }
        )
        self.rounds += 1
        self._log_completions(rollout, {"score": scores, **parts})
        return state, metrics

    def _log_completions(self, rollout: Rollout, extra) -> None:
        every = self.c.log_completions_every
        if not self.completions_path or not every or self.rounds % every or jax.process_index() != 0:
            return
        append_completions(self.completions_path, rollout, round_index=self.rounds, max_rows=8, extra=extra)


def policy_export_model(policy_graphdef):
    """``PPOState -> Decoder``: the policy as a causal LM (a value head on it is dropped from the export)."""

    def export(state: PPOState):
        model = nnx.merge(policy_graphdef, state.policy.params, state.policy.rest)
        model.scalar_head = None
        return model

    return export


def run_ppo(config: RunConfig, *, progress: bool = True, runner=None) -> LoopResult:
    """PPO; ``runner`` overrides the reward runner built from ``ppo.reward_functions`` (tests)."""
    from transformers import AutoTokenizer

    from jrft.data import datasets_from_config, pad_token_id, train_iterator_from_config
    from jrft.train.offline import build_model, loop_and_export, optimizer_from_config
    from jrft.train.online import reward_runner_from_config
    from jrft.train.sharding import mesh_from_config, place_state
    from jrft.train.state import create_train_state, split_model

    c = config.ppo
    if config.train.batch_size % c.num_mini_batches:
        raise ValueError(
            f"ppo.num_mini_batches={c.num_mini_batches} must divide "
            f"train.batch_size={config.train.batch_size}"
        )
    mesh = mesh_from_config(config.mesh.data, config.mesh.fsdp, config.mesh.tensor)
    tokenizer = AutoTokenizer.from_pretrained(config.model.tokenizer_path)
    train_ds, _ = datasets_from_config(config, tokenizer)
    head = c.value_model == "head"
    updates = config.train.steps * c.num_epochs * c.num_mini_batches
    policy_tx, schedule = optimizer_from_config(config, total_steps=updates)
    policy_graphdef, policy_state = create_train_state(
        build_model(config, mesh, scalar_head=head), policy_tx, seed=config.seed
    )
    value_graphdef = value_state = value_tx = None
    if not head:
        # The value model starts from value_model_path, else the reward model (its head is a good start),
        # else the policy (fresh head).
        value_path = c.value_model_path or c.reward_model or config.model.path
        value_tx, _ = optimizer_from_config(config, total_steps=updates)
        value_graphdef, value_state = create_train_state(
            build_model(config, mesh, scalar_head=True, path=value_path), value_tx, seed=config.seed + 1
        )
    state, shardings = place_state(PPOState(policy_state, value_state), mesh)
    reward_model = None
    if c.reward_model is not None:
        rm_graphdef, rm_params, rm_rest = split_model(
            build_model(config, mesh, scalar_head=True, path=c.reward_model)
        )
        reward_model = (rm_graphdef, FrozenModel(rm_params, rm_rest))
    if runner is None and c.reward_functions:
        # One completion per prompt: the rollout is one "group" for normalize_then_sum (multi-host: this
        # process's rows, the ones its runner scores).
        runner = reward_runner_from_config(
            c, group_size=config.train.batch_size // jax.process_count(), max_new_tokens=c.max_new_tokens
        )
    prompts = train_iterator_from_config(
        config, train_ds, process_index=jax.process_index(), process_count=jax.process_count()
    )
    micro = config.train.micro_batch_size
    rows = config.train.batch_size // c.num_mini_batches
    grad_accum = 1 if micro is None else max(rows // micro, 1)
    round_fn = PPORound(
        c,
        policy_graphdef,
        value_graphdef,
        state,
        (policy_tx, value_tx),
        tokenizer,
        runner,
        reward_model,
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
        return state, {**metrics, "lr": schedule(max(int(state.policy.step) - 1, 0))}

    return loop_and_export(
        config,
        step_fn,
        state,
        prompts,
        policy_graphdef,
        tokenizer,
        bar_keys=("score/mean", "kl_mean", "clip_frac", "value_loss"),
        progress=progress,
        summary=train_ds.summary(),
        export_model=policy_export_model(policy_graphdef),
    )
