"""Tool-call parsers: assistant text -> the tool calls it asks for.

A parser is a function ``parse(text) -> list[ToolCall]``. The default, ``hermes``, reads the format of Hermes
and Qwen 2.5/3 chat templates: each call is a JSON object between tags,

    <tool_call>{"name": "calc", "arguments": {"expression": "12*34"}}</tool_call>

``arguments`` may also be a JSON string holding the object (some models write it so). A tag whose body is not
such an object still gives a ``ToolCall``, with ``error`` set: the model is told what was wrong, and the call
counts as a failed one. Parsers are named in :data:`PARSERS`; :func:`get_parser` also takes a callable, or a
``module:function`` / ``file.py:function`` spec.
"""

from __future__ import annotations

import dataclasses
import json
import re
from collections.abc import Callable
from typing import Any

_HERMES_RE = re.compile(r"<tool_call>(.*?)(?:</tool_call>|$)", re.DOTALL)


@dataclasses.dataclass(frozen=True)
class ToolCall:
    """One call: the tool's ``name`` and keyword ``arguments``; ``error`` is a message when the call could
    not be read (then ``name`` may be empty)."""

    name: str
    arguments: dict[str, Any]
    error: str | None = None

    def as_message_call(self) -> dict[str, Any]:
        """The call as a chat message's ``tool_calls`` entry (transformers' / OpenAI's shape)."""
        return {"type": "function", "function": {"name": self.name, "arguments": self.arguments}}


def parse_hermes(text: str) -> list[ToolCall]:
    """Every ``<tool_call>{...}</tool_call>`` of ``text`` in order (an unclosed last tag: to the end)."""
    calls = []
    for body in _HERMES_RE.findall(text):
        calls.append(_call_from_json(body.strip()))
    return calls


def _call_from_json(body: str) -> ToolCall:
    try:
        obj = json.loads(body)
    except json.JSONDecodeError as err:
        return ToolCall("", {}, f"the tool call is not valid JSON ({err.msg} at char {err.pos})")
    if not isinstance(obj, dict) or not isinstance(obj.get("name"), str):
        return ToolCall("", {}, 'a tool call must be a JSON object {"name": ..., "arguments": {...}}')
    arguments = obj.get("arguments", {})
    if isinstance(arguments, str):
        try:
            arguments = json.loads(arguments) if arguments.strip() else {}
        except json.JSONDecodeError:
            return ToolCall(obj["name"], {}, "the tool call's arguments are not a JSON object")
    if not isinstance(arguments, dict):
        return ToolCall(obj["name"], {}, "the tool call's arguments are not a JSON object")
    return ToolCall(obj["name"], arguments)


PARSERS: dict[str, Callable[[str], list[ToolCall]]] = {"hermes": parse_hermes}


def get_parser(parser: str | Callable[[str], list[ToolCall]]) -> Callable[[str], list[ToolCall]]:
    """A parser by name (:data:`PARSERS`), a ``module:function`` / ``file.py:function`` spec, or itself."""
    if callable(parser):
        return parser
    if parser in PARSERS:
        return PARSERS[parser]
    if ":" in parser:
        from jrft.rewards.loading import load_object

        obj, _ = load_object(parser)
        if not callable(obj):
            raise ValueError(f"tool parser {parser!r} is not callable")
        return obj
    raise ValueError(f"unknown tool parser {parser!r}; built-in: {sorted(PARSERS)} or a module:function spec")
