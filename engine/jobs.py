"""The one internal job model every API dialect translates to and from.

A Job is one request to one model version. It owns an append-only list of events (output chunks,
log lines, the end), so any number of readers can follow it live or replay it from the start:
`run` waits for the end, SSE streams forward events, and the store records the lifecycle.
"""

from __future__ import annotations

import asyncio
import math
import secrets
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any, AsyncIterator, Callable, Literal

Status = Literal["starting", "processing", "succeeded", "failed", "canceled"]
TERMINAL = ("succeeded", "failed", "canceled")
EventType = Literal["output", "logs", "done"]

_ALPHABET = "abcdefghijklmnopqrstuvwxyz0123456789"


def new_id(length: int = 26) -> str:
    """Replicate-style lowercase base36 ids: `length` digits of one random number drawn with a
    single call to the OS generator (one `secrets.choice` per digit made a system call each). The
    number has 32 more bits than the digits hold, so the digits are uniform to within 2**-32."""
    number = int.from_bytes(secrets.token_bytes((math.ceil(length * math.log2(36)) + 32 + 7) // 8))
    digits = []
    for _ in range(length):
        number, digit = divmod(number, 36)
        digits.append(_ALPHABET[digit])
    return "".join(digits)


def utcnow() -> str:
    return datetime.now(timezone.utc).isoformat().replace("+00:00", "Z")


@dataclass
class Event:
    id: int
    type: EventType
    data: Any  # output: text chunk or file URL; logs: a line; done: {"status", "error"?}
    choice: int = 0
    logprobs: list | None = None  # engine.llm.types.TokenLogprob for this chunk
    prompt_logprobs: list | None = None  # per prompt token (None for the first), on a choice's first chunk
    finish_reason: str | None = None


@dataclass
class Choice:
    """One finished completion of a text job (a job with n > 1 has several)."""

    index: int
    text: str = ""
    finish_reason: str | None = None
    logprobs: list = field(default_factory=list)
    prompt_logprobs: list = field(default_factory=list)  # when asked: per prompt token, None for the first
    completion_tokens: int = 0


@dataclass
class Job:
    model: str  # owner/name
    version: str  # 64-hex version id
    kind: str  # text-generation | image-to-video
    input: dict  # the input as the user submitted it, for the record
    task: Any = None  # the normalised task (TextTask / VideoTask) the engine runs
    id: str = field(default_factory=new_id)
    owner: str | None = None  # the API key's identity that created it
    source: str = "api"  # which dialect created it
    status: Status = "starting"
    output: Any = None
    logs: str = ""
    error: str | None = None
    created_at: str = field(default_factory=utcnow)
    started_at: str | None = None
    completed_at: str | None = None
    predict_time: float | None = None
    prompt_tokens: int = 0
    prompt_text: str | None = None  # text jobs: the prompt as the model reads it (token-id prompts decoded)
    choices: list[Choice] = field(default_factory=list)
    webhook: str | None = None
    webhook_events_filter: tuple[str, ...] = ("start", "output", "logs", "completed")
    extra: dict = field(default_factory=dict)  # dialect-specific bookkeeping (session ids, chat ids)
    keep_alive: float | None = None  # seconds the version stays loaded once idle (None: its default)
    events: list[Event] = field(default_factory=list)
    _changed: asyncio.Event | None = field(default=None, repr=False)
    _started_mono: float | None = field(default=None, repr=False)
    _created_mono: float = field(default_factory=time.monotonic, repr=False)
    _completed_mono: float | None = field(default=None, repr=False)
    listeners: list[Callable[["Job", "Event | None"], None]] = field(default_factory=list, repr=False)
    cancel_requested: bool = False

    @property
    def done(self) -> bool:
        return self.status in TERMINAL

    @property
    def total_time(self) -> float | None:
        if self._completed_mono is None:
            return None
        return round(self._completed_mono - self._created_mono, 6)

    def _notify(self, event: Event | None = None) -> None:
        if self._changed is not None:
            self._changed.set()
        for listener in self.listeners:
            listener(self, event)

    def emit(self, type: EventType, data: Any, **fields: Any) -> Event:
        event = Event(id=len(self.events), type=type, data=data, **fields)
        self.events.append(event)
        if type == "logs":
            self.logs += data if data.endswith("\n") else data + "\n"
        self._notify(event)
        return event

    def start(self) -> None:
        if self.status == "starting":
            self.status = "processing"
            self.started_at = utcnow()
            self._started_mono = time.monotonic()
            self._notify()

    def finish(self, status: Status, error: str | None = None) -> None:
        """Move to a terminal status exactly once and emit the `done` event."""
        if self.done:
            return
        now = time.monotonic()
        self.status = status
        self.error = error
        self.completed_at = utcnow()
        self._completed_mono = now
        if self._started_mono is not None:
            self.predict_time = round(now - self._started_mono, 6)
        payload: dict = {"status": status}
        if error:
            payload["error"] = error
        self.emit("done", payload)

    async def follow(self, start: int = 0) -> AsyncIterator[Event]:
        """Every event from `start` on, live, ending after `done`."""
        if self._changed is None:
            self._changed = asyncio.Event()
        position = start
        while True:
            while position < len(self.events):
                event = self.events[position]
                position += 1
                yield event
                if event.type == "done":
                    return
            self._changed.clear()
            if position < len(self.events):
                continue
            await self._changed.wait()

    async def wait(self, timeout: float | None = None) -> bool:
        """Wait until the job ends (True) or `timeout` seconds pass (False)."""
        if self.done:
            return True
        try:
            async with asyncio.timeout(timeout):
                async for _ in self.follow(len(self.events)):
                    pass
        except TimeoutError:
            return self.done
        return True


