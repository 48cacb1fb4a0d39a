"""A small JSON-Schema validator for the subset that structured-output rewards need (no dependency).

Supported keywords (JSON Schema draft 2020-12 meaning):
``type`` (a name or a list; ``integer`` excludes booleans and accepts 3.0), ``enum``, ``const``,
``properties``, ``required``, ``additionalProperties`` (bool or schema), ``minProperties``,
``maxProperties``, ``items`` (one schema for every element), ``minItems``, ``maxItems``, ``uniqueItems``,
``minLength``, ``maxLength``, ``pattern`` (Python ``re.search``), ``minimum``, ``maximum``,
``exclusiveMinimum``, ``exclusiveMaximum``, ``multipleOf``, ``allOf``, ``anyOf``, ``oneOf``, ``not``.
Annotations (``title``, ``description``, ``$schema``, ``$id``, ``default``, ``examples``, ``format``,
``$comment``) are accepted and ignored. Any other keyword (``$ref``, ``if``/``then``, ``prefixItems``, …)
is rejected by :func:`check_schema` rather than silently ignored.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Callable
from typing import Any

_TYPES: dict[str, Callable[[Any], bool]] = {
    "object": lambda v: isinstance(v, dict),
    "array": lambda v: isinstance(v, list),
    "string": lambda v: isinstance(v, str),
    "boolean": lambda v: isinstance(v, bool),
    "null": lambda v: v is None,
    "number": lambda v: isinstance(v, int | float) and not isinstance(v, bool),
    "integer": lambda v: isinstance(v, int | float) and not isinstance(v, bool) and float(v).is_integer(),
}
_ANNOTATIONS = {"title", "description", "$schema", "$id", "default", "examples", "format", "$comment"}
_SUBSCHEMA_LISTS = ("allOf", "anyOf", "oneOf")


def _equal(a: Any, b: Any) -> bool:
    """JSON equality: 1 == 1.0 but True != 1."""
    return json.dumps(a, sort_keys=True) == json.dumps(b, sort_keys=True) or (
        _TYPES["number"](a) and _TYPES["number"](b) and a == b
    )


def _check_type(v: Any, s: dict, path: str) -> list[str]:
    names = s["type"] if isinstance(s["type"], list) else [s["type"]]
    if any(_TYPES[n](v) for n in names):
        return []
    return [f"{path}: expected type {' or '.join(names)}, got {type(v).__name__}"]


# The size bounds ``min<Name>`` / ``max<Name>``: how a size below / above them is reported, and its unit.
_SIZE_WORDS = {
    "Properties": ("fewer than", "more than", "properties"),
    "Items": ("fewer than", "more than", "items"),
    "Length": ("shorter than", "longer than", "characters"),
}


def _check_size(n: int, s: dict, path: str, name: str) -> list[str]:
    """The bounds ``min<name>`` and ``max<name>`` (a key of :data:`_SIZE_WORDS`) of a size ``n``."""
    low, high, unit = _SIZE_WORDS[name]
    errors = []
    if n < s.get(f"min{name}", 0):
        errors.append(f"{path}: {low} {s[f'min{name}']} {unit}")
    if f"max{name}" in s and n > s[f"max{name}"]:
        errors.append(f"{path}: {high} {s[f'max{name}']} {unit}")
    return errors


def _check_object(v: Any, s: dict, path: str) -> list[str]:
    if not isinstance(v, dict):
        return []
    errors = [f"{path}: missing required property {k!r}" for k in s.get("required", []) if k not in v]
    props = s.get("properties", {})
    for key, value in v.items():
        if key in props:
            errors += validate(value, props[key], f"{path}.{key}")
        elif s.get("additionalProperties", True) is False:
            errors.append(f"{path}: unexpected property {key!r}")
        elif isinstance(s.get("additionalProperties"), dict):
            errors += validate(value, s["additionalProperties"], f"{path}.{key}")
    return errors + _check_size(len(v), s, path, "Properties")


def _check_array(v: Any, s: dict, path: str) -> list[str]:
    if not isinstance(v, list):
        return []
    errors = []
    if "items" in s:
        for i, item in enumerate(v):
            errors += validate(item, s["items"], f"{path}[{i}]")
    errors += _check_size(len(v), s, path, "Items")
    if s.get("uniqueItems") and len({json.dumps(x, sort_keys=True) for x in v}) < len(v):
        errors.append(f"{path}: items are not unique")
    return errors


def _check_string(v: Any, s: dict, path: str) -> list[str]:
    if not isinstance(v, str):
        return []
    errors = _check_size(len(v), s, path, "Length")
    if "pattern" in s and not re.search(s["pattern"], v):
        errors.append(f"{path}: does not match pattern {s['pattern']!r}")
    return errors


def _check_number(v: Any, s: dict, path: str) -> list[str]:
    if not _TYPES["number"](v):
        return []
    bounds = {
        "minimum": lambda x, b: x >= b,
        "maximum": lambda x, b: x <= b,
        "exclusiveMinimum": lambda x, b: x > b,
        "exclusiveMaximum": lambda x, b: x < b,
    }
    errors = [f"{path}: {v} violates {k} {s[k]}" for k, ok in bounds.items() if k in s and not ok(v, s[k])]
    if "multipleOf" in s and not math.isclose(v / s["multipleOf"], round(v / s["multipleOf"]), abs_tol=1e-9):
        errors.append(f"{path}: {v} is not a multiple of {s['multipleOf']}")
    return errors


def _check_values(v: Any, s: dict, path: str) -> list[str]:
    errors = []
    if "enum" in s and not any(_equal(v, e) for e in s["enum"]):
        errors.append(f"{path}: {v!r} is not one of {s['enum']}")
    if "const" in s and not _equal(v, s["const"]):
        errors.append(f"{path}: {v!r} is not {s['const']!r}")
    return errors


def _check_combinators(v: Any, s: dict, path: str) -> list[str]:
    errors = []
    for sub in s.get("allOf", []):
        errors += validate(v, sub, path)
    if "anyOf" in s and not any(not validate(v, sub, path) for sub in s["anyOf"]):
        errors.append(f"{path}: matches none of anyOf")
    if "oneOf" in s:
        n = sum(not validate(v, sub, path) for sub in s["oneOf"])
        if n != 1:
            errors.append(f"{path}: matches {n} of oneOf, expected exactly 1")
    if "not" in s and not validate(v, s["not"], path):
        errors.append(f"{path}: matches a 'not' schema")
    return errors


# keyword group -> checker; each checker ignores values of other types, as JSON Schema does.
_CHECKERS: dict[tuple[str, ...], Callable[[Any, dict, str], list[str]]] = {
    ("type",): _check_type,
    ("properties", "required", "additionalProperties", "minProperties", "maxProperties"): _check_object,
    ("items", "minItems", "maxItems", "uniqueItems"): _check_array,
    ("minLength", "maxLength", "pattern"): _check_string,
    ("minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum", "multipleOf"): _check_number,
    ("enum", "const"): _check_values,
    ("allOf", "anyOf", "oneOf", "not"): _check_combinators,
}
SUPPORTED_KEYWORDS = frozenset(k for group in _CHECKERS for k in group) | _ANNOTATIONS


def check_schema(schema: Any, path: str = "$") -> None:
    """Raise ValueError naming the place of any keyword outside the supported subset, or an unknown type."""
    if isinstance(schema, bool):
        return
    if not isinstance(schema, dict):
        raise ValueError(f"schema at {path} must be an object or a boolean, got {type(schema).__name__}")
    unsupported = sorted(set(schema) - SUPPORTED_KEYWORDS)
    if unsupported:
        raise ValueError(
            f"schema at {path}: unsupported keyword(s) {unsupported}; jrft validates the subset listed in "
            "jrft/rewards/json_schema.py"
        )
    if "type" in schema:
        names = schema["type"] if isinstance(schema["type"], list) else [schema["type"]]
        bad = [n for n in names if n not in _TYPES]
        if bad:
            raise ValueError(f"schema at {path}: unknown type(s) {bad}; known: {sorted(_TYPES)}")
    for key, sub in schema.get("properties", {}).items():
        check_schema(sub, f"{path}.properties.{key}")
    for key in ("items", "not", "additionalProperties"):
        if isinstance(schema.get(key), dict):
            check_schema(schema[key], f"{path}.{key}")
    for key in _SUBSCHEMA_LISTS:
        for i, sub in enumerate(schema.get(key, [])):
            check_schema(sub, f"{path}.{key}[{i}]")


def validate(instance: Any, schema: Any, path: str = "$") -> list[str]:
    """Errors of ``instance`` against ``schema`` (an empty list when it conforms)."""
    if schema is True or schema == {}:
        return []
    if schema is False:
        return [f"{path}: no value is allowed here"]
    errors: list[str] = []
    for keys, checker in _CHECKERS.items():
        if any(k in schema for k in keys):
            errors += checker(instance, schema, path)
    return errors
