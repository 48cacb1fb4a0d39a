"""JSON validity, the JSON-Schema subset, and the JSON rewards (malformed JSON included)."""

import pytest

from jrft.rewards import JsonSchemaReward, JsonValidReward, extract_json
from jrft.rewards.json_schema import check_schema, validate


def score(fn, completions, **columns):
    return fn(prompts=["p"] * len(completions), completions=completions, **columns)


@pytest.mark.parametrize(
    "text, found, value",
    [
        ('{"a": 1}', True, {"a": 1}),
        ("  [1, 2]\n", True, [1, 2]),
        ('Here you go:\n```json\n{"a": 2}\n```\nDone.', True, {"a": 2}),
        ('<think>{"draft": 0}</think><answer>{"a": 3}</answer>', True, {"a": 3}),
        ('The result is {"a": 4} as requested', True, {"a": 4}),
        ('{"a": 1,}', False, None),  # trailing comma
        ("{'a': 1}", False, None),  # single quotes
        ('{"a": [1, 2}', False, None),  # unbalanced
        ('{"a": NaN', False, None),
        ("", False, None),
        ('{"ключ": "значение ✓"}', True, {"ключ": "значение ✓"}),
    ],
)
def test_extract_json_auto(text, found, value):
    assert extract_json(text, "auto") == (found, value)


def test_extract_json_strict_rejects_surrounding_text():
    assert extract_json('{"a": 1}', "strict") == (True, {"a": 1})
    assert extract_json('ok: {"a": 1}', "strict") == (False, None)
    assert score(JsonValidReward(extract="strict"), ['{"a": 1}', 'x {"a": 1}', "[1,]"]) == [1.0, 0.0, 0.0]
    assert score(JsonValidReward(), ["null", "true", "3"]) == [1.0, 1.0, 1.0]  # any JSON value is valid


SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "minLength": 1},
        "age": {"type": "integer", "minimum": 0},
        "tags": {"type": "array", "items": {"type": "string"}, "uniqueItems": True},
        "kind": {"enum": ["a", "b"]},
    },
    "required": ["name", "age"],
    "additionalProperties": False,
}


@pytest.mark.parametrize(
    "instance, ok",
    [
        ({"name": "x", "age": 3}, True),
        ({"name": "x", "age": 3.0}, True),  # 3.0 is an integer in JSON Schema
        ({"name": "x", "age": True}, False),  # booleans are not integers
        ({"name": "x"}, False),
        ({"name": "", "age": 1}, False),
        ({"name": "x", "age": -1}, False),
        ({"name": "x", "age": 1, "extra": 0}, False),
        ({"name": "x", "age": 1, "tags": ["a", "a"]}, False),
        ({"name": "x", "age": 1, "tags": ["a", 1]}, False),
        ({"name": "x", "age": 1, "kind": "c"}, False),
        ([1], False),
    ],
)
def test_schema_subset(instance, ok):
    assert (validate(instance, SCHEMA) == []) is ok


def test_schema_combinators_and_error_paths():
    schema = {"anyOf": [{"type": "string", "pattern": "^a"}, {"type": "number", "exclusiveMaximum": 10}]}
    assert validate("abc", schema) == [] and validate(9.5, schema) == []
    assert validate("bcd", schema) and validate(10, schema)
    one = {"oneOf": [{"type": "number"}, {"type": "integer"}]}
    assert validate(1.5, one) == [] and validate(2, one)  # 2 matches both
    errors = validate(
        {"a": {"b": [1, "x"]}}, {"properties": {"a": {"properties": {"b": {"items": {"type": "integer"}}}}}}
    )
    assert errors == ["$.a.b[1]: expected type integer, got str"]


def test_check_schema_rejects_unsupported_keywords():
    with pytest.raises(ValueError, match=r"\$\.properties\.x.*\$ref"):
        check_schema({"properties": {"x": {"$ref": "#/defs/y"}}})
    with pytest.raises(ValueError, match="unknown type"):
        check_schema({"type": "int"})
    check_schema({"title": "ok", "description": "annotations are fine", "type": ["string", "null"]})


def test_json_schema_reward_fixed_and_per_row():
    fn = JsonSchemaReward(schema=SCHEMA, nonconforming=0.5)
    completions = [
        '{"name": "x", "age": 3}',
        '```json\n{"name": "x"}\n```',
        '{"name": "x", "age": 3',
        "plain text",
    ]
    assert score(fn, completions) == [1.0, 0.5, 0.0, 0.0]
    per_row = JsonSchemaReward(schema_column="schema")
    schemas = ['{"type": "array", "maxItems": 2}', {"type": "array", "maxItems": 2}, None]
    assert score(per_row, ["[1, 2]", "[1, 2, 3]", "[]"], schema=schemas) == [1.0, 0.0, None]


def test_json_schema_reward_config_errors():
    with pytest.raises(ValueError, match="exactly one"):
        JsonSchemaReward()
    with pytest.raises(ValueError, match="unsupported keyword"):
        JsonSchemaReward(schema={"if": {}})
    with pytest.raises(ValueError, match="column 'schema', row 1"):
        score(JsonSchemaReward(schema_column="schema"), ["1", "2"], schema=[{}, {"$ref": "x"}])
