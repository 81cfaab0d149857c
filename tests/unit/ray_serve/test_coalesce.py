"""`coalesce`: the replica -> ingress chunk stream re-cut into fewer messages, nothing lost or reordered.

The source is driven by asyncio events, so "arrived together" and "the source is stuck" are states the test
sets up, not timings it hopes for.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncGenerator

import pytest

from app.engines.base import EngineError, GenerationChunk
from app.ray_serve.coalesce import coalesce


def chunk(i: int, finish: str | None = None) -> GenerationChunk:
    return GenerationChunk(text=f"t{i} ", prompt_tokens=3, completion_tokens=i + 1, finish_reason=finish)  # type: ignore[arg-type]


class Source:
    """Yields the chunks of each burst back to back; between bursts it waits for the test's go-ahead."""

    def __init__(self, bursts: list[list[GenerationChunk]], fail: Exception | None = None):
        self.bursts = bursts
        self.fail = fail
        self.go = [asyncio.Event() for _ in bursts]
        self.go[0].set()
        self.closed = False
        self.sent = 0
        self.waiting_for = -1  # the burst the source is waiting for

    async def stream(self) -> AsyncGenerator[GenerationChunk, None]:
        try:
            for i, burst in enumerate(self.bursts):
                self.waiting_for = i
                await self.go[i].wait()
                for c in burst:
                    self.sent += 1
                    yield c
            if self.fail is not None:
                raise self.fail
        finally:
            self.closed = True


def text_of(chunks: list[GenerationChunk]) -> str:
    return "".join(c.text for c in chunks)


async def test_a_burst_travels_as_one_message_with_order_and_counts_kept() -> None:
    burst = [chunk(i) for i in range(6)] + [chunk(6, "length")]
    src = Source([burst])
    out = [c async for c in coalesce(src.stream(), 30.0)]  # the source ends: no need to wait out the window
    assert len(out) == 2  # the stream's first token alone (TTFT pays no window), then the rest as one
    assert out[0] == burst[0]
    assert out[1].text == text_of(burst[1:]) and out[1].completion_tokens == 7 and out[1].finish_reason == "length"
    assert out[1].prompt_tokens == 3 and src.closed


async def test_a_chunk_is_not_held_while_the_source_is_stuck() -> None:
    """The window (50 ms) closes while the source waits for the next burst: the first message goes out alone."""
    src = Source([[chunk(0), chunk(1), chunk(2)], [chunk(3)], [chunk(4, "stop")]])
    stream = coalesce(src.stream(), 0.05)
    lead = await asyncio.wait_for(anext(stream), 30)
    assert lead.text == "t0 "  # the stream's first token, sent at once
    # only the rest of burst 0 can exist: it arrives although the source is stuck (as one message, or two when a
    # loaded box deschedules this process between its chunks for longer than the window)
    held = [await asyncio.wait_for(anext(stream), 30)]
    while not text_of(held).endswith("t2 "):
        held.append(await asyncio.wait_for(anext(stream), 30))
    assert text_of(held) == "t1 t2 " and not src.go[1].is_set() and not src.closed
    src.go[1].set()
    second = await asyncio.wait_for(anext(stream), 30)
    assert second.text == "t3 " and second.completion_tokens == 4
    src.go[2].set()
    rest = [c async for c in stream]
    assert text_of([lead, *held, second, *rest]) == "t0 t1 t2 t3 t4 " and rest[-1].finish_reason == "stop"


async def test_an_error_comes_after_everything_the_source_produced() -> None:
    src = Source([[chunk(0), chunk(1), chunk(2)]], fail=EngineError("engine broke"))
    stream = coalesce(src.stream(), 30.0)
    assert (await anext(stream)).text == "t0 "
    got = await anext(stream)
    assert got.text == "t1 t2 "
    with pytest.raises(EngineError, match="engine broke"):
        await anext(stream)


async def test_closing_the_stream_closes_the_source() -> None:
    src = Source([[chunk(0)], [chunk(1)]])
    stream = coalesce(src.stream(), 0.01)
    assert (await anext(stream)).text == "t0 "
    await stream.aclose()
    assert src.closed and src.sent == 1


async def test_cancelling_a_waiting_read_stops_the_source() -> None:
    """What Serve does when the client goes away: the read in flight is cancelled while the source waits."""
    src = Source([[chunk(0)], [chunk(1)]])
    stream = coalesce(src.stream(), 0.01)
    assert (await anext(stream)).text == "t0 "
    read = asyncio.ensure_future(anext(stream))
    for _ in range(1000):  # yield to the loop until the read reached the source's wait for burst 1
        if src.waiting_for == 1:
            break
        await asyncio.sleep(0)
    assert src.waiting_for == 1 and not read.done()
    read.cancel()
    with pytest.raises(asyncio.CancelledError):
        await read
    assert src.closed and src.sent == 1


async def test_window_zero_passes_every_chunk_through() -> None:
    burst = [chunk(i) for i in range(4)]
    out = [c async for c in coalesce(Source([burst]).stream(), 0)]
    assert out == burst
