"""Continuous batching: one scheduler thread owns the model and advances every running sequence per step.

A step, on the scheduler thread (`BatchScheduler.step`):
1. sequences whose request was cancelled (client gone, stop string matched, consumer closed) leave;
2. prompts are prefilled, each sequence on its own, in chunks of at most `prefill_chunk` tokens (chunk
   boundaries depend only on the prompt, so results do not depend on who else is running); chunks are taken
   first come first served until the step's prefill budget (`prefill_chunk` tokens) is spent, which bounds
   how long a long prompt pauses the others. A sequence whose prompt is complete samples its first token and
   joins the batch in the same step;
3. ONE forward (`RaggedModel.decode`) advances every decoding sequence by one token; each sequence samples
   its own row (`Sampler`: its own generator, penalties, min_tokens/ignore_eos, hooks; plain greedy rows
   are chosen together, `app.engines.hf.sampling.sample_rows`);
4. finished sequences leave at once; every event of the step reaches its sequence's `EventSink` in ONE delivery
   per sink (`LoopSink`: one `call_soon_threadsafe` per event loop; in the engine process, one message to the
   server).

LoRA: a sequence whose request names an adapter prefills and decodes with it (`RaggedModel`'s per-row adapter
names: one forward mixes adapters and the base model). Adapters are put in and out of the model by `call` (a
function run on the scheduler thread at the next step boundary; the engine's `AdapterCache` decides which), and
`max_loras` bounds the distinct adapters of one step: a sequence whose adapter would exceed it waits for a slot
while sequences behind it may start.

Join and leave happen only at step boundaries; a sequence's tokens are identical whether it ran alone or in
a batch (`app.engines.hf.ragged`). `max_num_seqs` bounds the batch (the engines' admission control holds the same
number of running requests, so the scheduler never queues beyond it; extra submissions wait for a slot).

The request side is `stream_sequence`: an async generator that submits a `Sequence`, turns its tokens into
`GenerationChunk`s (several tokens that arrived together become one chunk), and on close (done, error,
client gone) cancels the sequence and waits until it has really left the batch.

The same loop runs DeepSpeed TP's rank 0 (`app.deepspeed.tp`): there the `RaggedModel` also broadcasts each
forward's plan (`release`, `idle` and the slot numbers exist for that) and `fatal` errors (a broken
collective) end the scheduler, which then answers every request with `EngineDeadError`.
"""

from __future__ import annotations

import abc
import asyncio
import concurrent.futures
import contextlib
import heapq
import logging
import queue
import threading
import weakref
from collections import deque
from collections.abc import AsyncGenerator, Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

from app.engines.base import EngineDeadError, EngineError, GenerationChunk, GenerationRequest, merge_chunks
from app.engines.hf.sampling import Sample, Sampler, sample_rows
from app.engines.hf.sequence_hooks import logprob_of
from app.engines.text import ChunkAssembler

log = logging.getLogger(__name__)

DEFAULT_PREFILL_CHUNK = 512


class StepModel(Protocol):
    """What the scheduler drives: `app.engines.hf.ragged.RaggedModel` (rank 0 of TP: a broadcasting subclass)."""

    def new_cache(self) -> Any: ...
    def rows_for(self, n: int) -> int: ...
    def prefill(self, cache: Any, ids: list[int], start: int, *, slot: int = 0, adapter: str | None = None) -> Any: ...
    def decode(self, caches: list[Any], tokens: list[int], rows: int | None = None, *,
               slots: list[int] | None = None, adapters: list[str | None] | None = None) -> Any: ...
    def release(self, slot: int) -> None: ...
    def load_adapter(self, name: str, path: str) -> None: ...
    def unload_adapter(self, name: str) -> None: ...


class EventSink(abc.ABC):
    """Where the events of the sequences it serves go: the seam between the scheduler's thread and the requests.

    The scheduler hands each sink one step's events at once, so its receiver wakes once per step however many
    sequences and tokens the step produced. `LoopSink`: an event loop of this process (the request's queue);
    the engine process's link to its server (`app.engines.hf.engine_process`): one message per step."""

    @abc.abstractmethod
    def deliver(self, events: list[tuple[Sequence, tuple[Any, ...]]], decoded_rows: int,
                on_decode: Callable[[int], None] | None) -> bool:
        """Deliver `events` in order, and the step's decode batch size (0: not counted at this sink) for
        `on_decode`. False when nobody listens any more (the sink's sequences then leave the batch)."""


class LoopSink(EventSink):
    """An asyncio event loop of this process: each event lands in its sequence's queue there (`left` is set last)."""

    _of_loop: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, LoopSink] = weakref.WeakKeyDictionary()
    _lock = threading.Lock()

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop

    @classmethod
    def of(cls, loop: asyncio.AbstractEventLoop) -> LoopSink:
        """The one sink of `loop` (requests on one loop share a wake-up per step)."""
        with cls._lock:
            sink = cls._of_loop.get(loop)
            if sink is None:
                sink = cls._of_loop[loop] = cls(loop)
            return sink

    def deliver(self, events: list[tuple[Sequence, tuple[Any, ...]]], decoded_rows: int,
                on_decode: Callable[[int], None] | None) -> bool:
        try:
            self.loop.call_soon_threadsafe(_apply, events, decoded_rows, on_decode)
        except RuntimeError:  # the loop is closed
            return False
        return True


def _apply(events: list[tuple[Sequence, tuple[Any, ...]]], decoded_rows: int,
           on_decode: Callable[[int], None] | None) -> None:
    for seq, event in events:
        if event[0] == "left":
            seq.left.set()
        else:
            seq.queue.put_nowait(event)
    if decoded_rows and on_decode is not None:
        on_decode(decoded_rows)


@dataclass(eq=False)
class Sequence:
    """One request inside the scheduler. Its events go to `sink`; a `LoopSink` puts them in `queue` and sets
    `left` once the sequence left the batch."""

    prompt_ids: list[int]
    sampler: Sampler
    sink: EventSink
    queue: asyncio.Queue[tuple[Any, ...]] = field(default_factory=asyncio.Queue)
    left: asyncio.Event = field(default_factory=asyncio.Event)
    cancelled: bool = False  # set from the event loop; read at step boundaries
    tag: int = -1  # the engine process's number for it (app.engines.hf.engine_process)
    slot: int = -1
    cache: Any = None
    prefilled: int = 0
    last_token: int = 0

    @property
    def adapter(self) -> str | None:
        """The request's LoRA adapter (None: the base model)."""
        return self.sampler.req.adapter


class _Outbox:
    """Events of one step, grouped by sink and delivered with one call per sink."""

    def __init__(self, on_decode: Callable[[int], None] | None = None) -> None:
        self.on_decode = on_decode
        self.events: dict[EventSink, list[tuple[Sequence, tuple[Any, ...]]]] = {}
        self.rows: dict[EventSink, int] = {}

    def event(self, seq: Sequence, *event: Any) -> None:
        self.events.setdefault(seq.sink, []).append((seq, event))

    def decoded(self, seq: Sequence, rows: int) -> None:
        """The step's decode batch size, counted at `seq`'s sink."""
        self.events.setdefault(seq.sink, [])
        self.rows[seq.sink] = rows

    def flush(self) -> list[EventSink]:
        """Send everything; returns the sinks nobody listens to any more."""
        closed = [sink for sink, events in self.events.items()
                  if not sink.deliver(events, self.rows.get(sink, 0), self.on_decode)]
        self.events, self.rows = {}, {}
        return closed


class BatchScheduler:
    """Owns the model on one thread (`run`); `submit`/`cancel` are called from event loops."""

    def __init__(self, model: StepModel, *, max_num_seqs: int, prefill_chunk: int = DEFAULT_PREFILL_CHUNK,
                 fatal: tuple[type[BaseException], ...] = (),
                 on_decode: Callable[[int], None] | None = None, max_loras: int = 0):
        if max_num_seqs < 1 or prefill_chunk < 1:
            raise ValueError("max_num_seqs and prefill_chunk must be >= 1")
        self.model = model
        self.max_num_seqs = max_num_seqs
        self.prefill_chunk = prefill_chunk
        self.fatal = fatal
        self.on_decode = on_decode  # gets each decode step's batch size, on the event loop of one of its requests
        self.max_loras = max_loras  # distinct LoRA adapters in one step (0: no bound)
        self._inbox: queue.SimpleQueue[tuple[str, Any]] = queue.SimpleQueue()
        self._pending: deque[Sequence] = deque()  # submitted, waiting for a slot
        self._prefilling: deque[Sequence] = deque()
        self._decoding: list[Sequence] = []
        self._free_slots = list(range(max_num_seqs))
        self._dead: str | None = None
        self._lock = threading.Lock()
        self._stopping = False
        self.steps = 0  # decode steps run (for tests and stats)

    # ------------------------------------------------------------------ event-loop side
    @property
    def dead_reason(self) -> str | None:
        return self._dead

    def submit(self, seq: Sequence) -> None:
        with self._lock:  # fail_all cannot miss a submission racing with it
            if self._dead is not None:
                raise EngineDeadError(f"engine is dead: {self._dead}", retry_after=10)
            self._inbox.put(("submit", seq))

    def cancel(self, seq: Sequence) -> None:
        seq.cancelled = True
        self._inbox.put(("wake", None))  # a sequence still waiting for a slot must leave too

    def call(self, fn: Callable[[StepModel], Any]) -> concurrent.futures.Future[Any]:
        """Run `fn(model)` on the scheduler thread at the next step boundary (loading or unloading an adapter);
        the future has its result or its exception."""
        future: concurrent.futures.Future[Any] = concurrent.futures.Future()
        with self._lock:
            if self._dead is not None:
                future.set_exception(EngineDeadError(f"engine is dead: {self._dead}", retry_after=10))
                return future
            self._inbox.put(("call", (fn, future)))
        return future

    def stop(self) -> None:
        """Ask `run` to return after the current step (every live sequence is told it left)."""
        self._inbox.put(("stop", None))

    # ------------------------------------------------------------------ scheduler thread
    @property
    def live(self) -> list[Sequence]:
        return [*self._pending, *self._prefilling, *self._decoding]

    def has_work(self) -> bool:
        return bool(self._prefilling or self._decoding or self._pending)

    def run(self, *, idle_s: float | None = None, on_idle: Callable[[], None] | None = None) -> None:
        """Serve until `stop()`. `on_idle` runs every `idle_s` without work (DeepSpeed's heartbeat).

        A `fatal` error ends the loop: every live and later request gets EngineDeadError, and it is re-raised.
        """
        import torch

        try:
            with torch.inference_mode():
                while True:
                    if not self._take_inbox(block=not self.has_work(), timeout=idle_s):
                        return
                    if not self.has_work():
                        if on_idle is not None:
                            on_idle()
                        continue
                    self.step()
        except BaseException as exc:
            self.fail_all(f"{type(exc).__name__}: {exc}")
            raise
        finally:
            outbox = _Outbox(self.on_decode)
            for seq in self.live:
                self._leave(seq, outbox)
            outbox.flush()

    def _take_inbox(self, *, block: bool, timeout: float | None) -> bool:
        """Move every submission waiting in the inbox into the scheduler; False once stop was asked."""
        items = []
        try:
            items.append(self._inbox.get(timeout=timeout) if block else self._inbox.get_nowait())
            while True:
                items.append(self._inbox.get_nowait())
        except queue.Empty:
            pass
        for kind, item in items:
            if kind == "submit" and item is not None:
                self._pending.append(item)
            elif kind == "call":
                self._run_call(*item)
            elif kind == "stop":
                self._stopping = True
        return not self._stopping

    def _run_call(self, fn: Callable[[StepModel], Any], future: concurrent.futures.Future[Any]) -> None:
        if self._dead is not None:
            future.set_exception(EngineDeadError(f"engine is dead: {self._dead}", retry_after=10))
            return
        try:
            future.set_result(fn(self.model))
        except self.fatal:
            raise
        except Exception as exc:
            future.set_exception(exc)

    def fail_all(self, reason: str) -> None:
        """The engine is dead: tell every live sequence, refuse later submissions (also those in flight)."""
        with self._lock:
            self._dead = reason
            self._take_inbox(block=False, timeout=None)
        outbox = _Outbox(self.on_decode)
        for seq in self.live:
            outbox.event(seq, "dead", reason)
            self._leave(seq, outbox)
        outbox.flush()

    def step(self) -> None:
        """One scheduler step (see the module docstring): new submissions join here."""
        self._take_inbox(block=False, timeout=None)
        outbox = _Outbox(self.on_decode)
        for seq in [s for s in self.live if s.cancelled]:
            self._leave(seq, outbox)
        for seq in self._admissible():
            seq.slot = heapq.heappop(self._free_slots)
            seq.cache = self.model.new_cache()
            self._prefilling.append(seq)
        self._prefill(outbox)
        self._decode(outbox)
        for sink in outbox.flush():
            for seq in [s for s in self.live if s.sink is sink]:
                self._leave(seq, _Outbox())

    def _admissible(self) -> list[Sequence]:
        """Pending sequences that start this step, first come first served within the free slots; one whose
        adapter would make the step's distinct adapters exceed `max_loras` keeps waiting."""
        if not self.max_loras or all(s.adapter is None for s in self._pending):
            out: list[Sequence] = []
            while self._pending and len(out) < len(self._free_slots):
                out.append(self._pending.popleft())
            return out
        active = {s.adapter for s in (*self._prefilling, *self._decoding) if s.adapter is not None}
        out = []
        kept: deque[Sequence] = deque()
        for seq in self._pending:
            room = len(out) < len(self._free_slots)
            if room and (seq.adapter is None or seq.adapter in active or len(active) < self.max_loras):
                out.append(seq)
                if seq.adapter is not None:
                    active.add(seq.adapter)
            else:
                kept.append(seq)
        self._pending = kept
        return out

    def _prefill(self, outbox: _Outbox) -> None:
        budget = self.prefill_chunk
        for seq in list(self._prefilling):
            if budget <= 0:
                break
            ids = seq.prompt_ids[seq.prefilled : seq.prefilled + self.prefill_chunk]
            try:
                row = (self.model.prefill(seq.cache, ids, seq.prefilled, slot=seq.slot) if seq.adapter is None
                       else self.model.prefill(seq.cache, ids, seq.prefilled, slot=seq.slot, adapter=seq.adapter))
            except self.fatal:
                raise
            except Exception as exc:
                self._fail(seq, exc, outbox)
                continue
            budget -= len(ids)
            seq.prefilled += len(ids)
            if seq.prefilled < len(seq.prompt_ids):
                continue
            self._prefilling.remove(seq)
            if self._emit(seq, row, outbox):
                self._decoding.append(seq)

    def _decode(self, outbox: _Outbox) -> None:
        batch = list(self._decoding)
        if not batch:
            return
        try:
            adapters = [s.adapter for s in batch]
            logits = self.model.decode([s.cache for s in batch], [s.last_token for s in batch],
                                       self.model.rows_for(len(batch)), slots=[s.slot for s in batch],
                                       **({"adapters": adapters} if any(a is not None for a in adapters) else {}))
        except self.fatal:
            raise
        except Exception as exc:
            for seq in batch:
                self._fail(seq, exc, outbox)
            return
        self.steps += 1
        outbox.decoded(batch[0], len(batch))
        for seq, sample in zip(batch, sample_rows(logits, [s.sampler for s in batch]), strict=True):
            if not self._take(seq, sample, outbox):
                self._decoding.remove(seq)

    def _emit(self, seq: Sequence, row: Any, outbox: _Outbox) -> bool:
        """Sample the sequence's next token from its row and post it; False when the sequence left."""
        try:
            sample: Sample | Exception = seq.sampler.next(row)
        except Exception as exc:
            sample = exc
        return self._take(seq, sample, outbox)

    def _take(self, seq: Sequence, sample: Sample | Exception, outbox: _Outbox) -> bool:
        """Post the sequence's sampled token (or fail it); False when the sequence left."""
        if isinstance(sample, Exception):
            self._fail(seq, sample, outbox, remove=False)
            return False
        seq.last_token = sample.token
        outbox.event(seq, "token", sample.token, sample.finish, sample.extras)
        if sample.finish:
            self._leave(seq, outbox, remove=False)
            return False
        return True

    def _fail(self, seq: Sequence, exc: Exception, outbox: _Outbox, *, remove: bool = True) -> None:
        log.error("generation failed for request %s: %s: %s", seq.sampler.req.request_id, type(exc).__name__, exc,
                  exc_info=exc)
        outbox.event(seq, "error", f"{type(exc).__name__}: {exc}")
        self._leave(seq, outbox, remove=remove)

    def _leave(self, seq: Sequence, outbox: _Outbox, *, remove: bool = True) -> None:
        if remove:
            for group in (self._pending, self._prefilling, self._decoding):
                if seq in group:
                    group.remove(seq)
        if seq.slot >= 0:
            self.model.release(seq.slot)
            heapq.heappush(self._free_slots, seq.slot)
            seq.slot = -1
        seq.cache = None
        outbox.event(seq, "left")


class EventStream(Protocol):
    """The request side of a sequence: its events arrive on `queue`, `left` is set once it left the batch."""

    queue: asyncio.Queue[tuple[Any, ...]]
    left: asyncio.Event


async def stream_sequence(scheduler: BatchScheduler, tokenizer: Any, prompt_ids: list[int], req: GenerationRequest,
                          sampler: Sampler, on_abort: Callable[[], None] | None = None
                          ) -> AsyncGenerator[GenerationChunk, None]:
    """Run one request through the scheduler as a stream of chunks (see the module docstring).

    `on_abort` is called when the stream ends before the request finished (client gone, error).
    """
    seq = Sequence(prompt_ids, sampler, LoopSink.of(asyncio.get_running_loop()))
    scheduler.submit(seq)
    async with contextlib.aclosing(stream_events(seq, lambda: scheduler.cancel(seq),
                                                 ChunkAssembler(tokenizer, req.stop, len(prompt_ids)),
                                                 on_abort)) as chunks:
        async for chunk in chunks:
            yield chunk


async def stream_events(seq: EventStream, cancel: Callable[[], None], chunks: ChunkAssembler,
                        on_abort: Callable[[], None] | None = None) -> AsyncGenerator[GenerationChunk, None]:
    """A submitted sequence's events as chunks; on close `cancel()`, then wait until it has left the batch.
    (The scheduler may run in this process, `stream_sequence`, or in the engine process.)"""
    finished = False
    try:
        while True:
            events = [await seq.queue.get()]
            while not seq.queue.empty():
                events.append(seq.queue.get_nowait())
            out: list[GenerationChunk] = []
            for event in events:
                kind = event[0]
                if kind == "dead":
                    raise EngineDeadError(f"engine died during the request: {event[1]}", retry_after=10)
                if kind == "error":
                    raise EngineError(f"generation failed: {event[1]}")
                _, token, finish, extras = event
                chunk = chunks.push(token, finish, logprob_of(extras))
                if chunk is not None:
                    out.append(chunk)
                if chunks.done:
                    break
            if out:
                yield merge_chunks(out)
            if chunks.done:
                finished = True
                return
    finally:
        cancel()
        if not finished and on_abort is not None:
            on_abort()
        # hold the caller's admission slot until the sequence has really left the batch
        await asyncio.shield(seq.left.wait())
