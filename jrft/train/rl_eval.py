"""Held-out evaluation of an RL policy (GRPO, PPO): sample the eval prompts greedily and at the training
temperature, score them with the reward functions, report mean rewards and pass@k.

Metrics (the loop prefixes ``eval/``): ``greedy/rewards/mean`` and ``greedy/rewards/{fn}/mean`` (one greedy
completion per prompt), ``sampled/...`` the same over the G sampled completions per prompt, and for
``k`` in ``1, 2, 4, ... <= G`` (and G) ``sampled/pass@k`` and ``sampled/{fn}/pass@k``: the unbiased estimate
(Chen et al. 2021, arXiv 2107.03374) that at least one of k completions of a prompt passes, a completion
passing when its reward (combined: the weighted sum of the functions that applied) is >= ``pass_threshold``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import jax
import numpy as np

from jrft.train.rollout import SamplingSettings, sample_rollout


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k from ``n`` samples of which ``c`` pass: ``1 - C(n - c, k) / C(n, k)``."""
    if n - c < k:
        return 1.0
    return 1.0 - math.comb(n - c, k) / math.comb(n, k)


def pass_ks(group_size: int) -> list[int]:
    """``1, 2, 4, ...`` up to ``group_size``, and ``group_size`` itself."""
    ks = [1 << i for i in range(group_size.bit_length()) if (1 << i) <= group_size]
    return sorted(set(ks) | {group_size})


def _fill_padding(batch: Mapping[str, Any]) -> tuple[dict, np.ndarray | None]:
    """Evaluation batches end with filler rows (``valid`` 0): give them the first real row's prompt (so the
    batch keeps its shape and sharding, and nothing samples from an empty prompt); returns the mask."""
    valid = batch.get("valid")
    if valid is None or bool(np.all(valid)):
        return dict(batch), None
    valid = np.asarray(valid) > 0
    first = int(np.argmax(valid))
    out = dict(batch)
    for key in ("prompt_tokens", "prompt_attention_mask", "prompt_positions"):
        if key in out:
            arr = np.array(out[key])
            arr[~valid] = arr[first]
            out[key] = arr
    out["prompts"] = [
        p if ok else batch["prompts"][first] for p, ok in zip(batch["prompts"], valid, strict=True)
    ]
    out["columns"] = {
        k: [x if ok else v[first] for x, ok in zip(v, valid, strict=True)]
        for k, v in batch["columns"].items()
    }
    return out, valid


def _combined(per_function: Mapping[str, np.ndarray], weights: Mapping[str, float]) -> np.ndarray:
    """Weighted sum of the functions that applied (NaN where none did)."""
    stacked = np.stack([per_function[n] for n in per_function])  # [F, N]
    w = np.asarray([weights[n] for n in per_function])[:, None]
    total = np.nansum(stacked * w, axis=0)
    return np.where(np.all(np.isnan(stacked), axis=0), np.nan, total)


def evaluate_policy(
    policy,
    batches: Iterable[Mapping[str, Any]],
    tokenizer,
    runner: Callable[..., Any],
    *,
    sampling: SamplingSettings,
    rng: jax.Array,
    mesh=None,
    pass_threshold: float = 1.0,
) -> dict[str, float]:
    """Mean rewards (greedy and sampled) and pass@k of ``policy`` over the prompt ``batches`` (see the
    module docstring). ``runner`` is a ``jrft.rewards.RewardRunner`` built with ``group_size=1`` (each
    completion scored on its own); ``sampling`` the training rollouts' settings (G, temperature, ...)."""
    g = sampling.num_generations
    greedy = SamplingSettings(1, sampling.max_new_tokens, 0.0, None, None, sampling.pad_token_id)
    weights = dict(zip(runner.names, np.asarray(runner.weights, np.float64).tolist(), strict=True))
    values: dict[str, dict[str, list[np.ndarray]]] = {"greedy": {}, "sampled": {}}
    for i, batch in enumerate(batches):
        batch, valid = _fill_padding(batch)
        for tag, settings in (("greedy", greedy), ("sampled", sampling)):
            key = jax.random.fold_in(jax.random.fold_in(rng, i), tag == "sampled")
            rollout = sample_rollout(policy, batch, tokenizer, settings, rng=key, mesh=mesh)
            if valid is not None:
                rollout = rollout.select_groups(valid, settings.num_generations)
            result = runner(
                prompts=rollout.prompts,
                completions=rollout.completions,
                completion_ids=rollout.completion_ids,
                **rollout.columns,
            )
            per_function = {n: np.asarray(v, np.float64) for n, v in result.per_function.items()}
            per_function["combined"] = _combined(per_function, weights)
            for name, v in per_function.items():
                values[tag].setdefault(name, []).append(v)
    metrics: dict[str, float] = {}
    for tag, by_name in values.items():
        for name, parts in by_name.items():
            v = np.concatenate(parts) if parts else np.zeros(0)
            prefix = f"{tag}/rewards" if name == "combined" else f"{tag}/rewards/{name}"
            metrics[f"{prefix}/mean"] = float(np.nanmean(v)) if np.any(~np.isnan(v)) else math.nan
            if tag == "sampled":
                passed = (np.nan_to_num(v, nan=-np.inf) >= pass_threshold).reshape(-1, g)  # [P, G]
                where = "sampled" if name == "combined" else f"sampled/{name}"
                for k in pass_ks(g):
                    scores = [pass_at_k(g, int(c), k) for c in passed.sum(axis=1)]
                    metrics[f"{where}/pass@{k}"] = float(np.mean(scores)) if scores else math.nan
    return metrics
