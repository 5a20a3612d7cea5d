"""Constrained decoding (engine/llm/grammar.py) on the tiny chat tokenizer, driven by random logits:
whatever the model prefers, the output follows the grammar and ends when it is complete."""

from __future__ import annotations

import json

import jsonschema
import pytest
import torch

from engine.errors import InvalidInput
from engine.llm.constraints import Constraint
from engine.llm.grammar import constraint_factory, tool_call_schema
from server.tool_calls import ToolCallStream, split_tool_calls

WEATHER = {"type": "function", "function": {"name": "get_weather", "parameters": {
    "type": "object", "required": ["unit", "days"],
    "properties": {"unit": {"enum": ["c", "f"]}, "days": {"type": "integer", "minimum": 1, "maximum": 7}}}}}
NOOP = {"type": "function", "function": {"name": "noop"}}
SCHEMA = {"type": "object", "required": ["ok", "n"], "additionalProperties": False,
          "properties": {"ok": {"type": "boolean"}, "n": {"type": "integer", "minimum": 0, "maximum": 99}}}


@pytest.fixture(scope="module")
def tokenizer(demo_folders):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(demo_folders["tiny-chat"])


def walk(tokenizer, factory, seed: int, padded_vocab: int = 0, bias: dict[int, float] | None = None) -> str:
    """Sample from random logits under the constraint until it is done."""
    constraint = factory(0)
    assert isinstance(constraint, Constraint)
    generator = torch.Generator().manual_seed(seed)
    vocab = len(tokenizer) + padded_vocab
    out = []
    for _ in range(200):
        mask = constraint.allowed_token_mask(vocab)
        assert mask.shape == (vocab,) and not mask[len(tokenizer):].any()
        logits = torch.randn(vocab, generator=generator)
        for token, value in (bias or {}).items():
            logits[token] += value
        token = int(logits.masked_fill(~mask, float("-inf")).argmax())
        constraint.accept(token)
        out.append(token)
        if constraint.is_done():
            return tokenizer.decode(out)
    raise AssertionError(f"constraint never finished: {tokenizer.decode(out)!r}")


@pytest.mark.parametrize("seed", range(4))
def test_required_tool_call_matches_a_tool_schema(tokenizer, seed):
    factory = constraint_factory(tokenizer, None, [WEATHER, NOOP], "required")
    text = walk(tokenizer, factory, seed, padded_vocab=30)
    parser = ToolCallStream(["get_weather", "noop"])
    content, _ = parser.feed(text)
    assert content + parser.finish()[0] == ""
    (call,) = parser.calls
    arguments = json.loads(call["function"]["arguments"])
    tool = WEATHER if call["function"]["name"] == "get_weather" else NOOP
    jsonschema.validate(arguments, tool["function"].get("parameters") or {"type": "object", "maxProperties": 0})


def test_named_tool_choice_forces_that_tool(tokenizer):
    choice = {"type": "function", "function": {"name": "get_weather"}}
    for seed in range(3):
        text = walk(tokenizer, constraint_factory(tokenizer, None, [NOOP, WEATHER], choice), seed)
        assert text.startswith('<tool_call>{"name": "get_weather", "arguments": {"unit": ')
    with pytest.raises(InvalidInput):
        constraint_factory(tokenizer, None, [NOOP], {"type": "function", "function": {"name": "nope"}})


@pytest.mark.parametrize("seed", range(4))
def test_json_schema_output_validates(tokenizer, seed):
    factory = constraint_factory(tokenizer, {"type": "json_schema", "json_schema": {"name": "r", "schema": SCHEMA}},
                                 None, "auto")
    jsonschema.validate(json.loads(walk(tokenizer, factory, seed)), SCHEMA)


def test_json_object_is_an_object(tokenizer):
    braces = {tokenizer.convert_tokens_to_ids(b): 50.0 for b in "{}"}
    factory = constraint_factory(tokenizer, {"type": "json_object"}, None, "auto")
    assert json.loads(walk(tokenizer, factory, 0, bias=braces)) == {}


def test_free_output_has_no_constraint(tokenizer):
    assert constraint_factory(tokenizer, {"type": "text"}, None, "auto") is None
    assert constraint_factory(tokenizer, None, [WEATHER], "auto") is None


@pytest.mark.parametrize("response_format", [{"type": "json_schema"}, {"type": "yaml"},
                                             {"type": "json_schema", "json_schema": {"schema": {"type": "nonsense"}}}])
def test_bad_response_formats_are_input_errors(tokenizer, response_format):
    with pytest.raises(InvalidInput):
        constraint_factory(tokenizer, response_format, None, "auto")


def _tool(name: str, parameters: dict) -> dict:
    return {"type": "function", "function": {"name": name, "parameters": parameters}}


# Two tools whose $defs share a name but not a shape, one of them also referring to its own root.
BOX = _tool("box", {"type": "object", "required": ["item"], "additionalProperties": False,
                    "properties": {"item": {"$ref": "#/$defs/Item"}},
                    "$defs": {"Item": {"type": "object", "required": ["w"], "additionalProperties": False,
                                       "properties": {"w": {"type": "integer", "minimum": 0, "maximum": 9}}}}})
TAG = _tool("tag", {"type": "object", "required": ["item"], "additionalProperties": False,
                    "properties": {"item": {"$ref": "#/definitions/Item"},
                                   "copy": {"$ref": "#/properties/item"}},
                    "definitions": {"Item": {"enum": ["red", "blue"]}}})
TREE = _tool("tree", {"type": "object", "required": ["v"], "properties": {
    "v": {"type": "integer"}, "kids": {"type": "array", "items": {"$ref": "#"}}}})


@pytest.mark.parametrize("seed", range(4))
def test_refs_resolve_against_each_tools_own_parameters(tokenizer, seed):
    factory = constraint_factory(tokenizer, None, [BOX, TAG], "required")
    text = walk(tokenizer, factory, seed)
    content, (call,) = split_tool_calls(text, ["box", "tag"])
    assert content == ""
    tool = {"box": BOX, "tag": TAG}[call["function"]["name"]]
    jsonschema.validate(json.loads(call["function"]["arguments"]), tool["function"]["parameters"])


def test_call_schema_renames_defs_per_tool_and_keeps_root_refs(tokenizer):
    schema = tool_call_schema([BOX, TAG, TREE])
    assert set(schema["$defs"]) == {"tool0.Item", "tool1.Item", "tool1", "tool2"}
    box, tag, tree = (v["properties"]["arguments"] for v in schema["anyOf"])
    assert box["properties"]["item"] == {"$ref": "#/$defs/tool0.Item"} and "$defs" not in box
    assert tag["properties"]["copy"] == {"$ref": "#/$defs/tool1/properties/item"}
    assert tree["properties"]["kids"]["items"] == {"$ref": "#/$defs/tool2"}
    assert constraint_factory(tokenizer, None, [BOX, TAG, TREE], "required") is not None


@pytest.mark.parametrize("seed", range(6))
def test_strings_never_hold_raw_control_characters(tokenizer, seed):
    """xgrammar's rule for bounded strings allows bytes below 0x20; the constraint refuses them,
    even when the model prefers them."""
    control = [i for i in range(len(tokenizer)) if any(ord(c) < 0x20 and c not in "\n\r"
                                                       for c in tokenizer.decode([i]))]
    assert control
    schema = {"type": "object", "required": ["s", "p"], "additionalProperties": False,
              "properties": {"s": {"type": "string", "maxLength": 6}, "p": {"type": "string", "pattern": "^.{1,4}$"}}}
    factory = constraint_factory(tokenizer, {"type": "json_schema", "json_schema": {"schema": schema}}, None, "auto")
    text = walk(tokenizer, factory, seed, bias={i: 8.0 for i in control})
    jsonschema.validate(json.loads(text, strict=True), schema)
