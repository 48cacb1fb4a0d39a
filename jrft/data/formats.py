"""Row formats: detection from columns and validation with errors naming the source, row and field.

Formats (TRL's dataset conventions):

===================  ==========================================================  ==============
format               columns                                                     batch kind
===================  ==========================================================  ==============
prompt_completion    ``prompt``: str | messages, ``completion``: str | messages  ``sft``
messages             ``messages``: [{"role", "content"}, ...] (loss on assistant)  ``sft``
preference           ``prompt``, ``chosen``, ``rejected`` (str or messages)       ``preference``
ranked               ``prompt``, ``completions``: [str], ``ranking``: [int]       ``preference``
prompt_only          ``prompt`` (+ any extra columns, passed to reward functions)  ``prompt``
text                 ``text``: str (language modelling, loss on every token)      ``sft``
implicit_preference  ``chosen``, ``rejected``: the prompt is their shared start    ``preference``
unpaired             ``prompt``, ``completion``, ``label``: bool (KTO)            ``unpaired``
===================  ==========================================================  ==============

``implicit_preference`` rows (TRL's "implicit prompt"): conversations whose shared leading messages are the
prompt (:func:`split_implicit_prompt`); plain strings split at their longest common prefix, backed off to a
space as TRL's ``extract_prompt`` does. ``unpaired`` rows are KTO's: one completion with a desirable
(``true``) or undesirable (``false``) label.

``messages`` is a list of ``{"role": "system"|"user"|"assistant"|"tool", "content": str}``. In ``ranked``
rows, ``ranking`` lists the indices of ``completions`` from best to worst (a permutation of 0..K-1); each row
expands to the K(K-1)/2 pairs (better, worse), or stays one whole ranking (batch kind ``ranking``) for
listwise reward losses (``EncodeOptions(ranked_as="lists")``).

A validator returns nothing and raises :class:`DataError`; :data:`FORMATS` maps a format name to its spec.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from jrft.data.errors import DataError

ROLES = ("system", "user", "assistant", "tool")


def is_messages(value: Any) -> bool:
    """True for a (non-empty) list of chat messages (dicts with a role)."""
    return (
        isinstance(value, list)
        and len(value) > 0
        and all(isinstance(m, Mapping) and "role" in m for m in value)
    )


class _RowChecker:
    """Small helpers bound to one row so every error carries the source, row and field."""

    def __init__(self, source: str, index: int, row: Mapping[str, Any]):
        self.source, self.index, self.row = source, index, row

    def fail(self, field: str | None, message: str):
        raise DataError(self.source, message, row=self.index, field=field)

    def get(self, field: str) -> Any:
        if field not in self.row:
            self.fail(field, f"missing column (row has: {', '.join(sorted(self.row)) or 'no columns'})")
        return self.row[field]

    def text(self, field: str, value: Any = None, *, allow_empty: bool = False) -> str:
        value = self.get(field) if value is None else value
        if not isinstance(value, str):
            self.fail(field, f"expected a string, got {type(value).__name__}")
        if not allow_empty and not value.strip():
            self.fail(field, "empty text")
        return value

    def messages(self, field: str, *, need_assistant: bool) -> list:
        value = self.get(field)
        if not isinstance(value, list) or not value:
            self.fail(field, f"expected a non-empty list of messages, got {type(value).__name__}")
        for j, m in enumerate(value):
            if not isinstance(m, Mapping):
                self.fail(f"{field}[{j}]", f"expected a message dict, got {type(m).__name__}")
            role = m.get("role")
            if role not in ROLES:
                self.fail(f"{field}[{j}].role", f"expected one of {ROLES}, got {role!r}")
            content = m.get("content")
            if not isinstance(content, str):
                self.fail(f"{field}[{j}].content", f"expected a string, got {type(content).__name__}")
            if role == "assistant" and not content.strip():
                self.fail(f"{field}[{j}].content", "empty assistant message")
        if need_assistant and not any(m["role"] == "assistant" for m in value):
            self.fail(field, "no assistant message (nothing to learn)")
        return value

    def text_or_messages(self, field: str, *, need_assistant: bool) -> str | list:
        value = self.get(field)
        if isinstance(value, list):
            return self.messages(field, need_assistant=need_assistant)
        if not isinstance(value, str):
            self.fail(field, f"expected a string or a list of messages, got {type(value).__name__}")
        return self.text(field)


def _check_prompt_completion(c: _RowChecker) -> None:
    prompt = c.text_or_messages("prompt", need_assistant=False)
    completion = c.text_or_messages("completion", need_assistant=isinstance(prompt, list))
    if isinstance(prompt, list) != isinstance(completion, list):
        c.fail("completion", "prompt and completion must both be strings or both be lists of messages")


def _check_messages(c: _RowChecker) -> None:
    c.messages("messages", need_assistant=True)


def _check_preference(c: _RowChecker) -> None:
    prompt = c.text_or_messages("prompt", need_assistant=False)
    for field in ("chosen", "rejected"):
        value = c.text_or_messages(field, need_assistant=isinstance(prompt, list))
        if isinstance(prompt, list) != isinstance(value, list):
            c.fail(field, "prompt and completions must all be strings or all be lists of messages")


def _check_ranked(c: _RowChecker) -> None:
    c.text("prompt")
    completions = c.get("completions")
    if not isinstance(completions, list) or len(completions) < 2:
        c.fail("completions", "expected a list of at least 2 strings")
    for j, text in enumerate(completions):
        c.text(f"completions[{j}]", text)
    ranking = c.get("ranking")
    if not isinstance(ranking, list) or not all(
        isinstance(r, int) and not isinstance(r, bool) for r in ranking
    ):
        c.fail("ranking", f"expected a list of ints, got {ranking!r}")
    if sorted(ranking) != list(range(len(completions))):
        c.fail("ranking", f"must be a permutation of 0..{len(completions) - 1} (best first), got {ranking}")


def _check_prompt_only(c: _RowChecker) -> None:
    c.text_or_messages("prompt", need_assistant=False)


def _check_text(c: _RowChecker) -> None:
    c.text("text")


def split_implicit_prompt(chosen, rejected) -> tuple[Any, Any, Any]:
    """``(prompt, chosen_rest, rejected_rest)`` of an implicit-prompt preference row: the longest shared
    start of the two conversations (whole messages) or strings (characters, backed off to before a
    trailing space, as TRL's ``extract_prompt``)."""
    n = 0
    while n < min(len(chosen), len(rejected)) and chosen[n] == rejected[n]:
        n += 1
    if isinstance(chosen, str) and 0 < n < len(chosen) and chosen[n - 1] == " ":
        n -= 1
    return chosen[:n], chosen[n:], rejected[n:]


def _check_implicit_preference(c: _RowChecker) -> None:
    chosen = c.text_or_messages("chosen", need_assistant=False)
    rejected = c.text_or_messages("rejected", need_assistant=False)
    if isinstance(chosen, list) != isinstance(rejected, list):
        c.fail("rejected", "chosen and rejected must both be strings or both be lists of messages")
    prompt, chosen_rest, rejected_rest = split_implicit_prompt(chosen, rejected)
    if not prompt or (isinstance(prompt, str) and not prompt.strip()):
        c.fail("chosen", "chosen and rejected share no start: no implicit prompt (add a 'prompt' column)")
    for field, rest in (("chosen", chosen_rest), ("rejected", rejected_rest)):
        if not rest or (isinstance(rest, str) and not rest.strip()):
            c.fail(field, "nothing after the shared prompt (chosen and rejected must differ at their end)")
        if isinstance(rest, list) and not any(m["role"] == "assistant" for m in rest):
            c.fail(field, "no assistant message after the shared prompt (nothing to compare)")


def _check_unpaired(c: _RowChecker) -> None:
    _check_prompt_completion(c)
    label = c.get("label")
    if not isinstance(label, bool):
        c.fail("label", f"expected true (desirable) or false (undesirable), got {label!r}")


@dataclass(frozen=True)
class Format:
    """A row format: the columns that identify it, its validator and the batch kind it produces."""

    name: str
    columns: frozenset[str]
    check: Callable[[_RowChecker], None]
    batch_kind: str  # "sft" | "preference" | "prompt" | "unpaired"


FORMATS: dict[str, Format] = {
    f.name: f
    for f in (
        Format("messages", frozenset({"messages"}), _check_messages, "sft"),
        Format("preference", frozenset({"prompt", "chosen", "rejected"}), _check_preference, "preference"),
        Format("ranked", frozenset({"prompt", "completions", "ranking"}), _check_ranked, "preference"),
        Format("unpaired", frozenset({"prompt", "completion", "label"}), _check_unpaired, "unpaired"),
        Format("prompt_completion", frozenset({"prompt", "completion"}), _check_prompt_completion, "sft"),
        Format("prompt_only", frozenset({"prompt"}), _check_prompt_only, "prompt"),
        Format(
            "implicit_preference",
            frozenset({"chosen", "rejected"}),
            _check_implicit_preference,
            "preference",
        ),
        Format("text", frozenset({"text"}), _check_text, "sft"),
    )
}


def detect_format(source: str, row: Mapping[str, Any]) -> str:
    """The first format (in :data:`FORMATS` order, most specific first) whose columns the row has."""
    for fmt in FORMATS.values():
        if fmt.columns <= set(row):
            return fmt.name
    raise DataError(
        source,
        f"cannot detect the format from columns {sorted(row)}; expected one of "
        + "; ".join(f"{f.name}: {sorted(f.columns)}" for f in FORMATS.values()),
        row=0,
    )


def validate_rows(source: str, rows: list[Mapping[str, Any]], format: str) -> None:
    """Checks every row against ``format``; raises :class:`DataError` at the first bad row."""
    if format not in FORMATS:
        raise DataError(source, f"unknown format {format!r}; expected one of {sorted(FORMATS)}")
    check = FORMATS[format].check
    for i, row in enumerate(rows):
        if not isinstance(row, Mapping):
            raise DataError(source, f"expected a mapping, got {type(row).__name__}", row=i)
        check(_RowChecker(source, i, row))
