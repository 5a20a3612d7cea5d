"""Responses API items: the request's `input` normalised to stored items, and items turned into
the chat messages a TextTask runs on.

Items are the Responses API's unit of conversation: `message` (role + content parts),
`function_call` (the model asked for a tool) and `function_call_output` (the caller's tool
result). Stored items carry ids and `status` as OpenAI's `input_items` listing shows them.
Only text is supported; image, file and audio parts are refused by name.
"""

from __future__ import annotations

import secrets
from typing import Any

from engine.errors import InvalidInput

ROLES = ("user", "assistant", "system", "developer")
TEXT_PARTS = ("input_text", "output_text", "text", "refusal")
SKIPPED_ITEMS = ("reasoning",)  # a reasoning model's own notes; this engine makes none, so nothing to replay


def item_id(prefix: str) -> str:
    return f"{prefix}_{secrets.token_hex(16)}"


def _text_of_part(part: Any, where: str) -> str:
    if not isinstance(part, dict) or not isinstance(part.get("type"), str):
        raise InvalidInput(f"{where} must be an object with a type", param=where)
    if part["type"] not in TEXT_PARTS:
        raise InvalidInput(f"{where}: content parts of type '{part['type']}' are not supported: this model "
                           "takes text only", param=where)
    text = part.get("refusal") if part["type"] == "refusal" else part.get("text")
    if not isinstance(text, str):
        raise InvalidInput(f"{where}.text must be a string", param=f"{where}.text")
    return text


def _message(item: dict, where: str) -> dict:
    role = item.get("role")
    if role not in ROLES:
        raise InvalidInput(f"{where}.role must be one of {list(ROLES)}", param=f"{where}.role")
    content = item.get("content")
    part_type = "output_text" if role == "assistant" else "input_text"
    if isinstance(content, str):
        parts = [{"type": part_type, "text": content}]
    elif isinstance(content, list):
        parts = [{"type": part_type, "text": _text_of_part(p, f"{where}.content[{i}]")}
                 for i, p in enumerate(content)]
    else:
        raise InvalidInput(f"{where}.content must be a string or a list of content parts",
                           param=f"{where}.content")
    if role == "assistant":
        for part in parts:
            part["annotations"] = []
    return {"id": item.get("id") or item_id("msg"), "type": "message", "role": role, "content": parts,
            "status": "completed"}


def _string_field(item: dict, key: str, where: str) -> str:
    value = item.get(key)
    if not isinstance(value, str) or not value:
        raise InvalidInput(f"{where}.{key} must be a non-empty string", param=f"{where}.{key}")
    return value


def _function_call(item: dict, where: str) -> dict:
    arguments = item.get("arguments", "{}")
    if not isinstance(arguments, str):
        raise InvalidInput(f"{where}.arguments must be a JSON string", param=f"{where}.arguments")
    return {"id": item.get("id") or item_id("fc"), "type": "function_call",
            "call_id": _string_field(item, "call_id", where), "name": _string_field(item, "name", where),
            "arguments": arguments, "status": "completed"}


def _function_call_output(item: dict, where: str) -> dict:
    output = item.get("output")
    if isinstance(output, list):
        output = "".join(_text_of_part(p, f"{where}.output[{i}]") for i, p in enumerate(output))
    if not isinstance(output, str):
        raise InvalidInput(f"{where}.output must be a string or a list of text parts", param=f"{where}.output")
    return {"id": item.get("id") or item_id("fco"), "type": "function_call_output",
            "call_id": _string_field(item, "call_id", where), "output": output, "status": "completed"}


def input_items(value: str | list) -> list[dict]:
    """The request's `input` as stored items (a string is one user message)."""
    if isinstance(value, str):
        return [_message({"role": "user", "content": value}, "input")]
    items = []
    for index, item in enumerate(value):
        where = f"input[{index}]"
        if not isinstance(item, dict):
            raise InvalidInput(f"{where} must be an object", param=where)
        kind = item.get("type", "message")
        if kind == "message":
            items.append(_message(item, where))
        elif kind == "function_call":
            items.append(_function_call(item, where))
        elif kind == "function_call_output":
            items.append(_function_call_output(item, where))
        elif kind not in SKIPPED_ITEMS:
            raise InvalidInput(f"{where}: items of type '{kind}' are not supported; use message, "
                               "function_call or function_call_output", param=f"{where}.type")
    if not items:
        raise InvalidInput("input must hold at least one message or function_call_output", param="input")
    return items


def chat_messages(items: list[dict]) -> list[dict]:
    """Chat messages for stored items: function calls join the assistant turn they belong to,
    function outputs become `tool` messages."""
    messages: list[dict] = []
    for item in items:
        if item["type"] == "message":
            role = "system" if item["role"] == "developer" else item["role"]
            text = "".join(p.get("text", "") for p in item["content"])
            messages.append({"role": role, "content": text})
        elif item["type"] == "function_call":
            call = {"id": item["call_id"], "type": "function",
                    "function": {"name": item["name"], "arguments": item["arguments"]}}
            last = messages[-1] if messages else None
            if last is not None and last["role"] == "assistant":
                last.setdefault("tool_calls", []).append(call)
            else:
                messages.append({"role": "assistant", "content": "", "tool_calls": [call]})
        elif item["type"] == "function_call_output":
            messages.append({"role": "tool", "tool_call_id": item["call_id"], "content": item["output"]})
    return messages

