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
from typing import Any

from sse_starlette import EventSourceResponse, ServerSentEvent

PING_S = 15


async def _with_quiet_pings(events: AsyncIterator[Any], ping_s: float, comment: str,
                            sep: str | None) -> AsyncIterator[Any]:
    iterator = aiter(events)
    pending = asyncio.ensure_future(anext(iterator))
    try:
        while True:
            done, _ = await asyncio.wait({pending}, timeout=ping_s)
            if not done:
                yield ServerSentEvent(comment=comment, sep=sep)
                continue
            try:
                item = pending.result()
            except StopAsyncIteration:
                return
            yield item
            pending = asyncio.ensure_future(anext(iterator))
    finally:
        if not pending.done():
            pending.cancel()
            try:
                await pending
            except (asyncio.CancelledError, StopAsyncIteration):
                pass
        await iterator.aclose()


def event_source(events: AsyncIterator[Any], *, ping_s: float = PING_S, comment: str = "ping",
                 sep: str | None = None, **kwargs: Any) -> EventSourceResponse:
    """An EventSourceResponse over `events` that writes `: <comment>` after `ping_s` quiet seconds."""
    return EventSourceResponse(_with_quiet_pings(events, ping_s, comment, sep), ping=0, sep=sep, **kwargs)
