"""A text job's events as Responses API output items and stream events.

`OutputBuilder` reads the job's events in order and keeps one output item open at a time: text
opens a `message` item, a tool-call delta with an id opens a `function_call` item, and whatever
comes next (or the end) closes the open one. Each step returns the stream events OpenAI sends
for it (`response.output_item.added`, `response.output_text.delta`, ...). Item ids derive from
the response id and the item's position, so replaying the same events (for the stored or
non-streamed answer) gives exactly the items that were streamed; a function call's `call_id`
derives from its item id for the same reason.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field

from engine.jobs import Event, Job
from server.tool_calls import ToolCallStream, offered_tool_names

JOB_STATUS = {"starting": "queued", "processing": "in_progress", "failed": "failed", "canceled": "cancelled"}
TERMINAL = ("completed", "incomplete", "failed", "cancelled")


def _text_part(text: str) -> dict:
    return {"type": "output_text", "text": text, "annotations": [], "logprobs": []}


@dataclass
class OutputBuilder:
    response_id: str
    tool_names: list[str] = field(default_factory=list)  # tools the model may call: their calls are read out
    items: list[dict] = field(default_factory=list)
    current: dict | None = None  # the item being generated

    def __post_init__(self) -> None:
        self.parser = ToolCallStream(self.tool_names) if self.tool_names else None

    def _read(self, event: Event) -> tuple[str, list[dict]]:
        """An output event's content text and tool-call deltas (chat-completions shape)."""
        text, deltas = event.data or "", []
        if self.parser is not None:
            text, deltas = self.parser.feed(text)
            if event.finish_reason:
                tail, more = self.parser.finish()
                text, deltas = text + tail, deltas + more
        return text, deltas

    def _new_id(self, prefix: str) -> str:
        return f"{prefix}_{self.response_id.removeprefix('resp_')}{len(self.items):04d}"

    def _open(self, item: dict) -> list[dict]:
        self.items.append(item)
        self.current = item
        return [{"type": "response.output_item.added", "output_index": len(self.items) - 1,
                 "item": copy.deepcopy(item)}]

    def _index(self) -> int:
        return len(self.items) - 1

    def _open_message(self) -> list[dict]:
        events = self._open({"id": self._new_id("msg"), "type": "message", "status": "in_progress",
                             "role": "assistant", "content": []})
        self.current["content"].append(_text_part(""))
        events.append({"type": "response.content_part.added", "item_id": self.current["id"],
                       "output_index": self._index(), "content_index": 0, "part": _text_part("")})
        return events

    def _text(self, text: str) -> list[dict]:
        events = []
        if self.current is None or self.current["type"] != "message":
            events += self.close()
            events += self._open_message()
        self.current["content"][0]["text"] += text
        events.append({"type": "response.output_text.delta", "item_id": self.current["id"],
                       "output_index": self._index(), "content_index": 0, "delta": text, "logprobs": []})
        return events

    def _tool_call(self, delta: dict) -> list[dict]:
        events = []
        function = delta.get("function") or {}
        if delta.get("id"):
            events += self.close()
            item_id = self._new_id("fc")
            events += self._open({"id": item_id, "type": "function_call", "status": "in_progress",
                                  "call_id": "call_" + item_id.removeprefix("fc_"), "name": function.get("name", ""),
                                  "arguments": ""})
        piece = function.get("arguments") or ""
        if piece and self.current is not None and self.current["type"] == "function_call":
            self.current["arguments"] += piece
            events.append({"type": "response.function_call_arguments.delta", "item_id": self.current["id"],
                           "output_index": self._index(), "delta": piece})
        return events

    def feed(self, event: Event) -> list[dict]:
        """Stream events (without sequence numbers) for one job event of the first choice."""
        if event.type != "output" or event.choice != 0:
            return []
        text, tool_deltas = self._read(event)
        events = self._text(text) if text else []
        for delta in tool_deltas:
            events += self._tool_call(delta)
        if event.finish_reason:
            events += self.finish("incomplete" if event.finish_reason == "length" else "completed")
        return events

    def close(self, status: str = "completed") -> list[dict]:
        """Close the open item, if any."""
        item, self.current = self.current, None
        if item is None:
            return []
        item["status"] = status
        index = self.items.index(item)
        events = []
        if item["type"] == "message":
            part = item["content"][0]
            events += [{"type": "response.output_text.done", "item_id": item["id"], "output_index": index,
                        "content_index": 0, "text": part["text"], "logprobs": []},
                       {"type": "response.content_part.done", "item_id": item["id"], "output_index": index,
                        "content_index": 0, "part": copy.deepcopy(part)}]
        else:
            events.append({"type": "response.function_call_arguments.done", "item_id": item["id"],
                           "output_index": index, "name": item["name"], "arguments": item["arguments"]})
        events.append({"type": "response.output_item.done", "output_index": index, "item": copy.deepcopy(item)})
        return events

    def finish(self, status: str) -> list[dict]:
        """Close the last item; an answer with no output at all is one empty message."""
        events = [] if self.items else self._open_message()
        return events + self.close(status)


def builder_for(job: Job, response_id: str) -> OutputBuilder:
    return OutputBuilder(response_id, offered_tool_names(job.task.tools, job.task.tool_choice))


def output_of(job: Job, response_id: str) -> list[dict]:
    """The output items of a job's events so far (closed ones only, as stored)."""
    builder = builder_for(job, response_id)
    for event in job.events:
        builder.feed(event)
    if job.done and builder.current is not None:
        builder.close("incomplete")
    return [item for item in builder.items if item is not builder.current]


def status_of(job: Job) -> str:
    if job.status == "succeeded":
        length = bool(job.choices) and job.choices[0].finish_reason == "length"
        return "incomplete" if length else "completed"
    return JOB_STATUS[job.status]


def usage_of(job: Job) -> dict:
    output = job.choices[0].completion_tokens if job.choices else 0
    return {"input_tokens": job.prompt_tokens, "input_tokens_details": {"cached_tokens": 0},
            "output_tokens": output, "output_tokens_details": {"reasoning_tokens": 0},
            "total_tokens": job.prompt_tokens + output}
