"""The transformers engine's model in a process of its own, as vLLM runs its EngineCore: `RemoteScheduler`.

In one process the server's event loop (HTTP, SSE, JSON, detokenization) and the decode loop share one GIL: at
a full batch each waits for the other and the server cannot use a second core. So by default
(`engine_kwargs.engine_process`) `TransformersEngine` keeps the request side in the server's process
(tokenization, admission, detokenization and stop strings, `stream_events`) and runs the model, the samplers
and the `BatchScheduler` in a child, `python -m app.engines.hf.engine_process FD`, which does nothing else: no
event loop, one thread reading the server's messages, the scheduler thread sending each step's events.

Wire: pickled tuples over a socket pair (`multiprocessing.connection.Connection`). Server to child:
("start", spec, config, log_level), ("submit", rid, prompt_ids, request, max_new), ("cancel", rid),
("ping", rid), ("adapter", rid, "load" | "unload", name, folder), ("shutdown",). Child to server: ("started",
facts) | ("start_failed", exception), ("adapter_done", rid, exception or None), one
("events", [(rid, event), ...], decode_batch) per scheduler step with every sequence's token (the events of
`app.engines.hf.batching`: token, error, dead, left), ("pong", rid, dead_reason), ("dead", reason) when the
scheduler stopped. A request's sampler (its generator, penalties, grammar and logprobs hooks) is built in the
child, in submission order.

Lifetimes: the child exits when its socket closes (the server exited or was killed: the kernel closes it and
the child reads EOF) and ignores SIGINT/SIGTERM meant for its server (a graceful drain still needs it). A
child that exits, or answers no ping for 30 s (then it is killed), makes the engine dead: streams in flight
end with `EngineDeadError`, health checks fail and the server leaves rotation, as when the scheduler thread
dies in-process.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import os
import pickle
import queue
import socket
import subprocess
import sys
import threading
from collections.abc import AsyncGenerator, Callable
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from typing import Any

from app.engines.base import EngineDeadError, EngineSpec, GenerationChunk, GenerationRequest
from app.engines.hf.batching import BatchScheduler, EventSink, Sequence, stream_events
from app.engines.hf.runner import HFEngineConfig
from app.engines.text import ChunkAssembler

log = logging.getLogger(__name__)

PING_TIMEOUT_S = 30.0  # a child that answers no ping in this long is hung: it is killed
SHUTDOWN_GRACE_S = 10.0


def _picklable(exc: BaseException) -> BaseException:
    """`exc` if it survives pickling, else a RuntimeError with its type and message (what the server raises)."""
    try:
        pickle.loads(pickle.dumps(exc))
        return exc
    except Exception:
        return RuntimeError(f"{type(exc).__name__}: {exc}")


def _spawn() -> tuple[subprocess.Popen[bytes], Connection]:
    """The child process and this side's connection to it."""
    ours, theirs = socket.socketpair()
    env = dict(os.environ)
    # the child imports `app` as this process does (a Ray worker may have it from its runtime_env)
    env["PYTHONPATH"] = os.pathsep.join(p for p in sys.path if p)
    try:
        proc = subprocess.Popen([sys.executable, "-m", "app.engines.hf.engine_process", str(theirs.fileno())],
                                pass_fds=(theirs.fileno(),), stdin=subprocess.DEVNULL, env=env)
    finally:
        theirs.close()
    return proc, Connection(ours.detach())


@dataclass(eq=False)
class _Remote:
    """A sequence the child runs, as `stream_events` consumes it (on `loop`)."""

    loop: asyncio.AbstractEventLoop
    queue: asyncio.Queue[tuple[Any, ...]] = field(default_factory=asyncio.Queue)
    left: asyncio.Event = field(default_factory=asyncio.Event)


class RemoteScheduler:
    """The server's side of the engine process: starts it, submits sequences, routes their events back."""

    def __init__(self, spec: EngineSpec, config: HFEngineConfig, *, on_decode: Callable[[int], None]):
        self.spec = spec
        self.config = config
        self.on_decode = on_decode
        self.pid: int | None = None
        self._proc: subprocess.Popen[bytes] | None = None
        self._conn: Connection | None = None
        self._outbox: queue.SimpleQueue[tuple[Any, ...] | None] = queue.SimpleQueue()
        self._ids = itertools.count()
        self._seqs: dict[int, _Remote] = {}
        self._pings: dict[int, asyncio.Future[str | None]] = {}
        self._adapter_ops: dict[int, asyncio.Future[None]] = {}
        self._started: asyncio.Future[dict[str, Any]] | None = None
        self._dead: str | None = None
        self._stopping = False

    @property
    def dead_reason(self) -> str | None:
        return self._dead

    # ------------------------------------------------------------------ lifecycle
    async def start(self) -> dict[str, Any]:
        """Spawn the child and load the model there; returns what it measured (max_context, device, dtype)."""
        proc, conn = await asyncio.to_thread(_spawn)
        self._proc, self._conn, self.pid = proc, conn, proc.pid
        self._started = asyncio.get_running_loop().create_future()
        for target, name in ((self._read, "engine-process-reader"), (self._write, "engine-process-writer")):
            threading.Thread(target=target, args=(conn,), name=name, daemon=True).start()
        log.info("model %s: engine process %d started", self.spec.model_id, proc.pid)
        self._send(("start", self.spec, self.config, logging.getLogger().getEffectiveLevel()))
        try:
            return await self._started
        except BaseException:
            await self.shutdown()
            raise

    async def ping(self) -> None:
        """Raise EngineDeadError unless the child answers and its scheduler runs (a hung child is killed)."""
        rid = next(self._ids)
        self._pings[rid] = future = asyncio.get_running_loop().create_future()
        try:
            self._send(("ping", rid))
            async with asyncio.timeout(PING_TIMEOUT_S):
                dead = await future
        except TimeoutError:
            self._dead = f"the engine process answered no health check in {PING_TIMEOUT_S:.0f} s"
            if self._proc is not None:
                self._proc.kill()  # its streams fail now (the reader sees EOF) instead of waiting forever
            raise EngineDeadError(f"model {self.spec.model_id}: {self._dead}") from None
        finally:
            self._pings.pop(rid, None)
        if dead is not None:
            self._dead = self._dead or dead
            raise EngineDeadError(f"model {self.spec.model_id}: {self._dead}")

    async def adapter(self, op: str, name: str, folder: str) -> None:
        """Load ("load") or unload ("unload") LoRA adapter `name` in the child's model, between two steps;
        raises what the child raised."""
        rid = next(self._ids)
        self._adapter_ops[rid] = future = asyncio.get_running_loop().create_future()
        try:
            self._send(("adapter", rid, op, name, folder))
            await future
        finally:
            self._adapter_ops.pop(rid, None)

    async def shutdown(self) -> None:
        self._stopping = True
        if self._proc is None:
            return
        with contextlib.suppress(EngineDeadError):
            self._send(("shutdown",))
        self._outbox.put(None)
        try:
            await asyncio.to_thread(self._proc.wait, SHUTDOWN_GRACE_S)
        except subprocess.TimeoutExpired:
            log.warning("model %s: engine process %d did not stop in %.0f s; killing it", self.spec.model_id,
                        self._proc.pid, SHUTDOWN_GRACE_S)
            self._proc.kill()
            await asyncio.to_thread(self._proc.wait)

    # ------------------------------------------------------------------ requests
    def stream(self, tokenizer: Any, prompt_ids: list[int], req: GenerationRequest, max_new: int,
               on_abort: Callable[[], None] | None = None) -> AsyncGenerator[GenerationChunk, None]:
        """`stream_sequence` with the scheduler in the child: detokenization and stop strings run here."""

        rid = next(self._ids)
        seq = _Remote(asyncio.get_running_loop())
        self._send(("submit", rid, prompt_ids, req, max_new))
        self._seqs[rid] = seq

        def cancel() -> None:
            if not seq.left.is_set():
                with contextlib.suppress(EngineDeadError):
                    self._send(("cancel", rid))

        return stream_events(seq, cancel, ChunkAssembler(tokenizer, req.stop, len(prompt_ids)), on_abort)

    # ------------------------------------------------------------------ wire
    def _send(self, message: tuple[Any, ...]) -> None:
        """Queue a message for the writer thread: the event loop never waits on the socket (a multi-MB prompt
        takes a while to cross), and messages still arrive in the order they were sent."""
        if self._dead is not None or self._conn is None:
            raise EngineDeadError(f"model {self.spec.model_id}: {self._dead or 'the engine process is not running'}",
                                  retry_after=10)
        self._outbox.put(message)

    def _write(self, conn: Connection) -> None:
        while (message := self._outbox.get()) is not None:
            try:
                conn.send(message)
            except OSError as exc:
                log.debug("engine process connection broke: %s", exc)
                return

    def _read(self, conn: Connection) -> None:
        """Reader thread: every message from the child, routed to the event loop of whoever waits for it (an
        engine may serve requests from several loops, as the in-process scheduler does)."""
        while True:
            try:
                message = conn.recv()
            except (EOFError, OSError):
                break
            except Exception as exc:  # a message that does not unpickle: the wire is broken
                log.error("engine process sent an unreadable message: %s", exc)
                break
            self._route(message)
        if self._proc is not None:  # EOF comes as the process exits: wait for its code
            with contextlib.suppress(subprocess.TimeoutExpired):
                self._proc.wait(5)
        conn.close()
        self._child_gone()

    def _route(self, message: tuple[Any, ...]) -> None:
        kind = message[0]
        if kind == "events":
            by_loop: dict[asyncio.AbstractEventLoop, list[tuple[int, _Remote, tuple[Any, ...]]]] = {}
            for rid, event in message[1]:
                seq = self._seqs.get(rid)
                if seq is not None:
                    by_loop.setdefault(seq.loop, []).append((rid, seq, event))
            batch = message[2]
            for seq_loop, items in by_loop.items():
                if not _post(seq_loop, self._deliver, items, batch):  # that loop is closed: nobody listens
                    for rid, _, _ in items:
                        self._seqs.pop(rid, None)
                        self._outbox.put(("cancel", rid))
                batch = 0
        elif kind == "pong":
            future = self._pings.get(message[1])
            if future is not None:
                _post(future.get_loop(), _resolve, future, message[2], None)
        elif kind == "adapter_done":
            op = self._adapter_ops.get(message[1])
            if op is not None:
                _post(op.get_loop(), _resolve, op, None, message[2])
        elif kind == "dead":
            self._dead = self._dead or f"its scheduler stopped: {message[1]}"
        elif kind in ("started", "start_failed") and self._started is not None:
            result, error = (message[1], None) if kind == "started" else (None, message[1])
            _post(self._started.get_loop(), _resolve, self._started, result, error)

    def _deliver(self, items: list[tuple[int, _Remote, tuple[Any, ...]]], batch: int) -> None:
        """On a sequence's loop: its events of one step."""
        for rid, seq, event in items:
            if event[0] == "left":
                self._seqs.pop(rid, None)
                seq.left.set()
            else:
                seq.queue.put_nowait(event)
        if batch:
            self.on_decode(batch)

    def _child_gone(self) -> None:
        """Reader thread, after EOF: the engine is dead; everyone waiting is told on their own loop."""
        code = self._proc.poll() if self._proc is not None else None
        self._dead = self._dead or (f"the engine process exited (code {code})" if code is not None
                                    else "the engine process closed its connection")
        if not self._stopping:
            log.error("model %s: %s", self.spec.model_id, self._dead)
        for rid, seq in list(self._seqs.items()):
            _post(seq.loop, self._deliver, [(rid, seq, ("dead", self._dead)), (rid, seq, ("left",))], 0)
        error = EngineDeadError(f"model {self.spec.model_id}: {self._dead}", retry_after=10)
        waiting: list[asyncio.Future[Any]] = [*self._pings.values(), *self._adapter_ops.values()]
        for future in waiting:
            _post(future.get_loop(), _resolve, future, None, error)
        if self._started is not None:
            _post(self._started.get_loop(), _resolve, self._started, None,
                  RuntimeError(f"model {self.spec.model_id}: {self._dead} while loading"))


def _post(loop: asyncio.AbstractEventLoop, fn: Callable[..., None], *args: Any) -> bool:
    try:
        loop.call_soon_threadsafe(fn, *args)
        return True
    except RuntimeError:  # closed loop
        return False


def _resolve(future: asyncio.Future[Any], result: Any, error: BaseException | None) -> None:
    if not future.done():
        if error is not None:
            future.set_exception(error)
        else:
            future.set_result(result)


# ----------------------------------------------------------------------------- the child


class _ServerLink(EventSink):
    """The sink of every sequence in the child: a step's events go to the server as one message."""

    def __init__(self, conn: Connection):
        self.conn = conn
        self.lock = threading.Lock()  # the scheduler thread and the reader thread both send
        self.seqs: dict[int, Any] = {}  # the live sequences by the server's number (for cancel)

    def send(self, message: tuple[Any, ...]) -> None:
        with self.lock:
            try:
                self.conn.send(message)
            except OSError:  # the server is gone: EOF ends the child
                pass

    def deliver(self, events: list[tuple[Any, tuple[Any, ...]]], decoded_rows: int,
                on_decode: Callable[[int], None] | None) -> bool:
        """(sequence, event) pairs become (request number, event) pairs; the server counts the decode batch."""
        for seq, event in events:
            if event[0] == "left":
                self.seqs.pop(seq.tag, None)
        self.send(("events", [(seq.tag, event) for seq, event in events], decoded_rows))
        return True


class _Child:
    def __init__(self, conn: Connection):
        self.link = _ServerLink(conn)
        self.conn = conn
        self.runner: Any = None
        self.scheduler: Any = None
        self.thread: threading.Thread | None = None
        self.seqs = self.link.seqs

    def serve(self) -> None:
        """Handle the server's messages until EOF or shutdown (this thread); the scheduler has its own."""
        while True:
            try:
                message = self.conn.recv()
            except (EOFError, OSError):
                break
            if message[0] == "shutdown":
                break
            self.handle(message)
        # an engine whose shutdown hangs must not outlive its server; a daemon timer, so that a shutdown that
        # does finish exits now rather than when the timer fires
        deadline = threading.Timer(SHUTDOWN_GRACE_S, os._exit, args=(0,))
        deadline.daemon = True
        deadline.start()
        if self.scheduler is not None:
            self.scheduler.stop()
        if self.thread is not None:
            self.thread.join(SHUTDOWN_GRACE_S)

    def handle(self, message: tuple[Any, ...]) -> None:
        from app.engines.base import EngineError
        from app.engines.hf.sequence_hooks import needs_hooks

        kind = message[0]
        if kind == "submit":
            _, rid, prompt_ids, req, max_new = message
            try:
                hooks = self.runner.sequence_hooks(req) if needs_hooks(req) else []
                sampler = self.runner.sampler(req, max_new, hooks)
                seq = Sequence(prompt_ids, sampler, self.link, tag=rid)
                self.seqs[rid] = seq
                self.scheduler.submit(seq)
            except EngineError as exc:
                self.seqs.pop(rid, None)
                self.link.send(("events", [(rid, ("dead", exc.message)), (rid, ("left",))], 0))
            except Exception as exc:
                self.seqs.pop(rid, None)
                log.exception("request %s could not start", req.request_id)
                self.link.send(("events", [(rid, ("error", f"{type(exc).__name__}: {exc}")), (rid, ("left",))],
                                0))
        elif kind == "cancel":
            live = self.seqs.get(message[1])
            if live is not None:
                self.scheduler.cancel(live)
        elif kind == "ping":
            dead = self.scheduler.dead_reason if self.scheduler is not None else None
            self.link.send(("pong", message[1], dead))
        elif kind == "adapter":
            self.adapter(*message[1:])
        elif kind == "start":
            self.start(*message[1:])

    def adapter(self, rid: int, op: str, name: str, folder: str) -> None:
        def done(future: Any) -> None:
            exc = future.exception()
            self.link.send(("adapter_done", rid, None if exc is None else _picklable(exc)))

        if op == "load":
            future = self.scheduler.call(lambda model: model.load_adapter(name, folder))
        else:
            future = self.scheduler.call(lambda model: model.unload_adapter(name))
        future.add_done_callback(done)

    def start(self, spec: EngineSpec, cfg: HFEngineConfig, level: int) -> None:
        from app.engines.hf.runner import HFModelRunner

        logging.getLogger().setLevel(level)
        try:
            runner = HFModelRunner(spec.model_source, cfg, model_id=spec.model_id)
            runner.load()
            model = runner.step_model()
            runner.warmup(model)
            scheduler = BatchScheduler(model, max_num_seqs=cfg.max_num_seqs, prefill_chunk=cfg.prefill_chunk_tokens,
                                       max_loras=cfg.max_loras or 0)
        except Exception as exc:
            log.debug("engine start failed", exc_info=True)
            self.link.send(("start_failed", _picklable(exc)))
            return
        self.runner, self.scheduler = runner, scheduler
        self.thread = threading.Thread(target=self._run, name="hf-scheduler", daemon=True)
        self.thread.start()
        self.link.send(("started", {"max_context": runner.max_context, "device": runner.device,
                                    "dtype": runner.dtype}))

    def _run(self) -> None:
        try:
            self.scheduler.run()
        except BaseException as exc:  # every request was told (dead events); the server's health turns dead
            log.exception("the scheduler of the engine process stopped")
            self.link.send(("dead", f"{type(exc).__name__}: {exc}"))


def main(fd: int) -> None:
    import signal

    from app.console import setup_logging

    # the server decides when its engine stops (its graceful drain still needs it): a Ctrl-C reaching the whole
    # process group or a SIGTERM sent to every process of a container does not stop the child; EOF does
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    setup_logging()
    conn = Connection(fd)
    _Child(conn).serve()
    conn.close()


if __name__ == "__main__":
    main(int(sys.argv[1]))
