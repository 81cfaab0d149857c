"""Admission control: bounded concurrency plus a bounded wait queue.

A request first takes one of `max_running` slots; when none is free it waits in a
queue of at most `max_waiting` entries; when that is full it is refused at once
with `QueueFullError` (HTTP 429 with Retry-After) instead of queueing without bound.
A freed slot goes to the oldest waiting `interactive` request, else to the oldest `batch` one
(`GenerationRequest.priority`): batch traffic never delays a queued interactive request.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncGenerator, AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import TypeVar

from app.engines.base import EngineStats, Priority, QueueFullError
from app.metrics import QUEUE_DEPTH, RUNNING, MetricsSink

T = TypeVar("T")


class AdmissionController:
    def __init__(
        self,
        max_running: int,
        max_waiting: int,
        retry_after_s: float = 1.0,
        on_change: Callable[[], None] | None = None,
        metrics: MetricsSink | None = None,
        metric_labels: dict[str, str] | None = None,
    ):
        if max_running < 1:
            raise ValueError("max_running must be >= 1")
        if max_waiting < 0:
            raise ValueError("max_waiting must be >= 0")
        self.max_running = max_running
        self.max_waiting = max_waiting
        self.retry_after_s = retry_after_s
        self._running = 0
        self._waiters: list[asyncio.Future[None]] = []  # in arrival order
        self._low: set[asyncio.Future[None]] = set()  # the waiters of batch priority
        self._metrics = metrics
        self._metric_labels = metric_labels or {}
        self._on_change = on_change or self.publish

    def stats(self) -> EngineStats:
        return EngineStats(running=self._running, waiting=len(self._waiters))

    @property
    def capacity(self) -> int:
        """Requests it holds at most at once (running plus waiting); one more is refused with 429."""
        return self.max_running + self.max_waiting

    def publish(self) -> None:
        """Set the running / queue-depth gauges (`metric_labels` on `metrics`) from the current counts."""
        if self._metrics is None:
            return
        self._metrics.set_gauge(RUNNING, self._metric_labels, self._running)
        self._metrics.set_gauge(QUEUE_DEPTH, self._metric_labels, len(self._waiters))

    @asynccontextmanager
    async def slot(self, priority: Priority = "interactive") -> AsyncIterator[None]:
        await self._acquire(priority)
        self._on_change()
        try:
            yield
        finally:
            self._release()
            self._on_change()

    @asynccontextmanager
    async def admitted(self, stream: AsyncGenerator[T, None],
                       priority: Priority = "interactive") -> AsyncIterator[AsyncGenerator[T, None]]:
        """Hold a slot while `stream` is consumed. Engines wrap their generation with it:

            async with self._admission.admitted(self._generate(...)) as chunks:
                async for chunk in chunks:
                    yield chunk

        Leaving the block (done, error, or the caller closing the engine's stream on a client disconnect)
        closes `stream` first, so its generation has stopped before the slot goes to the next request; the
        gauges are republished in every outcome, a 429 included.
        """
        try:
            async with self.slot(priority), contextlib.aclosing(stream) as chunks:
                yield chunks
        finally:
            self.publish()

    async def _acquire(self, priority: Priority = "interactive") -> None:
        if self._running < self.max_running and not self._waiters:
            self._running += 1
            return
        if len(self._waiters) >= self.max_waiting:
            raise QueueFullError(
                f"server busy: {self._running} requests running and {len(self._waiters)} waiting "
                f"(limit {self.max_running}+{self.max_waiting}); retry later",
                retry_after=self.retry_after_s,
            )
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiters.append(fut)
        if priority == "batch":
            self._low.add(fut)
        self._on_change()
        try:
            await fut  # resolved by _release, which hands its slot over (running unchanged)
        except BaseException:
            self._low.discard(fut)
            if fut in self._waiters:
                self._waiters.remove(fut)
            elif fut.done() and not fut.cancelled():
                # the slot was handed to us just as we were cancelled: pass it on
                self._release()
            raise

    def _release(self) -> None:
        while self._waiters:
            fut = next((f for f in self._waiters if f not in self._low), self._waiters[0])  # interactive first
            self._waiters.remove(fut)
            self._low.discard(fut)
            if not fut.done():
                fut.set_result(None)  # hand the slot over
                return
        self._running -= 1
