"""Answer correctness: does the completion's final answer equal the reference in a dataset column?

The answer is extracted (``<answer>…</answer>``, ``\\boxed{}``, or the last number; see
:mod:`jrft.rewards.extract`) and compared numerically within a tolerance when both sides are numbers,
otherwise as normalised text, and finally through ``math_verify`` (symbolic equivalence, e.g.
``\\frac{1}{2}`` vs ``0.5`` vs ``1/2`` or ``x+1`` vs ``1+x``) when that package is installed.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Sequence
from typing import Any

from jrft.rewards.extract import (
    EXTRACTORS,
    extract_answer,
    last_number,
    normalize_text_answer,
    parse_number,
    reference_answer,
)
from jrft.rewards.protocol import column, completion_text, freeze_names


@functools.lru_cache(maxsize=1)
def _math_verify() -> Any | None:
    try:
        import math_verify  # optional dependency
    except ImportError:
        return None
    return math_verify


def numbers_close(a: float, b: float, tolerance: float) -> bool:
    """``|a - b| <= tolerance * max(1, |b|)``: absolute near zero, relative for large references."""
    return abs(a - b) <= tolerance * max(1.0, abs(b))


def symbolic_equal(pred: str, gold: str) -> bool | None:
    """math_verify's verdict, or ``None`` when it is not installed or cannot parse either side."""
    mv = _math_verify()
    if mv is None:
        return None
    try:
        # Timeouts off: math_verify's default timeout uses signal.alarm, which fails outside the main thread;
        # the runner's timeout bounds the call instead. Checked with math-verify 0.9.
        gold_parsed = mv.parse(gold, parsing_timeout=None)
        pred_parsed = mv.parse(pred, parsing_timeout=None)
        if not gold_parsed or not pred_parsed:
            return None
        return bool(mv.verify(gold_parsed, pred_parsed, timeout_seconds=None))
    except Exception:
        return None


def answers_match(pred: str, gold: str, *, tolerance: float = 1e-6, symbolic: bool = True) -> bool:
    """Whether an extracted answer equals a reference answer (both strings)."""
    gold_num = parse_number(gold)
    pred_num = parse_number(pred)
    if gold_num is not None and pred_num is None:
        pred_num = parse_number(last_number(pred))  # "<answer>It is 42 apples</answer>"
    if gold_num is not None and pred_num is not None:
        if numbers_close(pred_num, gold_num, tolerance):
            return True
    elif normalize_text_answer(pred) == normalize_text_answer(gold):
        return True
    return bool(symbolic and symbolic_equal(pred, gold))


@dataclasses.dataclass(frozen=True)
class AccuracyReward:
    """``correct`` when the extracted answer matches the reference column, else ``incorrect``.

    ``None`` for rows whose reference is missing (``None``), so they do not count as wrong.

    Attributes:
      answer_column: dataset column holding the reference answer (GSM8K's ``"… #### 42"`` is understood),
        or a list of accepted answers.
      extract: extractors tried in order (names in :data:`jrft.rewards.extract.EXTRACTORS`).
      tolerance: numeric tolerance, relative above 1 and absolute below (see :func:`numbers_close`).
      symbolic: also try math_verify's symbolic equivalence when it is installed.
      correct, incorrect: the two reward values; a completion with no extractable answer is incorrect.
    """

    answer_column: str = "answer"
    extract: Sequence[str] = ("answer_tag", "boxed", "last_number")
    tolerance: float = 1e-6
    symbolic: bool = True
    correct: float = 1.0
    incorrect: float = 0.0
    name: str = "accuracy"

    def __post_init__(self) -> None:
        freeze_names(self, "extract", EXTRACTORS, "extractor(s)")
        if self.tolerance < 0:
            raise ValueError(f"accuracy.tolerance must be >= 0, got {self.tolerance}")

    def __call__(self, *, completions: Sequence[Any], **columns: Any) -> list[float | None]:
        golds = column(columns, self.answer_column, self.name)
        out: list[float | None] = []
        for completion, gold in zip(completions, golds, strict=True):
            if gold is None:
                out.append(None)
                continue
            pred = extract_answer(completion_text(completion), self.extract)
            references = gold if isinstance(gold, list | tuple) else [gold]  # several accepted answers
            ok = pred is not None and any(
                answers_match(pred, reference_answer(g), tolerance=self.tolerance, symbolic=self.symbolic)
                for g in references
            )
            out.append(self.correct if ok else self.incorrect)
        return out
