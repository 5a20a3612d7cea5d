"""Keep-alive comments go out only while a stream is quiet, never between its data events."""

from __future__ import annotations

import asyncio

import pytest
from sse_starlette import ServerSentEvent

from server.sse import _with_quiet_pings


async def _events(gaps: list[float]):
    for i, gap in enumerate(gaps):
        await asyncio.sleep(gap)
        yield f"event {i}"


async def _collect(gaps: list[float], ping_s: float) -> list:
    return [item async for item in _with_quiet_pings(_events(gaps), ping_s, "ping", "\n")]


async def test_a_busy_stream_carries_no_pings():
    items = await _collect([0.0, 0.01, 0.01, 0.01], ping_s=0.2)
    assert items == ["event 0", "event 1", "event 2", "event 3"]


async def test_a_quiet_stream_is_kept_alive():
    items = await _collect([0.0, 0.35, 0.0], ping_s=0.1)
    pings = [i for i, item in enumerate(items) if isinstance(item, ServerSentEvent)]
    assert [item for item in items if isinstance(item, str)] == ["event 0", "event 1", "event 2"]
    assert len(pings) >= 2 and all(0 < i < len(items) - 2 for i in pings)  # only in the gap


async def test_leaving_early_closes_the_source():
    closed = asyncio.Event()

    async def source():
        try:
            yield "first"
            await asyncio.sleep(10)
            yield "never"
        finally:
            closed.set()

    stream = _with_quiet_pings(source(), 5, "ping", None)
    assert await anext(stream) == "first"
    await stream.aclose()
    assert closed.is_set()


async def test_an_error_in_the_source_reaches_the_reader_after_the_events_before_it():
    async def source():
        yield "first"
        raise ValueError("broken source")

    stream = _with_quiet_pings(source(), 5, "ping", None)
    assert await anext(stream) == "first"
    with pytest.raises(ValueError, match="broken source"):
        await anext(stream)
