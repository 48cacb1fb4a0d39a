"""Harmful content: a penalty when a completion matches a lexicon / regex list or a classifier flags it.

This is a configurable filter, not a safety system: the default list is a handful of example patterns to show
the mechanism. Supply your own ``words`` / ``patterns`` and, for anything serious, a ``classifier``.

Text is NFKC-normalised and case-folded before matching, so full-width letters (``ｂｏｍｂ``) and case
tricks do not slip past; words match on word boundaries (``"kill"`` does not match ``"skill"``).
"""

from __future__ import annotations

import dataclasses
import functools
import re
from collections.abc import Callable, Sequence
from typing import Any

from jrft.rewards.loading import load_object
from jrft.rewards.protocol import completion_text, normalize_unicode

# Example patterns only (instructions for weapons, encouragement of self-harm); extend for your use.
DEFAULT_PATTERNS: tuple[str, ...] = (
    r"\bhow to (?:make|build) (?:a |an )?(?:bomb|explosive|pipe bomb)\b",
    r"\b(?:you should|go) kill yourself\b",
    r"\bstep[- ]by[- ]step (?:guide|instructions) (?:to|for) (?:making|synthesi[sz]ing) "
    r"(?:meth|nerve agent)\b",
)

Classifier = Callable[[list[str]], Sequence[float]]


@functools.lru_cache(maxsize=16)
def _compiled(words: tuple[str, ...], patterns: tuple[str, ...]) -> re.Pattern[str] | None:
    parts = [rf"\b{re.escape(normalize_unicode(w).casefold())}\b" for w in words] + list(patterns)
    return re.compile("|".join(f"(?:{p})" for p in parts), re.IGNORECASE) if parts else None


@dataclasses.dataclass(frozen=True)
class HarmfulContentReward:
    """``penalty`` for a harmful completion, ``clean`` otherwise.

    Attributes:
      words: literal words/phrases, matched on word boundaries after normalisation.
      patterns: Python regexes (case-insensitive), searched in the normalised text.
      use_default_patterns: also use :data:`DEFAULT_PATTERNS`.
      classifier: optional callable ``texts [N] -> scores [N]`` (probability of harm), or a
        ``"module:function"`` / ``"file.py:function"`` spec for one; a score ``>= threshold`` is harmful.
        Called once per batch with every completion's text.
    """

    words: Sequence[str] = ()
    patterns: Sequence[str] = ()
    use_default_patterns: bool = True
    classifier: Classifier | str | None = None
    threshold: float = 0.5
    penalty: float = -1.0
    clean: float = 0.0
    name: str = "harmful"

    def __post_init__(self) -> None:
        object.__setattr__(self, "words", tuple(self.words))
        patterns = tuple(self.patterns) + (DEFAULT_PATTERNS if self.use_default_patterns else ())
        for p in patterns:
            try:
                re.compile(p)
            except re.error as err:
                raise ValueError(f"harmful.patterns: invalid regex {p!r}: {err}") from err
        object.__setattr__(self, "patterns", tuple(self.patterns))
        if not self.words and not patterns and self.classifier is None:
            raise ValueError("harmful: nothing to check; give words, patterns or a classifier")

    def _classifier(self) -> Classifier | None:
        if isinstance(self.classifier, str):
            return load_object(self.classifier)[0]
        return self.classifier

    def __call__(self, *, completions: Sequence[Any], **_: Any) -> list[float | None]:
        texts = [normalize_unicode(completion_text(c)).casefold() for c in completions]
        all_patterns = self.patterns + (DEFAULT_PATTERNS if self.use_default_patterns else ())
        regex = _compiled(self.words, all_patterns)
        flagged = [bool(regex and regex.search(t)) for t in texts]
        classifier = self._classifier()
        if classifier is not None:
            scores = list(classifier([completion_text(c) for c in completions]))
            if len(scores) != len(texts):
                raise ValueError(f"harmful.classifier returned {len(scores)} scores for {len(texts)} texts")
            flagged = [f or float(s) >= self.threshold for f, s in zip(flagged, scores, strict=True)]
        return [self.penalty if f else self.clean for f in flagged]
