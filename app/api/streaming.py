"""The async plumbing between engine streams and one HTTP response: fan-in, pacing, disconnects, shutdown cuts.

- `primed_fan_in(streams, on_first, cut, keepalive_s)` starts every engine stream of a request at once (the `n`
  choices, the prompts of a list) and returns once each produced its first chunk, so admission errors (429, 400,
  503) become real HTTP statuses before any header is sent. The returned iterator yields `(choice index, chunk)`
  in arrival order, `None` after each `keepalive_s` of silence (the caller sends an SSE comment), and raises
  `ServerShuttingDown` once `cut` is set (the server's shutdown grace ended). Closing it aborts every stream.
- `until_disconnect(request, work)` runs `work` unless the client goes away (None) or the grace ends first.
- `sse(obj)` frames one SSE event; `SSE_HEADERS` are the headers every stream carries.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncGenerator, Awaitable, Callable
from typing import Any, TypeVar

from fastapi import Request

from app.engines.base import EngineNotReadyError, GenerationChunk
from app.jsonline import dumps_line

T = TypeVar("T")

SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no", "Connection": "keep-alive"}

_KEEPALIVE, _CUT = -1, -2  # pseudo choice indexes the pacing puts into the fan-in queue
_Item = GenerationChunk | BaseException | None  # a chunk, a stream's error, or None: that stream ended


class ServerShuttingDown(EngineNotReadyError):
    """The shutdown grace ended while this request ran: a server-side cut, retryable elsewhere."""

    code = "server_shutting_down"
    error_type = "server_shutting_down"

    def __init__(self) -> None:
        super().__init__("the server is shutting down; retry the request", retry_after=1)


class _FanIn:
    """Pumps the streams concurrently into one queue, independently of the consumer: a stream that waited for
    the others while holding its engine slot would deadlock `n` (or several prompts) beyond the free slots.
    Pacing rides on the same queue, so a token costs one wake-up of the consumer."""

    def __init__(self, streams: dict[int, AsyncGenerator[GenerationChunk, None]]) -> None:
        self.queue: asyncio.Queue[tuple[int, _Item]] = asyncio.Queue()
        self.tasks = [asyncio.create_task(self._pump(idx, stream)) for idx, stream in streams.items()]
        self.indexes = set(streams)

    async def _pump(self, idx: int, stream: AsyncGenerator[GenerationChunk, None]) -> None:
        try:
            async for chunk in stream:
                self.queue.put_nowait((idx, chunk))
            self.queue.put_nowait((idx, None))
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # forwarded to the consumer
            self.queue.put_nowait((idx, exc))
        finally:
            with contextlib.suppress(Exception):
                await stream.aclose()

    async def stop(self) -> None:
        for t in self.tasks:
            t.cancel()
        await asyncio.gather(*self.tasks, return_exceptions=True)

    async def prime(self, on_first: Callable[[GenerationChunk], None]) -> list[tuple[int, GenerationChunk | None]]:
        """Wait for every stream's first item (errors raised here); what arrived meanwhile, in order."""
        buffered: list[tuple[int, GenerationChunk | None]] = []
        unstarted = set(self.indexes)
        try:
            while unstarted:
                idx, item = await self.queue.get()
                if isinstance(item, BaseException):
                    raise item
                if idx in unstarted and item is not None:
                    on_first(item)
                unstarted.discard(idx)
                buffered.append((idx, item))
        except BaseException:
            await self.stop()
            raise
        return buffered

    def pace(self, cut: asyncio.Event | None, keepalive_s: float) -> Callable[[], None]:
        """Put a keep-alive marker after each `keepalive_s` of silence and a cut marker when `cut` is set;
        returns the function that stops both. `mark_activity` resets the silence."""
        loop = asyncio.get_running_loop()
        self.last = loop.time()
        timer: asyncio.TimerHandle | None = None

        def tick() -> None:  # one timer per keep-alive period, not one per chunk
            nonlocal timer
            silent = loop.time() - self.last
            if silent >= keepalive_s:
                self.queue.put_nowait((_KEEPALIVE, None))
            timer = loop.call_later(keepalive_s - silent % keepalive_s, tick)

        if keepalive_s > 0:
            timer = loop.call_later(keepalive_s, tick)
        cut_waiter: asyncio.Future[Any] | None = None
        if cut is not None:
            cut_waiter = asyncio.ensure_future(cut.wait())
            cut_waiter.add_done_callback(
                lambda waiter: None if waiter.cancelled() else self.queue.put_nowait((_CUT, None)))

        def stop() -> None:
            if timer is not None:
                timer.cancel()
            if cut_waiter is not None:
                cut_waiter.cancel()

        return stop

    async def rest(self, buffered: list[tuple[int, GenerationChunk | None]], cut: asyncio.Event | None,
                   keepalive_s: float) -> AsyncGenerator[tuple[int, GenerationChunk] | None, None]:
        remaining = len(self.tasks)
        stop_pacing = self.pace(cut, keepalive_s)
        loop = asyncio.get_running_loop()
        try:
            for idx, first in buffered:
                if first is None:
                    remaining -= 1
                else:
                    yield idx, first
            while remaining:
                idx, item = await self.queue.get()
                if idx == _KEEPALIVE:
                    yield None
                    continue
                if idx == _CUT:
                    raise ServerShuttingDown()
                self.last = loop.time()
                if item is None:
                    remaining -= 1
                elif isinstance(item, BaseException):
                    raise item
                else:
                    yield idx, item
        finally:
            stop_pacing()
            await self.stop()


async def primed_fan_in(
    streams: dict[int, AsyncGenerator[GenerationChunk, None]],
    on_first: Callable[[GenerationChunk], None],
    cut: asyncio.Event | None = None,
    keepalive_s: float = 0.0,
) -> AsyncGenerator[tuple[int, GenerationChunk] | None, None]:
    """Start every stream at once and return when each has produced its first chunk (passed to `on_first`).

    Errors before that (429, 400, 503) are raised here, before any header is sent. The returned iterator tags
    chunks with their choice index; closing it cancels the pumps, which closes (aborts) the streams. None is
    yielded after each `keepalive_s` without a chunk (0: never), and ServerShuttingDown is raised once `cut` is set.
    """
    fan_in = _FanIn(streams)
    buffered = await fan_in.prime(on_first)
    return fan_in.rest(buffered, cut, keepalive_s)


def cut_event(request: Request) -> asyncio.Event:
    """The app's shutdown-cut event (set when the drain grace ends)."""
    event: asyncio.Event = request.app.state.stream_cut
    return event


async def until_disconnect(request: Request, work: Awaitable[T]) -> T | None:
    """Run `work`, cancelling it if the client disconnects first (returns None then) or the shutdown grace
    ends first (raises ServerShuttingDown)."""
    task = asyncio.ensure_future(work)
    cut = asyncio.ensure_future(cut_event(request).wait())

    async def listen() -> None:
        while True:
            message = await request.receive()
            if message["type"] == "http.disconnect":
                return

    listener = asyncio.create_task(listen())
    try:
        done, _ = await asyncio.wait({task, listener, cut}, return_when=asyncio.FIRST_COMPLETED)
        if task in done:
            return task.result()
        task.cancel()
        with contextlib.suppress(BaseException):
            await task
        if cut in done:
            raise ServerShuttingDown()
        return None
    finally:
        listener.cancel()
        cut.cancel()
        if not task.done():
            task.cancel()


def sse(obj: dict[str, Any]) -> str:
    """One SSE event carrying `obj` as one line of JSON."""
    return f"data: {dumps_line(obj, compact=True)}\n\n"
