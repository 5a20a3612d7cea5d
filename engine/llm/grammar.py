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
  parameter schema; the server's tool-call parser then reads it like any generated call.
  Each tool's `$defs` (and `definitions`) move to the root of the call schema, renamed per tool,
  and its local `$ref`s are rewritten to match, so refs resolve against the parameters schema's
  own root however the parameters are nested in the call.
- Every grammar also refuses tokens that contain raw control characters (bytes below 0x20 other
  than newline and carriage return). xgrammar's string rules for `maxLength`/`pattern` schemas let
  them through, and a raw control character inside a string is not JSON (RFC 8259): strict
  parsers (`json.loads(strict=True)`, `JSON.parse`) reject it. Newlines stay allowed because JSON
  whitespace needs them; the grammar already keeps them out of strings.
"""

from __future__ import annotations

import json
import threading
import weakref

import torch
import xgrammar as xgr

from engine.errors import InvalidInput
from engine.tool_choice import chosen_tools

TOOL_CALL_OPEN, TOOL_CALL_CLOSE = "<tool_call>", "</tool_call>"  # the Hermes format forced calls use
MAX_WHITESPACE = 20  # per gap between JSON elements: enough for indented output, not for padding
_BIT_SHIFTS = torch.arange(32, dtype=torch.int32)

_compilers: "weakref.WeakKeyDictionary[object, xgr.GrammarCompiler]" = weakref.WeakKeyDictionary()
_compilers_lock = threading.Lock()
_json_safe: "weakref.WeakKeyDictionary[object, torch.Tensor]" = weakref.WeakKeyDictionary()
ALLOWED_CONTROL_BYTES = frozenset(b"\n\r")


def compiler_for(tokenizer) -> xgr.GrammarCompiler:
    """One compiler per tokenizer: building the token table is the slow part, and the compiler
    caches grammars it has compiled."""
    with _compilers_lock:
        compiler = _compilers.get(tokenizer)
        if compiler is None:
            compiler = xgr.GrammarCompiler(xgr.TokenizerInfo.from_huggingface(tokenizer))
            _compilers[tokenizer] = compiler
        return compiler


def json_safe_tokens(tokenizer, compiled: xgr.CompiledGrammar) -> torch.Tensor:
    """Per token id: True unless its bytes hold a control character JSON output must not contain."""
    with _compilers_lock:
        safe = _json_safe.get(tokenizer)
        if safe is None:
            safe = torch.tensor([not any(b < 0x20 and b not in ALLOWED_CONTROL_BYTES for b in token)
                                 for token in compiled.tokenizer_info.decoded_vocab], dtype=torch.bool)
            _json_safe[tokenizer] = safe
        return safe


def _packed(mask: torch.Tensor, num_words: int) -> torch.Tensor:
    """A bool mask over token ids in xgrammar's packed layout: int32 words, bit i of word w is token
    32 * w + i (tokens past the mask are refused)."""
    bits = torch.zeros(num_words * 32, dtype=torch.int64)
    n = min(len(mask), len(bits))
    bits[:n] = mask[:n].long()
    words = (bits.view(num_words, 32) << _BIT_SHIFTS.long()).sum(dim=1)
    return torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)


class GrammarConstraint:
    """One choice's position in a compiled grammar."""

    def __init__(self, compiled: xgr.CompiledGrammar, safe_tokens: torch.Tensor | None = None):
        self.matcher = xgr.GrammarMatcher(compiled, terminate_without_stop_token=True)
        self.grammar_vocab = compiled.tokenizer_info.vocab_size
        self.bitmask = xgr.allocate_token_bitmask(1, self.grammar_vocab)
        self.safe_tokens = safe_tokens
        self.safe_words = None if safe_tokens is None else _packed(safe_tokens, self.bitmask.shape[1])

    def allowed_token_mask(self, vocab_size: int) -> torch.Tensor | None:
        if self.matcher.is_terminated():
            return None
        self.matcher.fill_next_token_bitmask(self.bitmask)
        allowed = ((self.bitmask[0, :, None] >> _BIT_SHIFTS) & 1).flatten().bool()
        # The model's lm_head may be padded past the tokenizer: those ids are never allowed.
        mask = torch.zeros(vocab_size, dtype=torch.bool)
        n = min(vocab_size, self.grammar_vocab)
        mask[:n] = allowed[:n]
        if self.safe_tokens is not None:
            mask[:n] &= self.safe_tokens[:n]
        return mask

    def fill_bitmask(self, bitmask: torch.Tensor, row: int) -> bool:
        """Write this step's allowed tokens into `row` of a batch bitmask (xgrammar's packed int32
        layout, `grammar_vocab` wide), so the sampler masks every constrained row in one call.
        False when nothing is restricted (the grammar has terminated)."""
        if self.matcher.is_terminated():
            return False
        self.matcher.fill_next_token_bitmask(bitmask, row)
        if self.safe_words is not None:
            bitmask[row] &= self.safe_words
        return True

    def accept(self, token_id: int) -> None:
        if not self.matcher.accept_token(token_id):
            raise ValueError(f"token {token_id} does not fit the output grammar")

    def is_done(self) -> bool:
        return self.matcher.is_terminated()


def _pointer_token(text: str, decode: bool) -> str:
    """JSON-pointer escaping of one reference token (RFC 6901)."""
    if decode:
        return text.replace("~1", "/").replace("~0", "~")
    return text.replace("~", "~0").replace("/", "~1")


def _rebased_ref(ref: str, tag: str) -> tuple[str, bool]:
    """`ref` of a tool's parameters schema, pointing into the call schema's root `$defs`.
    Returns (new ref, whether it points at the parameters schema itself rather than a def)."""
    pointer = ref[1:]
    for section in ("/$defs/", "/definitions/"):
        if pointer.startswith(section):
            name, slash, rest = pointer[len(section):].partition("/")
            renamed = _pointer_token(f"{tag}.{_pointer_token(name, decode=True)}", decode=False)
            return f"#/$defs/{renamed}{slash}{rest}", False
    return f"#/$defs/{tag}{pointer}", True


def _rebased(node, tag: str, into_root: list[bool]):
    if isinstance(node, list):
        return [_rebased(item, tag, into_root) for item in node]
    if not isinstance(node, dict):
        return node
    out = {}
    for key, value in node.items():
        if key == "$ref" and isinstance(value, str) and value.startswith("#"):
            out[key], points_at_root = _rebased_ref(value, tag)
            into_root[0] = into_root[0] or points_at_root
        else:
            out[key] = _rebased(value, tag, into_root)
    return out


def _hoisted_parameters(parameters: dict, tag: str, defs: dict) -> dict:
    """The parameters schema with its `$defs`/`definitions` moved into `defs` under `tag`."""
    own = {k: v for k, v in parameters.items() if k not in ("$defs", "definitions", "$schema", "$id")}
    into_root = [False]
    for section in ("definitions", "$defs"):
        for name, schema in (parameters.get(section) or {}).items():
            defs[f"{tag}.{name}"] = _rebased(schema, tag, into_root)
    rebased = _rebased(own, tag, into_root)
    if into_root[0]:
        defs[tag] = rebased
    return rebased


def tool_call_schema(tools: list[dict]) -> dict:
    """JSON schema of one call `{"name": ..., "arguments": {...}}` to any of `tools`."""
    variants, defs = [], {}
    for index, tool in enumerate(tools):
        function = tool.get("function") or {}
        parameters = function.get("parameters") or {"type": "object", "properties": {}}
        variants.append({
            "type": "object",
            "properties": {"name": {"const": function.get("name")},
                           "arguments": _hoisted_parameters(parameters, f"tool{index}", defs)},
            "required": ["name", "arguments"],
        })
    schema = variants[0] if len(variants) == 1 else {"anyOf": variants}
    return {**schema, "$defs": defs} if defs else schema


def _schema_grammar(schema: dict, param: str, **options) -> xgr.Grammar:
    try:
        return xgr.Grammar.from_json_schema(json.dumps(schema), **options)
    except (RuntimeError, ValueError, TypeError) as exc:
        reason = str(exc).strip().rsplit(": ", 1)[-1]  # drop the C++ source location xgrammar prefixes
        raise InvalidInput(f"unsupported JSON schema: {reason}", param=param) from exc


def output_grammar(response_format: dict | None, tools: list[dict] | None, tool_choice) -> xgr.Grammar | None:
    """The grammar the output must follow, or None when it is free."""
    if tools and (tool_choice == "required" or isinstance(tool_choice, dict)):
        body = _schema_grammar(tool_call_schema(chosen_tools(tools, tool_choice)), "tools",
                               any_whitespace=False)
        return xgr.Grammar.concat(xgr.Grammar.from_ebnf(f"root ::= {json.dumps(TOOL_CALL_OPEN)}"), body,
                                  xgr.Grammar.from_ebnf(f"root ::= {json.dumps(TOOL_CALL_CLOSE)}"))
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


class GrammarFactory:
    """`factory(choice_index) -> GrammarConstraint` for one grammar, compiled once on first use.

    `spec` (the grammar serialized by xgrammar) is what crosses to the engine process: compiled
    grammars and matchers cannot be pickled, so that process builds its own factory from the spec
    with its own tokenizer, and compiles there."""

    def __init__(self, tokenizer, spec: str):
        self.tokenizer = tokenizer
        self.spec = spec
        self._compiled: tuple[xgr.CompiledGrammar, torch.Tensor] | None = None
        self._lock = threading.Lock()

    def compiled(self) -> tuple[xgr.CompiledGrammar, torch.Tensor]:
        with self._lock:
            if self._compiled is None:
                compiled = compiler_for(self.tokenizer).compile_grammar(xgr.Grammar.deserialize_json(self.spec))
                self._compiled = compiled, json_safe_tokens(self.tokenizer, compiled)
            return self._compiled

    def __call__(self, index: int) -> GrammarConstraint:
        return GrammarConstraint(*self.compiled())


def constraint_factory(tokenizer, response_format: dict | None, tools: list[dict] | None,
                       tool_choice) -> GrammarFactory | None:
    grammar = output_grammar(response_format, tools, tool_choice)
    if grammar is None:
        return None
    return GrammarFactory(tokenizer, grammar.serialize_json())
