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
"""

from __future__ import annotations

import json
import re
import secrets
import string

HERMES_OPEN, HERMES_CLOSE = "<tool_call>", "</tool_call>"
MISTRAL = "[TOOL_CALLS]"
PYTHON_TAG = "<|python_tag|>"
MARKERS = (HERMES_OPEN, MISTRAL)

_HERMES_HEAD = re.compile(r'\s*\{\s*"name"\s*:\s*"((?:[^"\\]|\\.)*)"\s*,\s*"(?:arguments|parameters)"\s*:\s*')
_MISTRAL_NAMED = re.compile(r'\s*([\w.\-]+)\s*(?:\[CALL_ID\]\s*([\w\-]+)\s*)?\[ARGS\]\s*')
_MISTRAL_NAMED_SO_FAR = re.compile(r'\s*[\w.\-]*(\[[A-Z_]*\]?\s*[\w\-]*)*')  # may still become the above
_ID_ALPHABET = string.ascii_letters + string.digits


def new_call_id() -> str:
    return "call_" + "".join(secrets.choice(_ID_ALPHABET) for _ in range(24))


def json_value_end(text: str, start: int) -> int | None:
    """End index (exclusive) of the JSON object or array starting at `text[start]`, or None
    while it is still open."""
    depth, in_string, escaped = 0, False, False
    for i in range(start, len(text)):
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
                return i + 1
    return None


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


class ToolCallStream:
    """Feed model text as it arrives; get back (content, tool_call deltas) safe to emit.

    Deltas are OpenAI streaming tool-call deltas: the first for a call carries index, id, type
    and the function name (arguments ""), the following ones argument pieces. `calls` holds the
    complete calls in OpenAI's message shape; their arguments are exactly the streamed pieces.
    """

    def __init__(self, tool_names: list[str]):
        self.tool_names = {n for n in tool_names if n}
        self.calls: list[dict] = []
        self._buffer = ""
        self._mode = "start"  # start | text | hermes | mistral | json
        self._pending_space = ""  # trailing whitespace of the content, kept until text follows
        self._args_start: int | None = None  # hermes: where the streamed arguments begin
        self._args_sent = 0

    def feed(self, text: str) -> tuple[str, list[dict]]:
        self._buffer += text
        return self._drain(final=False)

    def finish(self) -> tuple[str, list[dict]]:
        content, deltas = self._drain(final=True)
        if not self.calls:
            content += self._pending_space
        self._buffer, self._pending_space = "", ""
        return content, deltas

    # ------------------------------------------------------------------ content

    def _content(self, text: str, final: bool = False) -> str:
        """Content to emit now; trailing whitespace waits (it is dropped before a call)."""
        text = self._pending_space + text
        body = text.rstrip()
        self._pending_space = text[len(body):]
        if final and not self.calls:
            body, self._pending_space = text, ""
        return body

    def _marker_text(self) -> str:
        return MISTRAL if self._mode == "mistral" else ""

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
            self._args_start, self._args_sent = None, 0
            self._pending_space = ""
            return before, []
        keep = 0 if final else _partial_marker_len(self._buffer, MARKERS)
        out, self._buffer = self._buffer[:len(self._buffer) - keep], self._buffer[len(self._buffer) - keep:]
        if not out:
            return None
        return self._content(out, final=final), []

    # ------------------------------------------------------------------ hermes

    def _step_hermes(self, final: bool):
        close = self._buffer.find(HERMES_CLOSE)
        if close >= 0 or final:
            inner = self._buffer[:close] if close >= 0 else self._buffer
            self._buffer = self._buffer[close + len(HERMES_CLOSE):] if close >= 0 else ""
            self._mode = "text"
            return self._end_hermes(inner, HERMES_CLOSE if close >= 0 else None)
        deltas = self._stream_hermes(self._buffer)
        return ("", deltas) if deltas else None

    def _stream_hermes(self, inner: str) -> list[dict]:
        """Deltas for a call still being generated: the name once it is known, then the
        arguments object as far as it has come."""
        deltas = []
        if self._args_start is None:
            head = _HERMES_HEAD.match(inner)
            if head is None or head.end() >= len(inner) or inner[head.end()] != "{":
                return []
            try:
                name = json.loads(f'"{head.group(1)}"')
            except json.JSONDecodeError:
                return []
            self._args_start = head.end()
            deltas.append(self._open_call(name, None))
        end = json_value_end(inner, self._args_start)
        upto = end if end is not None else len(inner)
        piece = inner[self._args_start + self._args_sent:upto]
        if piece:
            self._args_sent += len(piece)
            deltas.append(self._add_arguments(piece))
        return deltas

    def _end_hermes(self, inner: str, close: str | None) -> tuple[str, list[dict]]:
        if self._args_start is not None:
            deltas = self._stream_hermes(inner)
            self._args_start = None
            return "", deltas
        try:
            call = call_from_object(json.loads(inner))
        except json.JSONDecodeError:
            call = None
        if call is None:
            return self._content(HERMES_OPEN + inner + (close or ""), final=close is None), []
        return "", self._whole_call(*call)

    # ------------------------------------------------------------------ mistral

    def _step_mistral(self, final: bool):
        text = self._buffer
        stripped = text.lstrip()
        if not stripped:
            return None
        offset = len(text) - len(stripped)
        if stripped[0] == "[":
            end = json_value_end(text, offset)
            if end is None:
                return self._give_back(final) if final else None
            try:
                items = json.loads(text[offset:end])
            except json.JSONDecodeError:
                items = None
            calls = [call_from_object(o) for o in items] if isinstance(items, list) else [None]
            if not calls or None in calls:
                return self._give_back(final)
            self._buffer, self._mode = text[end:], "text"
            return "", [d for call in calls for d in self._whole_call(*call)]
        named = _MISTRAL_NAMED.match(text)
        if named is None:
            return None if not final and _MISTRAL_NAMED_SO_FAR.fullmatch(text) else self._give_back(final)
        if named.end() >= len(text):
            return self._give_back(final) if final else None
        end = json_value_end(text, named.end()) if text[named.end()] in "{[" else None
        if end is None:
            return None if (text[named.end()] in "{[" and not final) else self._give_back(final)
        try:
            args = json.loads(text[named.end():end])
        except json.JSONDecodeError:
            return self._give_back(final)
        self._buffer, self._mode = text[end:], "text"
        return "", self._whole_call(named.group(1), _arguments_text(args), named.group(2))

    def _give_back(self, final: bool):
        """Not a call after all: the marker and what followed are content."""
        text = self._marker_text() + self._buffer
        self._buffer, self._mode = "", "text"
        return self._content(text, final=final), []

    # ------------------------------------------------------------------ whole-output JSON

    def _step_json(self, final: bool):
        text = self._buffer
        stripped = text.lstrip(" \t\r\n;")
        if not stripped:
            return None
        offset = len(text) - len(stripped)
        if stripped[0] not in "{[":
            if not self.calls:
                return self._give_back(final)
            self._buffer, self._mode = stripped, "text"
            return "", []
        end = json_value_end(text, offset)
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
        self._buffer = text[end:]
        return "", [d for call in calls for d in self._whole_call(*call)]

    # ------------------------------------------------------------------ deltas

    def _open_call(self, name: str, call_id: str | None) -> dict:
        call = {"id": call_id or new_call_id(), "type": "function", "function": {"name": name, "arguments": ""}}
        self.calls.append(call)
        return {"index": len(self.calls) - 1, "id": call["id"], "type": "function",
                "function": {"name": name, "arguments": ""}}

    def _add_arguments(self, piece: str) -> dict:
        self.calls[-1]["function"]["arguments"] += piece
        return {"index": len(self.calls) - 1, "function": {"arguments": piece}}

    def _whole_call(self, name: str, arguments: str, call_id: str | None = None) -> list[dict]:
        delta = self._open_call(name, call_id)
        delta["function"]["arguments"] = self.calls[-1]["function"]["arguments"] = arguments
        return [delta]
