"""JSON validity and JSON-Schema conformance of a completion (structured-output tasks).

How the JSON is found is a named mode in :data:`JSON_EXTRACTORS`:

- ``strict``: the whole completion (surrounding whitespace aside) must be one JSON value.
- ``auto``: the whole completion; else the content of the last ``<answer>`` block; else the last fenced
  code block (```` ```json … ``` ````); else the first ``{…}`` or ``[…]`` that parses.
"""

from __future__ import annotations

import dataclasses
import json
import re
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from jrft.rewards.extract import last_tag_content
from jrft.rewards.json_schema import check_schema, validate
from jrft.rewards.protocol import column, completion_text

_NOT_FOUND = object()
_FENCE_RE = re.compile(r"```[ \t]*(?:json|JSON)?[ \t]*\n(.*?)```", re.DOTALL)


def _parse(text: str) -> Any:
    try:
        return json.loads(text)
    except (ValueError, RecursionError):
        return _NOT_FOUND


def _strict(text: str) -> Any:
    return _parse(text.strip())


def _first_embedded(text: str) -> Any:
    decoder = json.JSONDecoder()
    for match in re.finditer(r"[{\[]", text):
        try:
            value, _ = decoder.raw_decode(text, match.start())
            return value
        except (ValueError, RecursionError):
            continue
    return _NOT_FOUND


def _auto(text: str) -> Any:
    value = _strict(text)
    if value is not _NOT_FOUND:
        return value
    answer = last_tag_content(text, "answer")
    if answer is not None and (value := _strict(answer)) is not _NOT_FOUND:
        return value
    fences = _FENCE_RE.findall(text)
    if fences and (value := _strict(fences[-1])) is not _NOT_FOUND:
        return value
    return _first_embedded(text)


JSON_EXTRACTORS: dict[str, Callable[[str], Any]] = {"strict": _strict, "auto": _auto}


def extract_json(text: str, mode: str = "auto") -> tuple[bool, Any]:
    """``(True, value)`` for the JSON found in ``text`` by ``mode``, else ``(False, None)``."""
    value = JSON_EXTRACTORS[mode](text)
    return (False, None) if value is _NOT_FOUND else (True, value)


def _check_mode(mode: str, reward: str) -> None:
    if mode not in JSON_EXTRACTORS:
        raise ValueError(f"{reward}.extract must be one of {sorted(JSON_EXTRACTORS)}, got {mode!r}")


@dataclasses.dataclass(frozen=True)
class JsonValidReward:
    """``valid`` when a JSON value is found (see ``extract``), else ``invalid``."""

    extract: str = "auto"
    valid: float = 1.0
    invalid: float = 0.0
    name: str = "json_valid"

    def __post_init__(self) -> None:
        _check_mode(self.extract, self.name)

    def __call__(self, *, completions: Sequence[Any], **_: Any) -> list[float | None]:
        return [
            self.valid if extract_json(completion_text(c), self.extract)[0] else self.invalid
            for c in completions
        ]


@dataclasses.dataclass(frozen=True)
class JsonSchemaReward:
    """``conforming`` when the JSON found conforms to the schema; ``nonconforming`` when it parses but does
    not conform; ``invalid`` when no JSON is found.

    The schema is fixed (``schema``) or per row (``schema_column``: a dict or a JSON string per row; a row
    whose schema is ``None`` gets ``None``). Only the subset in :mod:`jrft.rewards.json_schema` is supported,
    and anything else is rejected when the reward is built (or, for a column, on the offending row).
    """

    schema: Mapping[str, Any] | None = None
    schema_column: str | None = None
    extract: str = "auto"
    conforming: float = 1.0
    nonconforming: float = 0.0
    invalid: float = 0.0
    name: str = "json_schema"

    def __post_init__(self) -> None:
        _check_mode(self.extract, self.name)
        if (self.schema is None) == (self.schema_column is None):
            raise ValueError(f"{self.name}: give exactly one of 'schema' or 'schema_column'")
        if self.schema is not None:
            check_schema(self.schema)

    def _row_schema(self, raw: Any, row: int) -> Any:
        schema = json.loads(raw) if isinstance(raw, str) else raw
        try:
            check_schema(schema)
        except ValueError as err:
            raise ValueError(f"{self.name}: column {self.schema_column!r}, row {row}: {err}") from err
        return schema

    def __call__(self, *, completions: Sequence[Any], **columns: Any) -> list[float | None]:
        if self.schema_column is not None:
            schemas = column(columns, self.schema_column, self.name)
        else:
            schemas = [self.schema] * len(completions)
        out: list[float | None] = []
        for row, (completion, raw) in enumerate(zip(completions, schemas, strict=True)):
            if raw is None:
                out.append(None)
                continue
            schema = self._row_schema(raw, row) if self.schema_column is not None else raw
            found, value = extract_json(completion_text(completion), self.extract)
            if not found:
                out.append(self.invalid)
            else:
                out.append(self.nonconforming if validate(value, schema) else self.conforming)
        return out
