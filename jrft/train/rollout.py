"""Rollouts for the online objectives: prompts -> sampled completions -> host rewards -> one batch.

A rollout keeps each prompt's G completions contiguous (row ``p * G + g``) and lays every row out as
``[prompt (left-padded, Tp) | completion (right-padded, Tc)]`` so one forward pass scores all completion
tokens: the log-prob of completion token ``j`` comes from logits position ``Tp - 1 + j``.

Multi-host (``jax.process_count() > 1``): a ``Rollout`` holds THIS process's rows only, which are a contiguous
slice of the global rollout (process ``p`` owns prompts ``[p * B/P, (p+1) * B/P)`` of the global prompt batch
and their G completions: whole groups). Sampling is one global program: the prompt rows of all processes are
gathered, every process calls the sampler with the same global prompts under the same global mesh, and each
takes back its own rows. Random numbers are drawn for the global ``[rows, vocab]`` array from one key (JAX's
partitionable threefry: the bits of row ``r`` depend on the key and ``r`` only), so a row samples the same
tokens whatever the number of processes. Rewards are computed by each process for its own rows;
:func:`gather_rows` collects them where batch-level statistics need all of them.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import numpy as np

from jrft.parallel.distributed import gather_rows, host_array, local_rows
from jrft.rewards.runner import reward_stats
from jrft.sampling import FINISH_LENGTH, bucket_length, generate


@dataclasses.dataclass
class Rollout:
    """Host arrays of one rollout of ``N = P * G`` rows.

    Attributes:
      tokens: ``[N, Tp + Tc]`` prompt then completion tokens.
      attention_mask: ``[N, Tp + Tc]`` 0/1.
      completion_mask: ``[N, Tc]`` 0/1, 1 on generated tokens (the stop token included).
      sampler_logps: ``[N, Tc]`` float32 log-probs of the sampled tokens under the sampling distribution.
      truncated: ``[N]`` bool, the completion hit ``max_new_tokens`` without a stop token.
      prompt_length: ``Tp``.
      prompts: ``[N]`` prompt strings (each repeated G times); columns: name -> ``[N]`` list.
      completions: ``[N]`` decoded completion strings; completion_ids: ``[N]`` lists of ints.
      rewards: ``[N]`` float64 combined rewards (NaN where no reward function applied), after scoring.
      reward_metrics: the runner's metrics (per-function means, failures, seconds...).
      reward_extra: column -> ``[N]`` values the reward functions gave ``log_extra`` (completions table).
      turns: multi-turn rollouts only (``jrft.agentic``): ``[N]`` per-turn logs (model text, tool calls,
        environment messages, step rewards), written to the completions table.
      env_rewards: multi-turn rollouts only: ``[N]`` float64 environment rewards summed per trajectory (NaN:
        none); agent_metrics: the rollout's turn and tool-call counts.
    """

    tokens: np.ndarray
    attention_mask: np.ndarray
    completion_mask: np.ndarray
    sampler_logps: np.ndarray
    truncated: np.ndarray
    prompt_length: int
    prompts: list[Any]
    columns: dict[str, list[Any]]
    completions: list[str]
    completion_ids: list[list[int]]
    rewards: np.ndarray | None = None
    per_function: dict[str, np.ndarray] = dataclasses.field(default_factory=dict)
    reward_metrics: dict[str, float] = dataclasses.field(default_factory=dict)
    reward_extra: dict[str, list] = dataclasses.field(default_factory=dict)
    seconds: dict[str, float] = dataclasses.field(default_factory=dict)
    turns: list[list[dict]] | None = None
    env_rewards: np.ndarray | None = None
    agent_metrics: dict[str, float] = dataclasses.field(default_factory=dict)

    @property
    def num_rows(self) -> int:
        return int(self.tokens.shape[0])

    def row_completion_mask(self) -> np.ndarray:
        """``completion_mask`` over whole rows: ``[N, Tp + Tc]``, 0 on the prompt slots (what a reward model
        that scores the completion's likelihood needs beside ``tokens``)."""
        prompt = np.zeros((self.num_rows, self.prompt_length), self.completion_mask.dtype)
        return np.concatenate([prompt, self.completion_mask], axis=1)

    def select_groups(self, keep: np.ndarray, group_size: int) -> Rollout:
        """The rollout restricted to the groups where ``keep [P]`` is true (rows stay contiguous)."""
        rows = np.repeat(np.asarray(keep, bool), group_size)
        idx = np.flatnonzero(rows)

        def take(x):
            if isinstance(x, np.ndarray):
                return x[idx]
            return [x[i] for i in idx]

        return dataclasses.replace(
            self,
            tokens=self.tokens[idx],
            attention_mask=self.attention_mask[idx],
            completion_mask=self.completion_mask[idx],
            sampler_logps=self.sampler_logps[idx],
            truncated=self.truncated[idx],
            prompts=take(self.prompts),
            columns={k: take(v) for k, v in self.columns.items()},
            completions=take(self.completions),
            completion_ids=take(self.completion_ids),
            rewards=None if self.rewards is None else self.rewards[idx],
            per_function={k: v[idx] for k, v in self.per_function.items()},
            reward_extra={k: take(v) for k, v in self.reward_extra.items()},
            turns=None if self.turns is None else take(self.turns),
            env_rewards=None if self.env_rewards is None else self.env_rewards[idx],
        )


def widen_rollout(r: Rollout, prompt_length: int, completion_length: int) -> Rollout:
    """The rollout with its prompt part left-padded to ``prompt_length`` and its completion part
    right-padded to ``completion_length`` (padding is masked out: the same rows for the loss)."""
    lp, lc = prompt_length - r.prompt_length, completion_length - r.completion_mask.shape[1]
    if lp == 0 and lc == 0:
        return r
    return dataclasses.replace(
        r,
        tokens=np.pad(r.tokens, ((0, 0), (lp, lc))),
        attention_mask=np.pad(r.attention_mask, ((0, 0), (lp, lc))),
        completion_mask=np.pad(r.completion_mask, ((0, 0), (0, lc))),
        sampler_logps=np.pad(r.sampler_logps, ((0, 0), (0, lc))),
        prompt_length=prompt_length,
    )


def concat_rollouts(parts: Sequence[Rollout]) -> Rollout:
    """Rows of several rollouts in order (prompt and completion widths padded to the largest)."""
    if len(parts) == 1:
        return parts[0]
    tp = max(r.prompt_length for r in parts)
    tc = max(r.completion_mask.shape[1] for r in parts)
    widened = [widen_rollout(r, tp, tc) for r in parts]
    cat = lambda name: np.concatenate([getattr(w, name) for w in widened])  # noqa: E731
    names = list(parts[0].per_function)
    return Rollout(
        tokens=cat("tokens"),
        attention_mask=cat("attention_mask"),
        completion_mask=cat("completion_mask"),
        sampler_logps=cat("sampler_logps"),
        truncated=np.concatenate([r.truncated for r in parts]),
        prompt_length=tp,
        prompts=[p for r in parts for p in r.prompts],
        columns={k: [v for r in parts for v in r.columns[k]] for k in parts[0].columns},
        completions=[c for r in parts for c in r.completions],
        completion_ids=[c for r in parts for c in r.completion_ids],
        rewards=None if parts[0].rewards is None else np.concatenate([r.rewards for r in parts]),
        per_function={k: np.concatenate([r.per_function[k] for r in parts]) for k in names},
        reward_metrics=parts[-1].reward_metrics,
        # log_extra columns that every part has (a function may log only for some batches)
        reward_extra={
            k: [v for r in parts for v in r.reward_extra[k]]
            for k in parts[0].reward_extra
            if all(k in r.reward_extra for r in parts)
        },
        turns=None if parts[0].turns is None else [t for r in parts for t in r.turns],
        env_rewards=None if parts[0].env_rewards is None else np.concatenate([r.env_rewards for r in parts]),
        agent_metrics=parts[-1].agent_metrics,
    )


@dataclasses.dataclass(frozen=True)
class SamplingSettings:
    """How a rollout samples: ``num_generations`` completions per prompt of at most ``max_new_tokens``,
    at ``temperature`` with optional ``top_k`` / ``top_p``; ``pad_token_id`` fills the rows;
    ``gather_weights``: the sampler gathers sharded weights once per call (``jrft.sampling.generate``)."""

    num_generations: int
    max_new_tokens: int
    temperature: float
    top_k: int | None
    top_p: float | None
    pad_token_id: int
    gather_weights: bool = False


def sample_rollout(
    model, prompt_batch: Mapping[str, Any], tokenizer, settings: SamplingSettings, *, rng, mesh=None
) -> Rollout:
    """Samples G completions per prompt and lays out the rows (see the module docstring).

    ``prompt_batch`` is a host prompt batch from ``jrft.data`` (``prompt_tokens``, ``prompt_attention_mask``,
    ``prompts``, ``columns``). The completion width is trimmed to a bucket of the longest completion, so
    short completions make short training rows.
    """
    t0 = time.perf_counter()
    g, max_new_tokens, pad_token_id = settings.num_generations, settings.max_new_tokens, settings.pad_token_id
    # Multi-host: every process samples the same global prompt batch in one global program (module doc).
    out = generate(
        model,
        gather_rows(np.asarray(prompt_batch["prompt_tokens"])),
        gather_rows(np.asarray(prompt_batch["prompt_attention_mask"])),
        max_new_tokens=max_new_tokens,
        num_samples=g,
        temperature=settings.temperature,
        top_k=settings.top_k,
        top_p=settings.top_p,
        stop_token_ids=[tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else (),
        rng=rng,
        mesh=mesh,
        gather_weights=settings.gather_weights,
        pad_token_id=pad_token_id,
    )
    tokens, mask, logps, lengths, reason = (
        host_array(x) for x in (out.tokens, out.mask, out.logprobs, out.lengths, out.finish_reason)
    )
    # the width from the global longest completion: the same on every process (one global batch shape)
    width = min(bucket_length(max(int(lengths.max()), 1), 32), max_new_tokens)
    tokens, mask, logps = tokens[:, :width], mask[:, :width], logps[:, :width]
    prompt_tokens = np.asarray(out.prompt_tokens)
    prompt_mask = np.asarray(out.prompt_mask)
    if jax.process_count() > 1:  # this process's rows (whole groups) of the global rollout
        tokens, mask, logps, lengths, reason, prompt_tokens, prompt_mask = (
            local_rows(x) for x in (tokens, mask, logps, lengths, reason, prompt_tokens, prompt_mask)
        )
    ids = [row[: int(n)].tolist() for row, n in zip(tokens, lengths, strict=True)]
    texts = tokenizer.batch_decode(ids, skip_special_tokens=True)
    seconds = {"sample": time.perf_counter() - t0}
    return Rollout(
        tokens=np.concatenate([prompt_tokens, np.where(mask > 0, tokens, pad_token_id)], axis=1).astype(
            np.int32
        ),
        attention_mask=np.concatenate([prompt_mask, mask], axis=1).astype(np.int32),
        completion_mask=mask.astype(np.int32),
        sampler_logps=logps.astype(np.float32),
        truncated=reason == FINISH_LENGTH,
        prompt_length=int(prompt_tokens.shape[1]),
        prompts=[p for p in prompt_batch["prompts"] for _ in range(g)],
        columns={k: [v for v in vals for _ in range(g)] for k, vals in prompt_batch["columns"].items()},
        completions=texts,
        completion_ids=ids,
        seconds=seconds,
    )


def score_rollout(rollout: Rollout, runner) -> Rollout:
    """Runs the reward functions on the host (``jrft.rewards.RewardRunner``) and stores the rewards."""
    t0 = time.perf_counter()
    result = runner(
        prompts=rollout.prompts,
        completions=rollout.completions,
        completion_ids=rollout.completion_ids,
        **rollout.columns,
    )
    rollout.rewards = np.asarray(result.rewards, np.float64)
    rollout.per_function = dict(result.per_function)
    rollout.reward_metrics = dict(result.metrics)
    rollout.reward_extra = dict(getattr(result, "extra", {}))
    rollout.seconds["rewards"] = time.perf_counter() - t0
    return rollout


def global_reward_metrics(rollout: Rollout, group_size: int) -> dict[str, float]:
    """The reward runner's metrics over the rows of ALL processes (each process scored only its own rows):
    means, stds and NaN fractions recomputed from the gathered values, failures summed, seconds of the
    slowest process. A single-process run returns the runner's metrics unchanged. Collective: every process
    must call it."""
    local = rollout.reward_metrics
    if jax.process_count() == 1:
        return local
    out = {}
    for name in sorted(rollout.per_function):  # sorted: the same collective order on every process
        out.update(reward_stats(f"rewards/{name}", gather_rows(rollout.per_function[name])))
        counts = gather_rows(np.asarray([[local.get(f"rewards/{name}/failures", 0.0)]]))
        seconds = gather_rows(np.asarray([[local.get(f"rewards/{name}/seconds", 0.0)]]))
        out[f"rewards/{name}/failures"] = float(counts.sum())
        out[f"rewards/{name}/seconds"] = float(np.max(seconds))
    rewards = gather_rows(rollout.rewards)
    out.update(reward_stats("rewards", rewards, none_key="frac_nan"))
    if "rewards/frac_zero_std_groups" in local and rewards.size:
        out["rewards/frac_zero_std_groups"] = float(np.mean(~group_has_signal(rewards, group_size)))
    out.update(rollout.agent_metrics)  # multi-turn: already over all processes' trajectories
    return out


def group_has_signal(rewards: np.ndarray, group_size: int) -> np.ndarray:
    """``[P]`` bool: the group's rewards are not all equal (DAPO dynamic sampling keeps only these)."""
    grouped = np.asarray(rewards, np.float64).reshape(-1, group_size)  # [P, G]
    valid = ~np.isnan(grouped)
    high = np.where(valid, grouped, -np.inf).max(axis=1)
    low = np.where(valid, grouped, np.inf).min(axis=1)
    return high > low  # NaN rewards (no function applied) are ignored; an all-NaN group has no signal


def _json_value(x: Any) -> Any:
    """A ``log_extra`` value as JSON: numbers, strings, bools, None and lists of them as they are, NaN as
    null, anything else as its ``str``."""
    if isinstance(x, float | np.floating):
        return None if np.isnan(x) else float(x)
    if isinstance(x, np.generic):
        return x.item()
    if x is None or isinstance(x, str | bool | int):
        return x
    if isinstance(x, list | tuple):
        return [_json_value(v) for v in x]
    return str(x)


def append_completions(
    path: str,
    rollout: Rollout,
    *,
    round_index: int,
    max_rows: int,
    extra: Mapping[str, np.ndarray] | None = None,
) -> None:
    """Appends the first ``max_rows`` rows of a scored rollout to the JSONL table of sample completions:
    prompt, completion, combined reward, each reward function's value, and ``extra`` per-row columns
    (e.g. PPO's reward-model score); a multi-turn rollout adds ``turns``, the trajectory turn by turn (model
    text, tool calls, tool results / environment messages, step rewards). NaN (no reward applied) is written
    as null."""
    import json
    import os

    def value(x):
        return None if np.isnan(x) else float(x)

    columns = {"reward": rollout.rewards} if rollout.rewards is not None else {}
    columns.update({f"reward/{k}": v for k, v in rollout.per_function.items()})
    columns.update(extra or {})
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    with open(path, "a", encoding="utf-8") as f:
        for i in range(min(rollout.num_rows, max_rows)):
            row = {"round": round_index, "prompt": rollout.prompts[i], "completion": rollout.completions[i]}
            row.update({k: value(np.asarray(v, np.float64)[i]) for k, v in columns.items()})
            row.update({k: _json_value(v[i]) for k, v in rollout.reward_extra.items()})
            if rollout.turns is not None:
                row["turns"] = rollout.turns[i]
            f.write(json.dumps(row) + "\n")
