"""AdmissionController: bounded concurrency, a bounded FIFO wait queue, and 429 when it is full.

Fast in-process tests on the real class (no server); waiting is observed through
`stats()` and asyncio events, never through sleeps.
"""

from __future__ import annotations

import asyncio
import contextlib

import pytest

from app.engines.admission import AdmissionController
from app.engines.base import Priority, QueueFullError


async def _until(cond, what: str) -> None:  # type: ignore[no-untyped-def]
    """Yield to the event loop until `cond()` holds (bounded)."""
    for _ in range(1000):
        if cond():
            return
        await asyncio.sleep(0)
    raise AssertionError(f"never: {what}")


class Holder:
    """Takes a slot and keeps it until released."""

    def __init__(self, ac: AdmissionController, name: str, log: list[str]):
        self.ac, self.name, self.log = ac, name, log
        self.admitted = asyncio.Event()
        self.release = asyncio.Event()
        self.task = asyncio.create_task(self._run())

    async def _run(self) -> None:
        async with self.ac.slot():
            self.log.append(self.name)
            self.admitted.set()
            await self.release.wait()


def test_rejects_bad_limits() -> None:
    with pytest.raises(ValueError):
        AdmissionController(0, 1)
    with pytest.raises(ValueError):
        AdmissionController(1, -1)


async def test_runs_up_to_max_running_then_queues_then_refuses() -> None:
    changes: list[tuple[int, int]] = []
    def record() -> None:
        changes.append((ac.stats().running, ac.stats().waiting))

    ac = AdmissionController(2, 2, retry_after_s=3.5, on_change=record)
    log: list[str] = []
    a, b = Holder(ac, "a", log), Holder(ac, "b", log)
    await asyncio.wait_for(asyncio.gather(a.admitted.wait(), b.admitted.wait()), 5)
    c, d = Holder(ac, "c", log), Holder(ac, "d", log)
    await _until(lambda: ac.stats().waiting == 2, "two waiting")
    assert ac.stats().running == 2
    with pytest.raises(QueueFullError) as exc:
        async with ac.slot():
            pass
    assert exc.value.status_code == 429
    assert exc.value.retry_after == 3.5
    assert "2 requests running and 2 waiting" in exc.value.message
    assert ac.stats().running == 2 and ac.stats().waiting == 2  # a refusal changes nothing
    # releasing hands slots over in FIFO order
    a.release.set()
    await asyncio.wait_for(c.admitted.wait(), 5)
    assert not d.admitted.is_set()
    b.release.set()
    await asyncio.wait_for(d.admitted.wait(), 5)
    assert log == ["a", "b", "c", "d"]
    c.release.set()
    d.release.set()
    await asyncio.gather(a.task, b.task, c.task, d.task)
    assert ac.stats().running == 0 and ac.stats().waiting == 0
    assert changes and changes[-1] == (0, 0)


async def test_zero_queue_refuses_at_once_when_busy() -> None:
    ac = AdmissionController(1, 0)
    h = Holder(ac, "a", [])
    await asyncio.wait_for(h.admitted.wait(), 5)
    with pytest.raises(QueueFullError):
        async with ac.slot():
            pass
    h.release.set()
    await h.task
    async with ac.slot():
        assert ac.stats().running == 1


async def test_cancelled_waiter_leaves_the_queue() -> None:
    ac = AdmissionController(1, 1)
    log: list[str] = []
    a = Holder(ac, "a", log)
    await asyncio.wait_for(a.admitted.wait(), 5)
    b = Holder(ac, "b", log)
    await _until(lambda: ac.stats().waiting == 1, "b waiting")
    b.task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await b.task
    assert ac.stats().waiting == 0
    c = Holder(ac, "c", log)  # the freed queue place is usable again
    await _until(lambda: ac.stats().waiting == 1, "c waiting")
    a.release.set()
    await asyncio.wait_for(c.admitted.wait(), 5)
    c.release.set()
    await asyncio.gather(a.task, c.task)
    assert log == ["a", "c"]
    assert ac.stats().running == 0


async def test_slot_handed_over_while_the_waiter_is_cancelled_is_passed_on() -> None:
    ac = AdmissionController(1, 2)
    log: list[str] = []
    held = ac.slot()
    await held.__aenter__()
    b, c = Holder(ac, "b", log), Holder(ac, "c", log)
    await _until(lambda: ac.stats().waiting == 2, "b and c waiting")
    # releasing resolves b's future; b is cancelled before it gets to run: the slot must go on to c
    await held.__aexit__(None, None, None)
    b.task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await b.task
    await asyncio.wait_for(c.admitted.wait(), 5)
    c.release.set()
    await c.task
    assert log == ["c"]
    assert ac.stats().running == 0 and ac.stats().waiting == 0


async def test_exception_inside_the_slot_releases_it() -> None:
    ac = AdmissionController(1, 0)
    with pytest.raises(RuntimeError):
        async with ac.slot():
            raise RuntimeError("boom")
    assert ac.stats().running == 0
    async with ac.slot():
        pass


async def test_many_concurrent_requests_never_exceed_the_limit() -> None:
    ac = AdmissionController(3, 5)
    peak = 0
    admitted = refused = 0
    gate = asyncio.Event()

    async def one() -> None:
        nonlocal peak, admitted, refused
        try:
            async with ac.slot():
                admitted += 1
                peak = max(peak, ac.stats().running)
                await gate.wait()
        except QueueFullError:
            refused += 1

    tasks = [asyncio.create_task(one()) for _ in range(20)]
    await _until(lambda: refused == 12, "12 refused")
    assert ac.stats().running == 3 and ac.stats().waiting == 5
    gate.set()
    await asyncio.gather(*tasks)
    assert (admitted, refused, peak) == (8, 12, 3)


async def test_admitted_closes_the_stream_before_the_slot_goes_to_the_next_request() -> None:
    ac = AdmissionController(max_running=1, max_waiting=1)
    events: list[str] = []

    async def stream(name: str):  # type: ignore[no-untyped-def]
        try:
            for i in range(1000):
                yield f"{name}{i}"
                await asyncio.sleep(0)
        finally:
            events.append(f"{name} closed, running={ac.stats().running}, waiting={ac.stats().waiting}")

    async def engine_generate(name: str):  # type: ignore[no-untyped-def]
        async with ac.admitted(stream(name)) as chunks:
            async for chunk in chunks:
                yield chunk

    first = engine_generate("a")
    assert await anext(first) == "a0"
    second = engine_generate("b")
    waiting = asyncio.create_task(anext(second))
    await _until(lambda: ac.stats().waiting == 1, "b queued")
    with pytest.raises(QueueFullError):  # the queue (1) is full
        await anext(engine_generate("c"))
    await first.aclose()  # the client of "a" went away
    assert await waiting == "b0"
    # "a" was closed while it still held the slot and "b" was still queued
    assert events == ["a closed, running=1, waiting=1"]
    await second.aclose()
    assert events[-1] == "b closed, running=1, waiting=0" and ac.stats().running == 0


class PriorityHolder(Holder):
    def __init__(self, ac: AdmissionController, name: str, log: list[str], priority: Priority):
        self.priority = priority
        super().__init__(ac, name, log)

    async def _run(self) -> None:
        async with self.ac.slot(self.priority):
            self.log.append(self.name)
            self.admitted.set()
            await self.release.wait()


async def test_a_freed_slot_goes_to_the_oldest_interactive_waiter_before_batch_ones() -> None:
    ac = AdmissionController(1, 8)
    log: list[str] = []
    running = PriorityHolder(ac, "batch-0", log, "batch")
    await asyncio.wait_for(running.admitted.wait(), 5)
    queued = [PriorityHolder(ac, "batch-1", log, "batch"), PriorityHolder(ac, "batch-2", log, "batch")]
    await _until(lambda: ac.stats().waiting == 2, "two batch waiters")
    queued += [PriorityHolder(ac, "chat-1", log, "interactive"), PriorityHolder(ac, "chat-2", log, "interactive")]
    await _until(lambda: ac.stats().waiting == 4, "four waiters")
    holders = [running, *queued]
    for h in holders:  # each leaves as soon as it runs: the log is the order of admission
        h.release.set()
    await asyncio.wait_for(asyncio.gather(*(h.task for h in holders)), 5)
    assert log == ["batch-0", "chat-1", "chat-2", "batch-1", "batch-2"]
    assert ac.stats().running == 0 and ac.stats().waiting == 0


async def test_a_cancelled_batch_waiter_leaves_no_trace() -> None:
    ac = AdmissionController(1, 4)
    log: list[str] = []
    running = Holder(ac, "a", log)
    await asyncio.wait_for(running.admitted.wait(), 5)
    low = PriorityHolder(ac, "low", log, "batch")
    await _until(lambda: ac.stats().waiting == 1, "one waiter")
    low.task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await low.task
    assert ac.stats().waiting == 0 and not ac._low
    running.release.set()
    await asyncio.wait_for(running.task, 5)
    assert ac.stats().running == 0
