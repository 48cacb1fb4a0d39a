"""Think/answer format: ``<think>reasoning</think><answer>final answer</answer>`` (DeepSeek-R1's template).

Modes are small named regex builders in :data:`FORMAT_MODES`:

- ``strict``: the whole completion is exactly one think block then one answer block (whitespace between
  and around allowed), both non-empty, with no stray or nested think/answer tags.
- ``lenient``: somewhere there is a non-empty think block followed later by a non-empty answer block;
  text before, between and after is allowed.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable, Sequence
from typing import Any

from jrft.rewards.protocol import completion_text


def _strict(think: str, answer: str) -> re.Pattern[str]:
    no_tag = rf"(?:(?!</?{think}>|</?{answer}>).)"  # any character that does not start a tag
    return re.compile(
        rf"\s*<{think}>{no_tag}*\S{no_tag}*</{think}>\s*<{answer}>{no_tag}*\S{no_tag}*</{answer}>\s*",
        re.DOTALL,
    )


def _lenient(think: str, answer: str) -> re.Pattern[str]:
    return re.compile(rf"<{think}>.*?\S.*?</{think}>.*?<{answer}>.*?\S.*?</{answer}>", re.DOTALL)


FORMAT_MODES: dict[str, Callable[[str, str], re.Pattern[str]]] = {"strict": _strict, "lenient": _lenient}


@dataclasses.dataclass(frozen=True)
class ThinkAnswerFormatReward:
    """``matched`` when a completion follows the think/answer format, else ``unmatched``.

    Attributes:
      mode: ``"strict"`` (fullmatch) or ``"lenient"`` (search); see the module docstring.
      think_tag, answer_tag: tag names without brackets.
      think_in_prompt: the chat template already opened ``<think>`` in the prompt (as Qwen3/R1 templates
        do), so the completion starts inside it; ``<think>`` is prepended before matching.
    """

    mode: str = "strict"
    think_tag: str = "think"
    answer_tag: str = "answer"
    think_in_prompt: bool = False
    matched: float = 1.0
    unmatched: float = 0.0
    name: str = "format"

    def __post_init__(self) -> None:
        if self.mode not in FORMAT_MODES:
            raise ValueError(f"format.mode must be one of {sorted(FORMAT_MODES)}, got {self.mode!r}")
        for field in ("think_tag", "answer_tag"):
            if not re.fullmatch(r"[\w:-]+", getattr(self, field)):
                raise ValueError(
                    f"format.{field} must be a bare tag name like 'think', got {getattr(self, field)!r}"
                )

    def __call__(self, *, completions: Sequence[Any], **_: Any) -> list[float | None]:
        pattern = FORMAT_MODES[self.mode](re.escape(self.think_tag), re.escape(self.answer_tag))
        match = pattern.fullmatch if self.mode == "strict" else pattern.search
        prefix = f"<{self.think_tag}>" if self.think_in_prompt else ""
        return [self.matched if match(prefix + completion_text(c)) else self.unmatched for c in completions]
