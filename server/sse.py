"""Server-sent event responses for every dialect: sse-starlette, with keep-alive comments sent
only while a stream is quiet.

sse-starlette's own pings go out on a timer, also between a stream's data events. Simple
line-oriented SSE readers (vLLM's benchmark client among them) choke on a comment that arrives in
the middle of a token stream and drop the rest of the response, and a stream that is sending data
needs no keep-alive anyway. So the timer is off and a comment is written only after `ping_s`
seconds without an event.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

from sse_starlette import EventSourceResponse, ServerSentEvent

PING_S = 15


_END, _PING = object(), object()


@dataclass
class _Failed:
    error: Exception


async def _with_quiet_pings(events: AsyncIterator[Any], ping_s: float, comment: str,
                            sep: str | None) -> AsyncIterator[Any]:
    """`events`, with a ping comment after every `ping_s` seconds without one.

    A task moves the events into a queue and notes when the last one came; one timer, re-armed
    only when it fires, adds a ping to the queue when that was `ping_s` ago. No task, wait or
    timer is set up per event (racing a fresh `anext` task against a timer for every token cost
    more than the rest of this wrapper)."""
    loop = asyncio.get_running_loop()
    queue: asyncio.Queue = asyncio.Queue()
    last = loop.time()

    async def pump() -> None:
        nonlocal last
        try:
            async for item in events:
                last = loop.time()
                queue.put_nowait(item)
        except Exception as exc:  # noqa: BLE001 - raised again on the reader's side
            queue.put_nowait(_Failed(exc))
        else:
            queue.put_nowait(_END)

    def check_quiet() -> None:
        nonlocal last, timer
        if loop.time() >= last + ping_s:
            last = loop.time()
            queue.put_nowait(_PING)
        timer = loop.call_at(last + ping_s, check_quiet)

    pumping = asyncio.ensure_future(pump())
    timer = loop.call_at(last + ping_s, check_quiet)
    try:
        while True:
            item = await queue.get()
            if item is _END:
                return
            if item is _PING:
                yield ServerSentEvent(comment=comment, sep=sep)
            elif isinstance(item, _Failed):
                raise item.error
            else:
                yield item
    finally:
        timer.cancel()
        if not pumping.done():
            pumping.cancel()
            try:
                await pumping
            except asyncio.CancelledError:
                pass
        await events.aclose()


def event_source(events: AsyncIterator[Any], *, ping_s: float = PING_S, comment: str = "ping",
                 sep: str | None = None, **kwargs: Any) -> EventSourceResponse:
    """An EventSourceResponse over `events` that writes `: <comment>` after `ping_s` quiet seconds."""
    return EventSourceResponse(_with_quiet_pings(events, ping_s, comment, sep), ping=0, sep=sep, **kwargs)
