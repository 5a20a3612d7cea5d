"""Constrained decoding with xgrammar: JSON answers (`response_format`) and forced tool calls.

`constraint_factory(tokenizer, response_format, tools, tool_choice)` compiles one grammar per
request and returns `factory(choice_index) -> GrammarConstraint` (the protocol of
engine/llm/constraints.py), or None when nothing is constrained.

- `json_object`: any JSON object. `json_schema`: an object matching the schema (xgrammar's strict
  mode: no properties beyond the schema's, which is also what OpenAI's strict schemas mean).
  Whitespace between elements is bounded, so a model cannot pad forever, and the answer ends as
  soon as the value is complete (no stop token needed).
- `tool_choice: "required"` or a named function: exactly one
  `<tool_call>{"name": ..., "arguments": {...}}</tool_call>` whose arguments match that tool's
  parameter schema; engine/llm/tools.py then parses it like any generated call.
"""

from __future__ import annotations

import json
import threading
import weakref
from typing import Callable

import torch
import xgrammar as xgr

from engine.errors import InvalidInput
from engine.llm.tools import HERMES_CLOSE, HERMES_OPEN

MAX_WHITESPACE = 20  # per gap between JSON elements: enough for indented output, not for padding
_BIT_SHIFTS = torch.arange(32, dtype=torch.int32)

_compilers: "weakref.WeakKeyDictionary[object, xgr.GrammarCompiler]" = weakref.WeakKeyDictionary()
_compilers_lock = threading.Lock()


def compiler_for(tokenizer) -> xgr.GrammarCompiler:
    """One compiler per tokenizer: building the token table is the slow part, and the compiler
    caches grammars it has compiled."""
    with _compilers_lock:
        compiler = _compilers.get(tokenizer)
        if compiler is None:
            compiler = xgr.GrammarCompiler(xgr.TokenizerInfo.from_huggingface(tokenizer))
            _compilers[tokenizer] = compiler
        return compiler


class GrammarConstraint:
    """One choice's position in a compiled grammar."""

    def __init__(self, compiled: xgr.CompiledGrammar):
        self.matcher = xgr.GrammarMatcher(compiled, terminate_without_stop_token=True)
        self.grammar_vocab = compiled.tokenizer_info.vocab_size
        self.bitmask = xgr.allocate_token_bitmask(1, self.grammar_vocab)

    def allowed_token_mask(self, vocab_size: int) -> torch.Tensor | None:
        if self.matcher.is_terminated():
            return None
        self.matcher.fill_next_token_bitmask(self.bitmask)
        allowed = ((self.bitmask[0, :, None] >> _BIT_SHIFTS) & 1).flatten().bool()
        # The model's lm_head may be padded past the tokenizer: those ids are never allowed.
        mask = torch.zeros(vocab_size, dtype=torch.bool)
        n = min(vocab_size, self.grammar_vocab)
        mask[:n] = allowed[:n]
        return mask

    def fill_bitmask(self, bitmask: torch.Tensor, row: int) -> bool:
        """Write this step's allowed tokens into `row` of a batch bitmask (xgrammar's packed int32
        layout, `grammar_vocab` wide), so the sampler masks every constrained row in one call.
        False when nothing is restricted (the grammar has terminated)."""
        if self.matcher.is_terminated():
            return False
        self.matcher.fill_next_token_bitmask(bitmask, row)
        return True

    def accept(self, token_id: int) -> None:
        if not self.matcher.accept_token(token_id):
            raise ValueError(f"token {token_id} does not fit the output grammar")

    def is_done(self) -> bool:
        return self.matcher.is_terminated()


def _chosen_tools(tools: list[dict], tool_choice) -> list[dict]:
    if isinstance(tool_choice, dict):
        wanted = (tool_choice.get("function") or {}).get("name")
        chosen = [t for t in tools if (t.get("function") or {}).get("name") == wanted]
        if not chosen:
            raise InvalidInput(f"tool_choice names '{wanted}', which is not among the tools", param="tool_choice")
        return chosen
    return tools


def tool_call_schema(tools: list[dict]) -> dict:
    """JSON schema of one call `{"name": ..., "arguments": {...}}` to any of `tools`."""
    variants = []
    for tool in tools:
        function = tool.get("function") or {}
        variants.append({
            "type": "object",
            "properties": {"name": {"const": function.get("name")},
                           "arguments": function.get("parameters") or {"type": "object", "properties": {}}},
            "required": ["name", "arguments"],
        })
    return variants[0] if len(variants) == 1 else {"anyOf": variants}


def _schema_grammar(schema: dict, param: str, **options) -> xgr.Grammar:
    try:
        return xgr.Grammar.from_json_schema(json.dumps(schema), **options)
    except (RuntimeError, ValueError, TypeError) as exc:
        reason = str(exc).strip().rsplit(": ", 1)[-1]  # drop the C++ source location xgrammar prefixes
        raise InvalidInput(f"unsupported JSON schema: {reason}", param=param) from exc


def output_grammar(response_format: dict | None, tools: list[dict] | None, tool_choice) -> xgr.Grammar | None:
    """The grammar the output must follow, or None when it is free."""
    if tools and (tool_choice == "required" or isinstance(tool_choice, dict)):
        body = _schema_grammar(tool_call_schema(_chosen_tools(tools, tool_choice)), "tools",
                               any_whitespace=False)
        return xgr.Grammar.concat(xgr.Grammar.from_ebnf(f"root ::= {json.dumps(HERMES_OPEN)}"), body,
                                  xgr.Grammar.from_ebnf(f"root ::= {json.dumps(HERMES_CLOSE)}"))
    kind = (response_format or {}).get("type", "text")
    if kind == "text":
        return None
    if kind == "json_object":
        return _schema_grammar({"type": "object"}, "response_format", strict_mode=False,
                               max_whitespace_cnt=MAX_WHITESPACE)
    if kind == "json_schema":
        spec = response_format.get("json_schema") or {}
        schema = spec.get("schema", response_format.get("schema"))
        if not isinstance(schema, dict):
            raise InvalidInput("response_format.json_schema.schema must be a JSON schema object",
                               param="response_format")
        return _schema_grammar(schema, "response_format", max_whitespace_cnt=MAX_WHITESPACE)
    raise InvalidInput(f"response_format type '{kind}' is not one of text, json_object, json_schema",
                       param="response_format")


def constraint_factory(tokenizer, response_format: dict | None, tools: list[dict] | None,
                       tool_choice) -> Callable[[int], GrammarConstraint] | None:
    grammar = output_grammar(response_format, tools, tool_choice)
    if grammar is None:
        return None
    compiled = compiler_for(tokenizer).compile_grammar(grammar)
    return lambda index: GrammarConstraint(compiled)
