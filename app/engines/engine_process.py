"""The transformers engine in a process of its own, as vLLM runs its EngineCore: `ProcessEngine`.

In one process the server's event loop (HTTP, SSE, JSON) and the engine's decode loop share one GIL: at a
full batch each waits for the other, and the server cannot use a second core however many the machine has.
`ProcessEngine` implements the engine protocol in the server's process and runs a `TransformersEngine` in a
child (`python -m app.engines.engine_process FD`), talking over a socket pair with pickled tuples through
`multiprocessing.connection.Connection`. Everything the engine does stays in the child, unchanged:
admission (429s), tokenization, batching, stop strings, grammar, logprobs; the parent only forwards.

Wire, parent to child: ("start", spec, reason, fallback, through_ray, log_level), ("generate", rid, request),
("abort", rid), ("count", rid, request), ("health", rid), ("shutdown",). Child to parent, one message per
event-loop turn: (events, stats, ready), where an event is ("chunk", rid, GenerationChunk), ("end", rid),
("error", rid, exception), ("reply", rid, value), ("metric", method, name, labels, value), ("started", info)
or ("start_failed", exception). Chunks of a decode step for every running sequence travel as one message.

Lifetimes: the child exits when its socket closes (the server exited or was killed: the kernel closes the
socket, the child reads EOF). A child that exits, or answers no health check for 30 s (then it is killed),
makes the engine dead (`EngineDeadError` for streams in flight, health checks and new requests), which takes
the server out of rotation (nginx, Ray Serve health checks) as a dead scheduler thread does in-process.
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
from collections.abc import AsyncGenerator
from multiprocessing.connection import Connection
from typing import Any

from app import metrics as metric_specs
from app.engines.base import (
    Engine,
    EngineDeadError,
    EngineError,
    EngineInfo,
    EngineNotReadyError,
    EngineSpec,
    EngineStats,
    GenerationChunk,
    GenerationRequest,
)
from app.metrics import MetricsSink

log = logging.getLogger(__name__)

HEALTH_TIMEOUT_S = 30.0  # a child that answers no health check in this long is dead (it is hung)
SHUTDOWN_GRACE_S = 10.0
_SPECS = {spec.name: spec for spec in metric_specs.SPECS}


def _picklable(exc: BaseException) -> BaseException:
    """`exc` if it survives pickling, else a RuntimeError with its type and message (what the parent raises)."""
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
        proc = subprocess.Popen([sys.executable, "-m", "app.engines.engine_process", str(theirs.fileno())],
                                pass_fds=(theirs.fileno(),), stdin=subprocess.DEVNULL, env=env)
    finally:
        theirs.close()
    return proc, Connection(ours.detach())


class ProcessEngine(Engine):
    """The engine protocol in the server's process; a `TransformersEngine` in a child process does the work."""

    def __init__(self, spec: EngineSpec, metrics: MetricsSink, *, reason: str = "", fallback: bool = False):
        from app.engines.hf import ENGINE_NAME, engine_config  # validates engine_kwargs here, before any child

        cfg, _ = engine_config(spec, fallback=fallback)
        self.spec = spec
        self.metrics = metrics
        self._reason = reason
        self._fallback = fallback
        self.info = EngineInfo(model_id=spec.model_id, engine=ENGINE_NAME, model_source=spec.model_source,
                               max_context=cfg.max_model_len or 0, reason="loading",
                               max_parallel=cfg.max_num_seqs + spec.max_waiting,
                               tool_call_parser=spec.tool_call_parser)
        self._proc: subprocess.Popen[bytes] | None = None
        self._conn: Connection | None = None
        self._outbox: queue.SimpleQueue[tuple[Any, ...] | None] = queue.SimpleQueue()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._ids = itertools.count()
        self._streams: dict[int, asyncio.Queue[tuple[Any, ...]]] = {}
        self._calls: dict[int, asyncio.Future[Any]] = {}
        self._started: asyncio.Future[EngineInfo] | None = None
        self._stats = EngineStats()
        self._child_ready = False
        self._dead: str | None = None
        self._stopping = False

    # ------------------------------------------------------------------ lifecycle
    async def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        proc, self._conn = await asyncio.to_thread(_spawn)
        self._proc = proc
        self._started = self._loop.create_future()
        for target, name in ((self._read, "engine-process-reader"), (self._write, "engine-process-writer")):
            threading.Thread(target=target, args=(self._conn, self._loop), name=name, daemon=True).start()
        log.info("model %s: engine process %d started", self.spec.model_id, proc.pid)
        self._send(("start", self.spec, self._reason, self._fallback, self.metrics.exports_through_ray,
                    logging.getLogger().getEffectiveLevel()))
        try:
            self.info = await self._started
        except BaseException:
            await self.shutdown()
            raise

    def _read(self, conn: Connection, loop: asyncio.AbstractEventLoop) -> None:
        """Reader thread: every message from the child, handed to the event loop as it arrives."""
        while True:
            try:
                message = conn.recv()
            except (EOFError, OSError):
                break
            except Exception as exc:  # a message that does not unpickle: the wire is broken
                log.error("engine process sent an unreadable message: %s", exc)
                break
            try:
                loop.call_soon_threadsafe(self._dispatch, message)
            except RuntimeError:  # the loop is closed: nobody is listening
                return
        if self._proc is not None:  # EOF comes as the process exits: wait (here, off the loop) for its code
            with contextlib.suppress(subprocess.TimeoutExpired):
                self._proc.wait(5)
        with contextlib.suppress(RuntimeError):
            loop.call_soon_threadsafe(self._child_gone)

    def _dispatch(self, message: tuple[list[tuple[Any, ...]], EngineStats, bool]) -> None:
        events, self._stats, self._child_ready = message
        for event in events:
            kind = event[0]
            if kind in ("chunk", "end", "error"):
                stream = self._streams.get(event[1])
                if stream is not None:
                    stream.put_nowait(event)
            elif kind == "metric":
                _, method, name, labels, value = event
                getattr(self.metrics, method)(_SPECS[name], labels, value)
            elif kind == "reply":
                future = self._calls.pop(event[1], None)
                if future is not None and not future.done():
                    if isinstance(event[2], BaseException):
                        future.set_exception(event[2])
                    else:
                        future.set_result(event[2])
            elif kind == "started" and self._started is not None and not self._started.done():
                self._started.set_result(event[1])
            elif kind == "start_failed" and self._started is not None and not self._started.done():
                self._started.set_exception(event[1])

    def _child_gone(self) -> None:
        code = self._proc.poll() if self._proc is not None else None
        self._dead = self._dead or (f"the engine process exited (code {code})" if code is not None
                                    else "the engine process closed its connection")
        self._stats = EngineStats()
        if not self._stopping:
            log.error("model %s: %s", self.spec.model_id, self._dead)
        error = EngineDeadError(f"model {self.spec.model_id}: {self._dead}", retry_after=10)
        for stream in self._streams.values():
            stream.put_nowait(("error", None, error))
        for future in self._calls.values():
            if not future.done():
                future.set_exception(error)
        self._calls.clear()
        if self._started is not None and not self._started.done():
            self._started.set_exception(RuntimeError(f"model {self.spec.model_id}: {self._dead} while loading"))

    def _send(self, message: tuple[Any, ...]) -> None:
        """Queue a message for the writer thread: the event loop never waits on the socket (a multi-MB prompt
        takes a while to cross), and messages still arrive in the order they were sent."""
        if self._dead is not None or self._conn is None:
            raise EngineDeadError(f"model {self.spec.model_id}: {self._dead or 'the engine process is not running'}",
                                  retry_after=10)
        self._outbox.put(message)

    def _write(self, conn: Connection, loop: asyncio.AbstractEventLoop) -> None:
        """Writer thread: sends queued messages in order until `None` (shutdown) or a broken connection."""
        while (message := self._outbox.get()) is not None:
            try:
                conn.send(message)
            except OSError as exc:
                log.debug("engine process connection broke: %s", exc)
                with contextlib.suppress(RuntimeError):
                    loop.call_soon_threadsafe(self._child_gone)
                return

    async def _call(self, kind: str, *args: Any) -> Any:
        assert self._loop is not None
        rid = next(self._ids)
        future: asyncio.Future[Any] = self._loop.create_future()
        self._calls[rid] = future
        try:
            self._send((kind, rid, *args))
            return await future
        finally:
            self._calls.pop(rid, None)

    def is_ready(self) -> bool:
        return self._dead is None and self._child_ready

    async def check_health(self) -> None:
        if self._dead is not None:
            raise EngineDeadError(f"model {self.spec.model_id}: {self._dead}")
        if self._conn is None:
            raise EngineNotReadyError(f"model {self.spec.model_id} is still loading", retry_after=5)
        try:
            async with asyncio.timeout(HEALTH_TIMEOUT_S):
                await self._call("health")
        except TimeoutError:
            # hung: end it, so that its streams fail now (the reader sees EOF) instead of waiting on it forever
            self._dead = f"the engine process answered no health check in {HEALTH_TIMEOUT_S:.0f} s"
            if self._proc is not None:
                self._proc.kill()
            raise EngineDeadError(f"model {self.spec.model_id}: {self._dead}") from None

    def stats(self) -> EngineStats:
        return self._stats

    async def count_prompt_tokens(self, request: GenerationRequest) -> int:
        return int(await self._call("count", request))

    async def shutdown(self) -> None:
        self._stopping = True
        self._child_ready = False
        if self._proc is None:
            return
        with contextlib.suppress(EngineError):
            self._send(("shutdown",))
        self._outbox.put(None)
        try:
            await asyncio.to_thread(self._proc.wait, SHUTDOWN_GRACE_S)
        except subprocess.TimeoutExpired:
            log.warning("model %s: engine process %d did not stop in %.0f s; killing it", self.spec.model_id,
                        self._proc.pid, SHUTDOWN_GRACE_S)
            self._proc.kill()
            await asyncio.to_thread(self._proc.wait)
        if self._conn is not None:
            self._conn.close()

    # ------------------------------------------------------------------ requests
    async def generate(self, request: GenerationRequest) -> AsyncGenerator[GenerationChunk, None]:
        rid = next(self._ids)
        stream: asyncio.Queue[tuple[Any, ...]] = asyncio.Queue()
        self._streams[rid] = stream
        ended = False
        try:
            self._send(("generate", rid, request))
            while True:
                event = await stream.get()
                if event[0] == "chunk":
                    yield event[2]
                    continue
                ended = True
                if event[0] == "error":
                    raise event[2]
                return
        finally:
            del self._streams[rid]
            if not ended and self._dead is None:
                with contextlib.suppress(EngineError):
                    self._send(("abort", rid))


# ----------------------------------------------------------------------------- the child


class _ForwardSink:
    """The child's metrics sink: every call travels to the parent's sink with the next message."""

    def __init__(self, child: _Child, exports_through_ray: bool):
        self._child = child
        self.exports_through_ray = exports_through_ray

    def inc(self, spec: metric_specs.MetricSpec, labels: dict[str, str], value: float = 1.0) -> None:
        self._child.emit(("metric", "inc", spec.name, labels, value))

    def set_gauge(self, spec: metric_specs.MetricSpec, labels: dict[str, str], value: float) -> None:
        self._child.emit(("metric", "set_gauge", spec.name, labels, value))

    def observe(self, spec: metric_specs.MetricSpec, labels: dict[str, str], value: float) -> None:
        self._child.emit(("metric", "observe", spec.name, labels, value))

    def render(self) -> tuple[bytes, str]:  # pragma: no cover - the parent renders
        raise NotImplementedError


class _Child:
    """The engine's side: serves the parent's messages on an event loop until the connection closes."""

    def __init__(self, conn: Connection, loop: asyncio.AbstractEventLoop):
        self.conn = conn
        self.loop = loop
        self.engine: Engine | None = None
        self.tasks: dict[int, asyncio.Task[None]] = {}
        self._out: list[tuple[Any, ...]] = []
        self._lock = threading.Lock()
        self._flush_due = False
        self._loop_thread = threading.get_ident()
        self.closed = asyncio.Event()

    def emit(self, event: tuple[Any, ...]) -> None:
        """Queue an event for the parent (any thread); everything queued in one loop turn is one message."""
        with self._lock:
            self._out.append(event)
            if self._flush_due:
                return
            self._flush_due = True
        if threading.get_ident() == self._loop_thread:
            self.loop.call_soon(self._flush)
        else:
            self.loop.call_soon_threadsafe(self._flush)

    def _flush(self) -> None:
        with self._lock:
            events, self._out, self._flush_due = self._out, [], False
        engine = self.engine
        stats = engine.stats() if engine is not None else EngineStats()
        ready = engine is not None and engine.is_ready()
        try:
            self.conn.send((events, stats, ready))
        except OSError:
            self.closed.set()

    def read(self) -> None:
        """Reader thread: the parent's messages, onto the loop; EOF (the parent is gone) ends the child."""
        while True:
            try:
                message = self.conn.recv()
            except (EOFError, OSError):
                break
            self.loop.call_soon_threadsafe(self.handle, message)
        self.loop.call_soon_threadsafe(self.closed.set)
        # an engine whose shutdown hangs must not outlive its server
        threading.Timer(SHUTDOWN_GRACE_S, os._exit, args=(0,)).start()

    def handle(self, message: tuple[Any, ...]) -> None:
        kind = message[0]
        if kind == "generate":
            self.tasks[message[1]] = self.loop.create_task(self._generate(message[1], message[2]))
        elif kind == "abort":
            task = self.tasks.get(message[1])
            if task is not None:
                task.cancel()
        elif kind == "start":
            self.loop.create_task(self._start(*message[1:]))
        elif kind in ("count", "health"):
            self.loop.create_task(self._reply(kind, message[1], *message[2:]))
        elif kind == "shutdown":
            self.closed.set()

    async def _start(self, spec: EngineSpec, reason: str, fallback: bool, through_ray: bool, level: int) -> None:
        from app.engines.hf import TransformersEngine

        logging.getLogger().setLevel(level)
        try:
            engine = TransformersEngine(spec, _ForwardSink(self, through_ray), reason=reason, fallback=fallback)
            await engine.start()
        except Exception as exc:
            log.debug("engine start failed", exc_info=True)
            self.emit(("start_failed", _picklable(exc)))
            return
        self.engine = engine
        self.emit(("started", engine.info))

    async def _reply(self, kind: str, rid: int, *args: Any) -> None:
        try:
            if self.engine is None:
                raise EngineNotReadyError("the engine is still loading", retry_after=5)
            if kind == "count":
                value: Any = await self.engine.count_prompt_tokens(args[0])
            else:
                await self.engine.check_health()
                value = None
        except Exception as exc:
            value = _picklable(exc)
        self.emit(("reply", rid, value))

    async def _generate(self, rid: int, request: GenerationRequest) -> None:
        try:
            if self.engine is None:
                raise EngineNotReadyError("the engine is still loading", retry_after=5)
            async with contextlib.aclosing(self.engine.generate(request)) as chunks:
                async for chunk in chunks:
                    self.emit(("chunk", rid, chunk))
            self.emit(("end", rid))
        except asyncio.CancelledError:  # the parent aborted: it listens no more; stats refresh with the flush
            self.emit(("aborted", rid))
        except Exception as exc:
            self.emit(("error", rid, _picklable(exc)))
        finally:
            self.tasks.pop(rid, None)

    async def serve(self) -> None:
        threading.Thread(target=self.read, name="engine-process-reader", daemon=True).start()
        await self.closed.wait()
        for task in list(self.tasks.values()):
            task.cancel()
        if self.engine is not None:
            await self.engine.shutdown()


def main(fd: int) -> None:
    import signal

    from app.console import setup_logging

    # the server decides when its engine stops (its graceful drain still needs it): a Ctrl-C reaching the whole
    # process group or a SIGTERM sent to every process of a container does not stop the child; EOF does
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    setup_logging()
    conn = Connection(fd)

    async def run() -> None:
        await _Child(conn, asyncio.get_running_loop()).serve()

    try:
        import uvloop  # uvicorn[standard]'s loop, as the server's own
    except ImportError:  # pragma: no cover - uvloop is a dependency
        asyncio.run(run())
    else:
        uvloop.run(run())
    conn.close()


if __name__ == "__main__":
    main(int(sys.argv[1]))
