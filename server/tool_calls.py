"""Tool calls parsed out of model text, incrementally, in the formats models actually emit.

- Hermes / Qwen: `<tool_call>{"name": ..., "arguments": {...}}</tool_call>`, one block per call,
  possibly after some text. The arguments are streamed in pieces as they are generated.
- Mistral: `[TOOL_CALLS] [{"name": ..., "arguments": {...}}, ...]` and the newer
  `[TOOL_CALLS]name[ARGS]{...}`.
- Llama 3 JSON (and Mistral's array once its special marker is stripped by detokenization): the
  whole output is `{"name": ..., "parameters"|"arguments": ...}` (or a list of them, or several
  separated by `;`), optionally after `<|python_tag|>`. Only names of offered tools count, so
  ordinary JSON answers stay content.

Text that might be the start of a marker is held back, so raw markup never reaches the content,
streamed or not. A `<tool_call>` block whose JSON cannot be read is not a call; it is given back
as content verbatim rather than dropped.

The parser runs on the event loop for every streamed token, so each character is read a bounded
number of times however the text is split: JSON values are scanned by `JsonScan`, which resumes
where it stopped, and marker searches resume where the previous one ended. `scanned` counts the
characters the JSON scanners have read (linear in the output; the tests check it).
"""

from __future__ import annotations

import json
import re
import secrets
import string
from dataclasses import dataclass, field

from engine.tool_choice import chosen_tools

HERMES_OPEN, HERMES_CLOSE = "<tool_call>", "</tool_call>"
MISTRAL = "[TOOL_CALLS]"
PYTHON_TAG = "<|python_tag|>"
MARKERS = (HERMES_OPEN, MISTRAL)
HEAD_LIMIT = 256  # a call's `{"name": ..., "arguments": ` head longer than this is parsed whole at its end

_HERMES_HEAD = re.compile(r'\s*\{\s*"name"\s*:\s*"((?:[^"\\]|\\.)*)"\s*,\s*"(?:arguments|parameters)"\s*:\s*')
_MISTRAL_NAMED = re.compile(r'\s*([\w.\-]+)\s*(?:\[CALL_ID\]\s*([\w\-]+)\s*)?\[ARGS\]\s*')
_MISTRAL_NAMED_SO_FAR = re.compile(r'\s*[\w.\-]*(\[[A-Z_]*\]?\s*[\w\-]*)*')  # may still become the above
_ID_ALPHABET = string.ascii_letters + string.digits


def new_call_id() -> str:
    return "call_" + "".join(secrets.choice(_ID_ALPHABET) for _ in range(24))


@dataclass
class JsonScan:
    """Finds where the JSON object or array starting at `text[start]` ends. The text may only
    grow between calls; each call reads only the characters added since the last one."""

    start: int
    position: int = -1
    depth: int = 0
    in_string: bool = False
    escaped: bool = False
    end: int | None = None
    scanned: int = 0

    def advance(self, text: str) -> int | None:
        """End index (exclusive) of the value, or None while it is still open."""
        if self.end is not None:
            return self.end
        begin = max(self.position, self.start)
        depth, in_string, escaped = self.depth, self.in_string, self.escaped
        for i in range(begin, len(text)):
            ch = text[i]
            if in_string:
                if escaped:
                    escaped = False
                elif ch == "\\":
                    escaped = True
                elif ch == '"':
                    in_string = False
            elif ch == '"':
                in_string = True
            elif ch in "{[":
                depth += 1
            elif ch in "}]":
                depth -= 1
                if depth == 0:
                    self.end = i + 1
                    break
        stop = self.end if self.end is not None else len(text)
        self.scanned += max(0, stop - begin)
        self.position = stop
        self.depth, self.in_string, self.escaped = depth, in_string, escaped
        return self.end


def json_value_end(text: str, start: int) -> int | None:
    """End index (exclusive) of the JSON object or array starting at `text[start]`, or None
    while it is still open."""
    return JsonScan(start).advance(text)


def _partial_marker_len(text: str, markers: tuple[str, ...]) -> int:
    """Length of the longest tail of `text` that is a proper prefix of a marker."""
    longest = max(len(m) for m in markers)
    for n in range(min(longest - 1, len(text)), 0, -1):
        if any(m.startswith(text[-n:]) for m in markers):
            return n
    return 0


def _arguments_text(value) -> str:
    return value if isinstance(value, str) else json.dumps(value, ensure_ascii=False)


def call_from_object(obj, tool_names: set[str] | None = None) -> tuple[str, str, str | None] | None:
    """(name, arguments json, id) for a call object; None if it is not one (or, with
    `tool_names`, names no offered tool)."""
    if not isinstance(obj, dict):
        return None
    if isinstance(obj.get("function"), dict):
        inner = obj["function"]
        obj = {"name": inner.get("name"), "arguments": inner.get("arguments"), "id": obj.get("id")}
    name = obj.get("name")
    args = obj["arguments"] if "arguments" in obj else obj.get("parameters", {})
    if not isinstance(name, str) or not name or args is None:
        return None
    if tool_names is not None and name not in tool_names:
        return None
    call_id = obj.get("id") if isinstance(obj.get("id"), str) else None
    return name, _arguments_text(args), call_id


def merge_deltas(deltas: list[dict]) -> list[dict]:
    """At most one delta per call index, in order: clients (openai-python's stream helper among
    them) assemble calls by index, and two entries with one index in a chunk become two calls."""
    merged: dict[int, dict] = {}
    for delta in deltas:
        into = merged.get(delta["index"])
        if into is None:
            merged[delta["index"]] = {**delta, "function": dict(delta.get("function") or {})}
            continue
        for key in ("id", "type"):
            if key in delta:
                into[key] = delta[key]
        function = delta.get("function") or {}
        if "name" in function:
            into["function"]["name"] = function["name"]
        if function.get("arguments"):
            into["function"]["arguments"] = into["function"].get("arguments", "") + function["arguments"]
    return list(merged.values())


@dataclass
class _Call:
    id: str
    name: str
    argument_pieces: list[str] = field(default_factory=list)

    def message(self) -> dict:
        return {"id": self.id, "type": "function",
                "function": {"name": self.name, "arguments": "".join(self.argument_pieces)}}


class ToolCallStream:
    """Feed model text as it arrives; get back (content, tool_call deltas) safe to emit.

    Deltas are OpenAI streaming tool-call deltas: the first for a call carries index, id, type
    and the function name (arguments ""), the following ones argument pieces (`merge_deltas`
    folds the deltas of one feed into one per call). `calls` holds the complete calls in
    OpenAI's message shape; their arguments are exactly the streamed pieces.
    """

    def __init__(self, tool_names: list[str]):
        self.tool_names = {n for n in tool_names if n}
        self._calls: list[_Call] = []
        self._buffer = ""
        self._mode = "start"  # start | text | hermes | mistral | json
        self._pending_space = ""  # trailing whitespace of the content, kept until text follows
        self._scan: JsonScan | None = None  # the JSON value being read in mistral/json mode
        self._named: re.Match | None = None  # mistral: a `name[ARGS]` head already read
        self._close_from = 0  # hermes: where to resume looking for the closing tag
        self._args: JsonScan | None = None  # hermes: the streamed arguments object
        self._args_sent = 0
        self._streaming = True  # hermes: False once the call can only be parsed whole
        self._scanned_done = 0

    @property
    def calls(self) -> list[dict]:
        return [call.message() for call in self._calls]

    @property
    def scanned(self) -> int:
        """Characters the JSON scanners have read so far."""
        live = sum(s.scanned for s in (self._scan, self._args) if s is not None)
        return self._scanned_done + live

    def feed(self, text: str) -> tuple[str, list[dict]]:
        self._buffer += text
        return self._drain(final=False)

    def finish(self) -> tuple[str, list[dict]]:
        content, deltas = self._drain(final=True)
        if not self._calls:
            content += self._pending_space
        self._buffer, self._pending_space = "", ""
        return content, deltas

    # ------------------------------------------------------------------ content

    def _content(self, text: str, final: bool = False) -> str:
        """Content to emit now; trailing whitespace waits (it is dropped before a call)."""
        text = self._pending_space + text
        body = text.rstrip()
        self._pending_space = text[len(body):]
        if final and not self._calls:
            body, self._pending_space = text, ""
        return body

    def _marker_text(self) -> str:
        return MISTRAL if self._mode == "mistral" else ""

    def _retire(self, scan: JsonScan | None) -> None:
        if scan is not None:
            self._scanned_done += scan.scanned

    # ------------------------------------------------------------------ dispatch

    def _drain(self, final: bool) -> tuple[str, list[dict]]:
        content, deltas = "", []
        while True:
            step = getattr(self, f"_step_{self._mode}")(final)
            if step is None:
                return content, deltas
            piece, new_deltas = step
            content += piece
            deltas += new_deltas

    def _step_start(self, final: bool):
        stripped = self._buffer.lstrip()
        if not stripped:
            if final:
                self._mode = "text"
                return "", []
            return None
        if self.tool_names:
            if not final and any(m.startswith(stripped) for m in (*MARKERS, PYTHON_TAG)):
                return None
            if stripped.startswith(PYTHON_TAG):
                self._buffer, self._mode = stripped[len(PYTHON_TAG):], "json"
                return "", []
            if stripped[0] in "{[" and not stripped.startswith(MARKERS):
                self._buffer, self._mode = stripped, "json"
                return "", []
        self._mode = "text"
        return "", []

    def _step_text(self, final: bool):
        if not self._buffer:
            return None
        hits = [(i, m) for m in MARKERS if (i := self._buffer.find(m)) >= 0]
        if hits:
            index, marker = min(hits)
            before = self._content(self._buffer[:index])
            self._buffer = self._buffer[index + len(marker):]
            self._mode = "hermes" if marker == HERMES_OPEN else "mistral"
            self._close_from, self._args, self._args_sent, self._streaming = 0, None, 0, True
            self._scan, self._named = None, None
            self._pending_space = ""
            return before, []
        keep = 0 if final else _partial_marker_len(self._buffer, MARKERS)
        out, self._buffer = self._buffer[:len(self._buffer) - keep], self._buffer[len(self._buffer) - keep:]
        if not out:
            return None
        return self._content(out, final=final), []

    # ------------------------------------------------------------------ hermes

    def _step_hermes(self, final: bool):
        inner = self._buffer
        close = inner.find(HERMES_CLOSE, self._close_from)
        if close < 0:
            self._close_from = max(self._close_from, len(inner) - len(HERMES_CLOSE) + 1)
        if close >= 0 or final:
            block = inner[:close] if close >= 0 else inner
            self._buffer = inner[close + len(HERMES_CLOSE):] if close >= 0 else ""
            self._mode = "text"
            return self._end_hermes(block, HERMES_CLOSE if close >= 0 else None)
        deltas = self._stream_hermes(inner)
        return ("", deltas) if deltas else None

    def _stream_hermes(self, inner: str) -> list[dict]:
        """Deltas for a call still being generated: the name once it is known, then the
        arguments object as far as it has come."""
        deltas = []
        if self._args is None:
            if not self._streaming:
                return []
            head = _HERMES_HEAD.match(inner)
            if head is None or head.end() >= len(inner):
                if head is None and len(inner) > HEAD_LIMIT:
                    self._streaming = False
                return []
            if inner[head.end()] != "{":
                self._streaming = False  # e.g. string-encoded arguments: parsed whole at the end
                return []
            try:
                name = json.loads(f'"{head.group(1)}"')
            except json.JSONDecodeError:
                self._streaming = False
                return []
            self._args = JsonScan(head.end())
            deltas.append(self._open_call(name, None))
        end = self._args.advance(inner)
        upto = end if end is not None else len(inner)
        piece = inner[self._args.start + self._args_sent:upto]
        if piece:
            self._args_sent += len(piece)
            deltas.append(self._add_arguments(piece))
        return deltas

    def _end_hermes(self, inner: str, close: str | None) -> tuple[str, list[dict]]:
        if self._args is not None:
            deltas = self._stream_hermes(inner)
            self._retire(self._args)
            self._args = None
            return "", deltas
        try:
            call = call_from_object(json.loads(inner))
        except json.JSONDecodeError:
            call = None
        if call is None:
            return self._content(HERMES_OPEN + inner + (close or ""), final=close is None), []
        return "", self._whole_call(*call)

    # ------------------------------------------------------------------ mistral

    def _value_end(self, text: str, offset: int) -> int | None:
        if self._scan is None or self._scan.start != offset:
            self._retire(self._scan)
            self._scan = JsonScan(offset)
        return self._scan.advance(text)

    def _consumed(self, rest: str, mode: str) -> None:
        """The value read so far is done: continue with `rest` in `mode`."""
        self._retire(self._scan)
        self._scan, self._named = None, None
        self._buffer, self._mode = rest, mode

    def _step_mistral(self, final: bool):
        text = self._buffer
        stripped = text.lstrip()
        if not stripped:
            return None
        offset = len(text) - len(stripped)
        if stripped[0] == "[":
            end = self._value_end(text, offset)
            if end is None:
                return self._give_back(final) if final else None
            try:
                items = json.loads(text[offset:end])
            except json.JSONDecodeError:
                items = None
            calls = [call_from_object(o) for o in items] if isinstance(items, list) else [None]
            if not calls or None in calls:
                return self._give_back(final)
            self._consumed(text[end:], "text")
            return "", [d for call in calls for d in self._whole_call(*call)]
        named = self._named or _MISTRAL_NAMED.match(text)
        if named is None:
            return None if not final and _MISTRAL_NAMED_SO_FAR.fullmatch(text) else self._give_back(final)
        if named.end() >= len(text):
            return self._give_back(final) if final else None
        if text[named.end()] not in "{[":
            return self._give_back(final)
        self._named = named
        end = self._value_end(text, named.end())
        if end is None:
            return self._give_back(final) if final else None
        try:
            args = json.loads(text[named.end():end])
        except json.JSONDecodeError:
            return self._give_back(final)
        self._consumed(text[end:], "text")
        return "", self._whole_call(named.group(1), _arguments_text(args), named.group(2))

    def _give_back(self, final: bool):
        """Not a call after all: the marker and what followed are content."""
        text = self._marker_text() + self._buffer
        self._consumed("", "text")
        return self._content(text, final=final), []

    # ------------------------------------------------------------------ whole-output JSON

    def _step_json(self, final: bool):
        text = self._buffer
        stripped = text.lstrip(" \t\r\n;")
        if not stripped:
            return None
        offset = len(text) - len(stripped)
        if stripped[0] not in "{[":
            if not self._calls:
                return self._give_back(final)
            self._consumed(stripped, "text")
            return "", []
        end = self._value_end(text, offset)
        if end is None:
            return self._give_back(final) if final else None
        try:
            value = json.loads(text[offset:end])
        except json.JSONDecodeError:
            value = None
        items = value if isinstance(value, list) else [value]
        calls = [call_from_object(o, self.tool_names) for o in items]
        if not calls or None in calls:
            return self._give_back(final)
        self._consumed(text[end:], "json")
        return "", [d for call in calls for d in self._whole_call(*call)]

    # ------------------------------------------------------------------ deltas

    def _open_call(self, name: str, call_id: str | None) -> dict:
        call = _Call(id=call_id or new_call_id(), name=name)
        self._calls.append(call)
        return {"index": len(self._calls) - 1, "id": call.id, "type": "function",
                "function": {"name": name, "arguments": ""}}

    def _add_arguments(self, piece: str) -> dict:
        self._calls[-1].argument_pieces.append(piece)
        return {"index": len(self._calls) - 1, "function": {"arguments": piece}}

    def _whole_call(self, name: str, arguments: str, call_id: str | None = None) -> list[dict]:
        delta = self._open_call(name, call_id)
        self._calls[-1].argument_pieces.append(arguments)
        delta["function"]["arguments"] = arguments
        return [delta]


def split_tool_calls(text: str, tool_names: list[str]) -> tuple[str, list[dict]]:
    """A whole output's content and tool calls (OpenAI message shape)."""
    parser = ToolCallStream(tool_names)
    content, _ = parser.feed(text)
    tail, _ = parser.finish()
    return content + tail, parser.calls


def offered_tool_names(tools: list[dict] | None, tool_choice) -> list[str]:
    """Names of the tools a model may call under `tool_choice` (none: no calls are parsed)."""
    return [(t.get("function") or {}).get("name", "") for t in chosen_tools(tools, tool_choice)]
