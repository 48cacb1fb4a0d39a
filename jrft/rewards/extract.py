"""Pulling the final answer out of a completion, and reading it as a number.

Extractors are small named functions in :data:`EXTRACTORS` (text -> answer string or ``None``); a reward tries
them in the order its config lists. All of them see unicode-normalised text (full-width digits, the unicode
minus sign) and ignore what is inside ``<think>…</think>``, since reasoning is not the answer.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence

from jrft.rewards.protocol import normalize_unicode

# 1,234,567 | 1234 | 12.5 | .5 | 1e-3, with an optional sign. \d also matches other scripts' decimal digits.
_NUMBER = r"[-+]?(?:(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?|\.\d+)(?:[eE][-+]?\d+)?"
_NUMBER_RE = re.compile(rf"(?<![\w.]){_NUMBER}(?:\s*/\s*{_NUMBER})?")
_FRAC_RE = re.compile(r"^\\[dt]?frac\s*\{([^{}]+)\}\s*\{([^{}]+)\}$")
_SIMPLE_FRAC_RE = re.compile(rf"^({_NUMBER})\s*/\s*({_NUMBER})$")
_TEXT_RE = re.compile(r"\\(?:text|mathrm|textbf|mbox)\s*\{([^{}]*)\}")


def strip_think(text: str, tag: str = "think") -> str:
    """Remove ``<think>…</think>`` blocks; a dangling ``…</think>`` (opened in the prompt) is cut too."""
    text = re.sub(rf"<{tag}>.*?</{tag}>", " ", text, flags=re.DOTALL)
    close = text.rfind(f"</{tag}>")
    if close >= 0:
        text = text[close + len(tag) + 3 :]
    return text


def last_tag_content(text: str, tag: str = "answer") -> str | None:
    """Content of the last closed ``<tag>…</tag>``; with nested tags the innermost one (else ``None``).

    An opening tag left unclosed at the end (a truncated completion) is skipped in favour of an earlier block.
    """
    opening, closing = f"<{tag}>", f"</{tag}>"
    start = text.rfind(opening)
    while start >= 0:
        end = text.find(closing, start + len(opening))
        if end >= 0:
            return text[start + len(opening) : end].strip()
        start = text.rfind(opening, 0, start)
    return None


def last_boxed(text: str) -> str | None:
    """Content of the last ``\\boxed{…}``/``\\fbox{…}``, braces matched: ``\\boxed{\\frac{1}{2}}`` works."""
    starts = [m.end() for m in re.finditer(r"\\(?:boxed|fbox)\s*", text)]
    for start in reversed(starts):
        if start < len(text) and text[start] == "{":
            depth = 0
            for i in range(start, len(text)):
                depth += {"{": 1, "}": -1}.get(text[i], 0)
                if depth == 0:
                    return text[start + 1 : i].strip()
            continue  # unbalanced: try an earlier one
        token = re.match(r"[^\s$]+", text[start:])  # "\boxed 5"
        if token:
            return token.group(0)
    return None


def last_number(text: str) -> str | None:
    """The last number in the text (``"-1,234.5"``, ``"3/4"``), as written; ``None`` if there is none."""
    matches = _NUMBER_RE.findall(text)
    return matches[-1].strip() if matches else None


def _from_answer_tag(text: str) -> str | None:
    return last_tag_content(text, "answer")


EXTRACTORS: dict[str, Callable[[str], str | None]] = {
    "answer_tag": _from_answer_tag,
    "boxed": last_boxed,
    "last_number": last_number,
}


def extract_answer(text: str, methods: Sequence[str] = ("answer_tag", "boxed", "last_number")) -> str | None:
    """The answer given by the first extractor in ``methods`` that finds one (``None`` if none does).

    A ``\\boxed{}`` inside an ``<answer>`` block is unwrapped: ``<answer>\\boxed{5}</answer>`` gives ``"5"``.
    """
    text = strip_think(normalize_unicode(text))
    for method in methods:
        if method not in EXTRACTORS:
            raise ValueError(f"unknown answer extractor {method!r}; known: {sorted(EXTRACTORS)}")
        found = EXTRACTORS[method](text)
        if found is not None:
            boxed = last_boxed(found) if method != "boxed" else None
            return boxed if boxed is not None else found
    return None


def reference_answer(gold: object) -> str:
    """The answer in a dataset's reference: GSM8K's ``"… #### 42"``, a ``\\boxed{}``, or the value itself."""
    text = normalize_unicode(str(gold)).strip()
    if "####" in text:
        return text.rsplit("####", 1)[1].strip()
    boxed = last_boxed(text)
    return boxed if boxed is not None else text


def parse_number(text: str | None) -> float | None:
    """Read an answer as a number: ``"$1,234"``, ``"50%"``, ``"-3/4"``, ``"\\frac{3}{4}"``, ``"12."``.

    Returns ``None`` when the whole string is not one number (``"5 apples"`` is not; use
    :func:`last_number` first when prose is expected).
    """
    if text is None:
        return None
    s = normalize_unicode(text).strip()
    s = _TEXT_RE.sub(lambda m: m.group(1), s)
    s = s.replace("\\$", "").replace("$", "").replace("\\%", "").replace("%", "").replace("\\!", "")
    s = s.replace("\\left", "").replace("\\right", "").strip().rstrip(".").strip()
    if s.startswith("{") and s.endswith("}"):
        s = s[1:-1].strip()
    sign = 1.0
    if s[:1] in "+-" and s[1:2] == "\\":
        sign, s = (-1.0 if s[0] == "-" else 1.0), s[1:]
    frac = _FRAC_RE.match(s) or _SIMPLE_FRAC_RE.match(s)
    if frac:
        num, den = parse_number(frac.group(1)), parse_number(frac.group(2))
        if num is None or den is None or den == 0:
            return None
        return sign * num / den
    if not re.fullmatch(_NUMBER, s):
        return None
    try:
        return sign * float(s.replace(",", ""))
    except ValueError:
        return None


def normalize_text_answer(text: str) -> str:
    """Canonical form for comparing non-numeric answers: no LaTeX text wrappers, case, or extra spaces."""
    s = _TEXT_RE.sub(lambda m: m.group(1), normalize_unicode(text))
    s = s.replace("$", "").strip().rstrip(".").strip()
    return " ".join(s.casefold().split())
