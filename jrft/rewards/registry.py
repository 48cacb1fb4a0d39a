"""Built-in reward functions by name, and building reward functions from config entries.

A config entry is one of:

- a built-in's name: ``"accuracy"``;
- a user function spec: ``"my_pkg.rewards:fn"`` or ``"path/to/rewards.py:fn"``;
- a mapping: ``{"name": "accuracy", "weight": 2.0, "tolerance": 1e-3}``, where ``name`` is a built-in or a
  spec, ``weight`` (default 1.0), ``label`` (metric name; default the built-in's name or the function's
  ``__name__``) and ``process`` (run in a worker process; default true for user functions, so that one that
  calls ``os._exit``, crashes the interpreter or eats all memory cannot take the trainer down, and false for
  built-ins) are reserved, and every other key is an option of the built-in (user functions take no
  options: bind them in your own code).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from typing import Any

from jrft.rewards.accuracy import AccuracyReward
from jrft.rewards.citations import CitationReward
from jrft.rewards.code_execution import CodeExecutionReward
from jrft.rewards.formatting import ThinkAnswerFormatReward
from jrft.rewards.harmful import HarmfulContentReward
from jrft.rewards.json_reward import JsonSchemaReward, JsonValidReward
from jrft.rewards.length import LengthReward, RepetitionPenaltyReward, SoftOverlongReward
from jrft.rewards.loading import load_reward_function
from jrft.rewards.protocol import reward_name

BUILTINS: dict[str, type] = {
    "accuracy": AccuracyReward,
    "format": ThinkAnswerFormatReward,
    "json_valid": JsonValidReward,
    "json_schema": JsonSchemaReward,
    "citations": CitationReward,
    "harmful": HarmfulContentReward,
    "soft_overlong": SoftOverlongReward,
    "length": LengthReward,
    "repetition": RepetitionPenaltyReward,
    "code_execution": CodeExecutionReward,
}
_RESERVED = ("name", "weight", "label", "process")


@dataclasses.dataclass(frozen=True)
class BuiltReward:
    """A reward function built from one config entry, with the runner settings that came with it."""

    function: Callable[..., Any]
    weight: float = 1.0
    label: str = ""
    process: bool = False


def make_builtin(name: str, options: Mapping[str, Any] | None = None, where: str = "reward") -> Any:
    """Instantiate the built-in ``name`` with ``options``; errors name the entry and the valid options."""
    if name not in BUILTINS:
        raise ValueError(
            f"{where}: unknown built-in reward {name!r}; built-ins: {sorted(BUILTINS)} "
            "(user functions are given as 'module:function' or 'file.py:function')"
        )
    cls = BUILTINS[name]
    fields = {f.name for f in dataclasses.fields(cls)}
    options = dict(options or {})
    unknown = sorted(set(options) - fields)
    if unknown:
        raise ValueError(
            f"{where}: unknown option(s) {unknown} for reward {name!r}; options: {sorted(fields)}"
        )
    try:
        return cls(**options)
    except (TypeError, ValueError) as err:
        raise ValueError(f"{where}: {err}") from err


def build_reward(entry: str | Mapping[str, Any], where: str = "reward") -> BuiltReward:
    """Build one reward function from a config entry (see the module docstring for the forms)."""
    if isinstance(entry, str):
        entry = {"name": entry}
    if not isinstance(entry, Mapping) or not isinstance(entry.get("name"), str):
        raise ValueError(f"{where}: expected a name string or a mapping with a 'name' key, got {entry!r}")
    name = entry["name"]
    options = {k: v for k, v in entry.items() if k not in _RESERVED}
    if ":" in name:
        if options:
            raise ValueError(f"{where}: user function {name!r} takes no options, got {sorted(options)}")
        function = load_reward_function(name)
    else:
        if "label" in entry:
            options["name"] = entry["label"]  # the built-in reports its metrics under its label
        function = make_builtin(name, options, where)
    weight = entry.get("weight", 1.0)
    if not isinstance(weight, int | float) or isinstance(weight, bool):
        raise ValueError(f"{where}.weight must be a number, got {weight!r}")
    process = entry.get("process")
    if process is None:
        process = ":" in name  # user code runs where it cannot kill the trainer
    return BuiltReward(function, float(weight), str(entry.get("label", reward_name(function))), bool(process))
