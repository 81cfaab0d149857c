"""Coalescing of a replica's chunk stream: what arrives within a short window crosses Ray as one message.

Every item a Serve streaming generator yields is its own pickled object on its own trip replica -> ingress,
so a stream of one chunk per token costs one Ray message per token. `coalesce(chunks, window_s)` sends the
stream's first chunk at once (time to first token pays no window), then yields the first chunk of each later
message as soon as the window that opened with it closes: everything that arrived meanwhile is merged into
it (`merge_chunks`: texts joined in order, the last counts and finish reason, logprobs joined), and a chunk
is never held back longer than `window_s` (the source is not waited on beyond it). A source that
ends or fails sends what it produced first, then ends or raises. Closing the coalesced stream closes the
source (the engine's generation stops as if the client went away).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncGenerator, AsyncIterator

from app.engines.base import GenerationChunk, merge_chunks


async def coalesce(chunks: AsyncIterator[GenerationChunk], window_s: float
                   ) -> AsyncGenerator[GenerationChunk, None]:
    """`chunks` re-cut into messages of everything that arrived within `window_s` of each message's first chunk."""
    if window_s <= 0:
        async for chunk in chunks:
            yield chunk
        return
    loop = asyncio.get_running_loop()
    pending: asyncio.Future[GenerationChunk] | None = None
    leading = True
    try:
        while True:
            pending = pending or asyncio.ensure_future(anext(chunks))
            try:
                first = await pending  # no window open: wait as long as the source takes
            except StopAsyncIteration:
                return
            pending = None
            if leading:  # the first token goes out alone, now
                leading = False
                yield first
                continue
            batch: list[GenerationChunk] = [first]
            failure: BaseException | None = None
            deadline = loop.time() + window_s
            while failure is None:
                pending = asyncio.ensure_future(anext(chunks))
                left = deadline - loop.time()
                if left > 0 and not pending.done():
                    await asyncio.wait([pending], timeout=left)
                if not pending.done():
                    break  # the window closed: the next chunk opens the next message
                try:
                    batch.append(pending.result())
                except StopAsyncIteration as end:
                    failure = end
                except Exception as exc:
                    failure = exc
                pending = None
            yield merge_chunks(batch)
            if isinstance(failure, StopAsyncIteration):
                return
            if failure is not None:
                raise failure
    finally:
        if pending is not None and not pending.done():
            pending.cancel()  # the source's await is interrupted: its own cleanup runs
            with contextlib.suppress(BaseException):
                await pending
        aclose = getattr(chunks, "aclose", None)
        if aclose is not None:
            await aclose()
