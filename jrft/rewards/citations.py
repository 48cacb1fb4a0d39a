"""Citations present: does a completion cite its sources, and (optionally) do the cited sources exist?

Citation styles are small named finders in :data:`CITATION_STYLES` (text -> list of cited ids):

- ``brackets``: numeric brackets ``[1]``, ``[1, 3]``, ``[2-4]`` (a range cites each id), footnotes ``[^1]``.
  A bracket followed by ``(`` is a markdown link, not a citation.
- ``urls``: ``http(s)://…`` URLs (trailing punctuation removed).
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from jrft.rewards.protocol import column, completion_text, freeze_names, normalize_unicode

_BRACKET_RE = re.compile(r"\[\^?(\d+(?:\s*[-–,]\s*\^?\d+)*)\](?!\()")
_URL_RE = re.compile(r"https?://[^\s<>\"'\])]+")
_MAX_RANGE = 1000  # "[1-99999]" is not a citation of 99999 sources


def _bracket_ids(text: str) -> list[str]:
    ids: list[str] = []
    for group in _BRACKET_RE.findall(text):
        for part in re.split(r"\s*,\s*", group):
            bounds = [int(b) for b in re.split(r"\s*[-–]\s*", part.replace("^", ""))]
            if len(bounds) == 2 and 0 <= bounds[1] - bounds[0] <= _MAX_RANGE:
                ids.extend(str(i) for i in range(bounds[0], bounds[1] + 1))
            else:
                ids.extend(str(b) for b in bounds)
    return ids


def _urls(text: str) -> list[str]:
    return [u.rstrip(".,;:!?") for u in _URL_RE.findall(text)]


CITATION_STYLES: dict[str, Callable[[str], list[str]]] = {"brackets": _bracket_ids, "urls": _urls}


def find_citations(text: str, styles: Sequence[str] = ("brackets", "urls")) -> list[str]:
    """Every citation in ``text`` (ids as strings, URLs as written), in order, with repeats."""
    text = normalize_unicode(text)
    return [cid for style in styles for cid in CITATION_STYLES[style](text)]


def _known_ids(sources: Any) -> set[str]:
    """A row's valid ids: a list of ids, of URLs, or of source dicts with an ``id`` / ``url`` key."""
    if sources is None:
        return set()
    if isinstance(sources, str | int):
        sources = [sources]
    known = set()
    for s in sources:
        if isinstance(s, Mapping):
            known.update(str(s[k]).strip() for k in ("id", "url") if k in s)
        else:
            known.add(str(s).strip())
    return known


@dataclasses.dataclass(frozen=True)
class CitationReward:
    """Reward for citing sources.

    Score: ``missing`` when fewer than ``min_count`` distinct citations are found. Otherwise ``present``
    (when ``ids_column`` is not set), or ``present`` times the fraction of distinct cited ids that exist in
    the row's ``ids_column`` (a list of ids, URLs, or dicts with ``id``/``url``), so invented sources
    cost reward.

    Attributes:
      styles: citation styles to look for (names in :data:`CITATION_STYLES`).
      min_count: distinct citations required.
      ids_column: dataset column listing the sources that exist, or ``None`` to skip that check.
    """

    styles: Sequence[str] = ("brackets", "urls")
    min_count: int = 1
    ids_column: str | None = None
    present: float = 1.0
    missing: float = 0.0
    name: str = "citations"

    def __post_init__(self) -> None:
        freeze_names(self, "styles", CITATION_STYLES, "style(s)", empty_ok=False)
        if self.min_count < 1:
            raise ValueError(f"citations.min_count must be >= 1, got {self.min_count}")

    def __call__(self, *, completions: Sequence[Any], **columns: Any) -> list[float | None]:
        sources = (
            column(columns, self.ids_column, self.name) if self.ids_column else [None] * len(completions)
        )
        out: list[float | None] = []
        for completion, row_sources in zip(completions, sources, strict=True):
            cited = set(find_citations(completion_text(completion), self.styles))
            if len(cited) < self.min_count:
                out.append(self.missing)
            elif self.ids_column is None:
                out.append(self.present)
            else:
                known = _known_ids(row_sources)
                out.append(self.present * len(cited & known) / len(cited))
        return out
