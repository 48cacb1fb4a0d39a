"""Length shaping: DAPO's soft overlong penalty, a target-length reward, and an n-gram repetition penalty.

A completion's length is measured in a named unit (:data:`LENGTH_UNITS`): ``tokens`` (``len(completion_ids)``,
the unit DAPO uses; needs ``completion_ids``), ``words`` (whitespace-separated) or ``chars``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import Any

from jrft.rewards.protocol import completion_text

LENGTH_UNITS: dict[str, Callable[[Any, Any], list]] = {
    "tokens": lambda completion, ids: list(ids),
    "words": lambda completion, ids: completion_text(completion).split(),
    "chars": lambda completion, ids: list(completion_text(completion)),
}


def _units(
    reward: str, unit: str, completions: Sequence[Any], completion_ids: Sequence[Any] | None
) -> list[list]:
    """Each completion as a list of units (token ids, words or characters)."""
    if completion_ids is None:
        if unit == "tokens":
            raise ValueError(f"{reward}: unit 'tokens' needs completion_ids, but the caller passed None")
        completion_ids = [None] * len(completions)
    return [LENGTH_UNITS[unit](c, ids) for c, ids in zip(completions, completion_ids, strict=True)]


def _check_unit(reward: str, unit: str) -> None:
    if unit not in LENGTH_UNITS:
        raise ValueError(f"{reward}.unit must be one of {sorted(LENGTH_UNITS)}, got {unit!r}")


def soft_overlong_penalty(length: int, max_length: int, cache_length: int) -> float:
    """DAPO's soft overlong punishment (Yu et al. 2025, arXiv:2503.14476, eq. 13).

    ``0`` up to ``max_length - cache_length``; then linear from 0 down to ``-1`` at ``max_length``;
    ``-1`` beyond ``max_length``.
    """
    safe = max_length - cache_length
    if length <= safe:
        return 0.0
    if length <= max_length:
        return (safe - length) / cache_length
    return -1.0


@dataclasses.dataclass(frozen=True)
class SoftOverlongReward:
    """DAPO's soft overlong penalty per completion (see :func:`soft_overlong_penalty`), times ``scale``.

    Attributes:
      max_length: L_max, usually the sampler's max new tokens.
      cache_length: L_cache, the width of the linear penalty zone before L_max.
    """

    max_length: int = 1024
    cache_length: int = 256
    unit: str = "tokens"
    scale: float = 1.0
    name: str = "soft_overlong"

    def __post_init__(self) -> None:
        _check_unit(self.name, self.unit)
        if not 0 < self.cache_length <= self.max_length:
            raise ValueError(
                f"soft_overlong: need 0 < cache_length <= max_length, got "
                f"{self.cache_length}, {self.max_length}"
            )

    def __call__(
        self, *, completions: Sequence[Any], completion_ids: Any = None, **_: Any
    ) -> list[float | None]:
        pieces = _units(self.name, self.unit, completions, completion_ids)
        return [
            self.scale * soft_overlong_penalty(len(p), self.max_length, self.cache_length) for p in pieces
        ]


@dataclasses.dataclass(frozen=True)
class LengthReward:
    """Closeness to a target length: ``-scale * min(1, max(0, |len - target| - tolerance) / target)``.

    0 within ``tolerance`` of ``target``, falling linearly to ``-scale`` at a distance of ``target`` or more.
    """

    target: int = 256
    tolerance: int = 0
    unit: str = "tokens"
    scale: float = 1.0
    name: str = "length"

    def __post_init__(self) -> None:
        _check_unit(self.name, self.unit)
        if self.target <= 0 or self.tolerance < 0:
            raise ValueError(
                f"length: need target > 0 and tolerance >= 0, got {self.target}, {self.tolerance}"
            )

    def __call__(
        self, *, completions: Sequence[Any], completion_ids: Any = None, **_: Any
    ) -> list[float | None]:
        pieces = _units(self.name, self.unit, completions, completion_ids)
        return [
            -self.scale * min(1.0, max(0.0, abs(len(p) - self.target) - self.tolerance) / self.target)
            for p in pieces
        ]


def repetition_fraction(units: Sequence[Any], n: int) -> float:
    """Fraction of repeated n-grams: ``1 - distinct / total`` (0 when there are fewer than ``n`` units)."""
    grams = [tuple(units[i : i + n]) for i in range(len(units) - n + 1)]
    return 1.0 - len(set(grams)) / len(grams) if grams else 0.0


@dataclasses.dataclass(frozen=True)
class RepetitionPenaltyReward:
    """N-gram repetition penalty, ``-scale * repetition_fraction`` (Yeo et al. 2025, arXiv:2502.03373).

    0 for a completion without repeated n-grams, approaching ``-scale`` for one that loops.
    """

    ngram: int = 3
    unit: str = "words"
    scale: float = 1.0
    name: str = "repetition"

    def __post_init__(self) -> None:
        _check_unit(self.name, self.unit)
        if self.ngram < 1:
            raise ValueError(f"repetition.ngram must be >= 1, got {self.ngram}")

    def __call__(
        self, *, completions: Sequence[Any], completion_ids: Any = None, **_: Any
    ) -> list[float | None]:
        pieces = _units(self.name, self.unit, completions, completion_ids)
        return [-self.scale * repetition_fraction(p, self.ngram) for p in pieces]
