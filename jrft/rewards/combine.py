"""Combining several reward functions' values into one reward per completion.

Inputs are ``values [F, N]`` (F functions, N completions, NaN where a function gave ``None`` or failed),
``weights [F]`` and the GRPO group size G (each prompt's G completions contiguous, so groups are a reshape
``[N] -> [N / G, G]``). Modes are named functions in :data:`COMBINERS`:

- ``sum_then_normalize``: the weighted sum over the functions that applied (NaN ones are skipped, as in TRL);
  normalisation within the group is left to the advantage estimator (GRPO's ``(r - mean) / std``).
- ``normalize_then_sum``: GDPO (group reward-decoupled normalisation, Liu et al. 2026, arXiv:2601.05242):
  each function's values are first normalised within their group, ``(r - mean_g) / (std_g + eps)`` over the
  group's non-NaN values (population std), and only then weighted and summed, so a reward with a large scale
  or variance cannot drown the others. The advantage estimator may normalise the sum again.

In both, a completion where no function applied gets NaN.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable

import numpy as np


def weighted_nansum(values: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """``sum_f w_f * v_f`` over non-NaN entries; NaN where every entry is NaN. ``[F, N], [F] -> [N]``."""
    valid = ~np.isnan(values)
    total = np.where(valid, values * weights[:, None], 0.0).sum(axis=0)
    return np.where(valid.any(axis=0), total, np.nan)


def group_normalize(values: np.ndarray, group_size: int, eps: float = 1e-6) -> np.ndarray:
    """``(v - mean_g) / (std_g + eps)`` within contiguous groups, ignoring NaN. ``[..., N] -> [..., N]``."""
    shape = values.shape
    grouped = values.reshape(*shape[:-1], shape[-1] // group_size, group_size)  # [..., P, G]
    with warnings.catch_warnings(), np.errstate(invalid="ignore"):
        warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN groups: their result is NaN anyway
        mean = np.nanmean(grouped, axis=-1, keepdims=True)
        std = np.nanstd(grouped, axis=-1, keepdims=True)
    return ((grouped - mean) / (std + eps)).reshape(shape)


def _sum_then_normalize(values: np.ndarray, weights: np.ndarray, group_size: int, eps: float) -> np.ndarray:
    return weighted_nansum(values, weights)


def _normalize_then_sum(values: np.ndarray, weights: np.ndarray, group_size: int, eps: float) -> np.ndarray:
    return weighted_nansum(group_normalize(values, group_size, eps), weights)


# mode -> (values [F, N], weights [F], group_size, eps) -> rewards [N]
COMBINERS: dict[str, Callable[[np.ndarray, np.ndarray, int, float], np.ndarray]] = {
    "sum_then_normalize": _sum_then_normalize,
    "normalize_then_sum": _normalize_then_sum,
}
