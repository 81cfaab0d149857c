"""Per-rank logic of the DeepSpeed tensor-parallel mode.

Every rank loads the model and shards it with `deepspeed.init_inference` (AutoTP).
Rank 0 serves the ONE API router (`create_app`) through a `LocalBackend` holding a
`TPEngine`; ranks 1..N run `follow()`.

Protocol (all collectives run on one dedicated thread per rank, each with the
explicit collective timeout):
- every rank loads the model with the transformers model runner (`HFModelRunner`)
  and shards it through `runner.wrap_model`; rank 0 drives the runner's decode loop
  and uses the shared prompt rendering, stop matching and detokenizer; its model
  is wrapped (`wrap_model` again) in `_MirroredModel`, which broadcasts every
  forward call (token ids and cache length) before running it,
  so followers run exactly the same forwards. Tokens are decided on rank 0 only
  and reach the other ranks as the next forward's input ids, so every rank works
  on the same sequence whatever the sampling settings.
- while idle, rank 0 broadcasts a `ping` followed by an all-reduce that every rank
  must join: a killed peer fails it at once, a frozen one at the timeout.
- any failure of a collective marks the engine dead: `/readyz` turns 503, the request
  in flight and queued ones get 503 (`EngineDeadError`), and the rank exits non-zero
  after `dead_linger_s`, which ends the whole group (a rank cannot rejoin).
"""

from __future__ import annotations

import asyncio
import logging
import os
import queue
import sys
import threading
import time
from collections.abc import AsyncGenerator, Callable
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any

from app import compat, metrics
from app.deepspeed.config import DSSettings
from app.engines.admission import AdmissionController
from app.engines.base import (
    Engine,
    EngineDeadError,
    EngineError,
    EngineInfo,
    EngineNotReadyError,
    EngineStats,
    GenerationChunk,
    GenerationRequest,
)
from app.engines.hf_runner import GenerationCancelled, HFEngineConfig, HFModelRunner
from app.engines.text import ChunkAssembler
from app.metrics import MetricsSink, PrometheusSink

log = logging.getLogger(__name__)

ENGINE_NAME = "deepspeed"


class CollectiveError(RuntimeError):
    """A collective (or the forward around it) failed: the group is broken."""


# ----------------------------------------------------------------------------- distributed setup


@dataclass
class RankInfo:
    rank: int
    world_size: int
    local_rank: int
    local_size: int


def rank_info() -> RankInfo:
    """Rank layout from the variables the DeepSpeed launcher sets for every process."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    return RankInfo(
        rank=int(os.environ.get("RANK", "0")),
        world_size=world,
        local_rank=int(os.environ.get("LOCAL_RANK", "0")),
        local_size=int(os.environ.get("LOCAL_SIZE", str(world))),
    )


def init_distributed(settings: DSSettings, info: RankInfo) -> Any:
    """`deepspeed.init_distributed` with an explicit timeout; returns a long-timeout group for loading."""
    import deepspeed
    import torch.distributed as dist

    multi_node = info.local_size != info.world_size
    if multi_node and settings.device == "cpu":
        # DeepSpeed #7625: the CPU shared-memory all-reduce op is used whenever it is loaded, but it is
        # only set up when LOCAL_SIZE == WORLD_SIZE, so multi-node (and torchrun) launches segfault in
        # the first all-reduce. Across VMs shared memory is useless anyway: do not build/load the op
        # (this also skips its ~30 s compile on first start) and force the kernel level to 0 below.
        compat.deepspeed_skip_shm_comm_op()
    backend = "gloo" if settings.device == "cpu" else "nccl"
    timeout = timedelta(seconds=settings.collective_timeout_s)
    deepspeed.init_distributed(dist_backend=backend, timeout=timeout)
    if multi_node:
        compat.deepspeed_disable_shm_all_reduce()  # DeepSpeed #7625 workaround (see above)
    # loading may take much longer than one collective may wait: a separate group for that barrier
    return dist.new_group(backend=backend, timeout=timedelta(seconds=settings.load_timeout_s))


def _device(settings: DSSettings, info: RankInfo) -> str:
    if settings.device.startswith("cuda"):
        import torch

        torch.cuda.set_device(info.local_rank)
        return f"cuda:{info.local_rank}"
    return "cpu"


def _torch_dtype(name: str) -> Any:
    import torch

    return {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}[name]


def load_sharded(settings: DSSettings, info: RankInfo, load_group: Any) -> HFModelRunner:
    """Load the model on this rank with the transformers model runner and shard it with AutoTP."""
    import deepspeed
    import torch.distributed as dist

    runner = HFModelRunner(settings.model, HFEngineConfig(
        device=_device(settings, info), dtype=settings.dtype, max_model_len=settings.max_model_len,
    ), model_id=settings.model_id)
    t0 = time.monotonic()
    runner.load()
    log.info("rank %d: loaded %s in %.1fs; waiting for the other ranks", info.rank, settings.model,
             time.monotonic() - t0)
    dist.barrier(group=load_group)

    def shard(model: Any) -> Any:
        module = deepspeed.init_inference(
            model,
            tensor_parallel={"tp_size": info.world_size},
            dtype=_torch_dtype(settings.dtype),
            replace_with_kernel_inject=False,  # AutoTP: no fused kernels (CPU, any architecture)
        ).module
        module.eval()
        return module

    runner.wrap_model(shard)
    log.info("rank %d: sharded over %d ranks (AutoTP)", info.rank, info.world_size)
    return runner


# ----------------------------------------------------------------------------- wire between ranks


_PING, _END, _SHUTDOWN, _STEP, _OBJECT = range(5)
_CODES = {"ping": _PING, "end": _END, "shutdown": _SHUTDOWN}
_STEP_KEYS = {"input_ids", "past_key_values", "use_cache", "logits_to_keep"}


class _Wire:
    """The collectives of the protocol. Only the collective thread calls these.

    Every message starts with a 4-int header broadcast. A decode step (one token id, the
    cache length and `logits_to_keep`) fits in that header, so each generated token costs
    one small broadcast besides the model's own all-reduces; anything else (the prompt's
    forward) follows as a pickled object.
    """

    def __init__(self, device: str):
        import torch
        import torch.distributed as dist

        self.torch, self.dist, self.device = torch, dist, device
        self.header = torch.zeros(4, dtype=torch.long, device=device)

    def _bcast_header(self, values: list[int]) -> list[int]:
        for i, v in enumerate(values):
            self.header[i] = v
        self.dist.broadcast(self.header, src=0)
        return [int(x) for x in self.header.tolist()]

    def send(self, msg: dict[str, Any]) -> None:
        op = msg["op"]
        if op in _CODES:
            self._bcast_header([_CODES[op], 0, 0, 0])
            return
        kw = msg.get("kwargs", {})
        ids = kw.get("input_ids")
        cache = kw.get("past_key_values")
        if (op == "forward" and set(kw) == _STEP_KEYS and kw["use_cache"] is True
                and isinstance(kw["logits_to_keep"], int) and hasattr(ids, "shape") and tuple(ids.shape) == (1, 1)
                and isinstance(cache, tuple) and cache[0] == "__cache__"):
            self._bcast_header([_STEP, int(cache[1]), int(ids[0, 0]), int(kw["logits_to_keep"])])
            return
        self._bcast_header([_OBJECT, 0, 0, 0])
        self.dist.broadcast_object_list([msg], src=0)

    def recv(self) -> dict[str, Any]:
        code, cache_len, token, keep = self._bcast_header([0, 0, 0, 0])
        if code == _STEP:
            ids = self.torch.tensor([[token]], dtype=self.torch.long)
            return {"op": "forward", "kwargs": {"input_ids": ids, "past_key_values": ("__cache__", cache_len),
                                                "use_cache": True, "logits_to_keep": keep}}
        if code == _OBJECT:
            box: list[Any] = [None]
            self.dist.broadcast_object_list(box, src=0)
            return box[0]
        for name, value in _CODES.items():
            if value == code:
                return {"op": name}
        raise CollectiveError(f"unknown message code {code} from rank 0")

    def all_join(self) -> None:
        """An all-reduce every rank must enter: detects dead or frozen peers."""
        t = self.torch.ones(1, device=self.device)
        self.dist.all_reduce(t)


def _cache_len(cache: Any) -> int:
    return int(cache.get_seq_length()) if cache is not None else 0


class _MirroredModel:
    """Rank 0's model: broadcasts each forward call's inputs, then runs it (followers run the same)."""

    def __init__(self, module: Any, wire: _Wire):
        self._module = module
        self._wire = wire

    def __getattr__(self, name: str) -> Any:
        return getattr(self._module, name)

    def __call__(self, **kwargs: Any) -> Any:
        from transformers import Cache

        msg: dict[str, Any] = {"op": "forward", "kwargs": {}}
        for key, value in kwargs.items():
            if isinstance(value, Cache):
                msg["kwargs"][key] = ("__cache__", _cache_len(value))
            elif hasattr(value, "detach"):
                msg["kwargs"][key] = value.detach().cpu()
            else:
                msg["kwargs"][key] = value
        try:
            self._wire.send(msg)
            return self._module(**kwargs)
        except Exception as exc:
            raise CollectiveError(f"forward across ranks failed: {type(exc).__name__}: {exc}") from exc


def follow(settings: DSSettings, info: RankInfo) -> int:
    """Ranks 1..N: load, shard, then mirror rank 0's forwards until told to stop. Returns the exit code."""
    import torch
    from transformers import DynamicCache

    load_group = init_distributed(settings, info)
    runner = load_sharded(settings, info, load_group)
    model = runner.model
    device = runner.device
    wire = _Wire(device)
    cache: Any = None
    log.info("rank %d: following rank 0", info.rank)
    with torch.inference_mode():
        while True:
            msg = wire.recv()
            op = msg["op"]
            if op == "ping":
                wire.all_join()
            elif op == "end":
                cache = None
            elif op == "shutdown":
                log.info("rank %d: shutdown from rank 0", info.rank)
                return 0
            elif op == "forward":
                kwargs: dict[str, Any] = {}
                for key, value in msg["kwargs"].items():
                    if isinstance(value, tuple) and len(value) == 2 and value[0] == "__cache__":
                        if value[1] == 0:
                            cache = DynamicCache()
                        elif _cache_len(cache) != value[1]:
                            raise CollectiveError(
                                f"rank {info.rank}: cache length {_cache_len(cache)} != rank 0's {value[1]}")
                        value = cache
                    elif isinstance(value, torch.Tensor):
                        value = value.to(device)
                    kwargs[key] = value
                out = model(**kwargs)
                cache = getattr(out, "past_key_values", cache)
            else:
                raise CollectiveError(f"unknown op {op!r} from rank 0")


# ----------------------------------------------------------------------------- rank 0 engine


@dataclass
class _Job:
    prompt_ids: list[int]
    request: GenerationRequest
    max_new: int
    loop: asyncio.AbstractEventLoop
    items: asyncio.Queue[tuple[Any, ...]] = field(default_factory=asyncio.Queue)
    done: asyncio.Event = field(default_factory=asyncio.Event)
    cancel: threading.Event = field(default_factory=threading.Event)

    def post(self, *item: Any) -> None:
        try:
            self.loop.call_soon_threadsafe(self.items.put_nowait, item)
        except RuntimeError:  # loop closed: nobody is listening any more
            pass

    def finish(self) -> None:
        try:
            self.loop.call_soon_threadsafe(self.done.set)
        except RuntimeError:
            pass


class TPEngine(Engine):
    """Rank 0's engine: requests are serialized (one running, bounded queue -> 429) and broadcast."""

    def __init__(self, settings: DSSettings, info: RankInfo, on_dead: Callable[[str], None] | None = None,
                 metrics: MetricsSink | None = None):
        self.settings = settings
        self.rank = info
        self.on_dead = on_dead
        self.metrics = metrics or PrometheusSink()
        self.info = EngineInfo(
            model_id=settings.model_id, engine=ENGINE_NAME, model_source=settings.model,
            max_context=settings.max_model_len or 0, device=settings.device, dtype=settings.dtype,
            reason=f"tensor parallel over {info.world_size} ranks (DeepSpeed AutoTP)",
            tool_call_parser=settings.tool_call_parser,
        )
        self._labels = {"model": settings.model_id, "engine": ENGINE_NAME}
        self._admission = AdmissionController(1, settings.max_waiting, settings.retry_after_s, metrics=self.metrics,
                                              metric_labels=self._labels)
        self.info.max_parallel = self._admission.capacity
        self._jobs: queue.Queue[_Job | None] = queue.Queue()
        self._runner: HFModelRunner | None = None
        self._ready = False
        self._dead_reason: str | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._current: _Job | None = None
        self._started: asyncio.Future[None] | None = None

    # ------------------------------------------------------------------ lifecycle
    async def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._started = self._loop.create_future()
        self.metrics.set_gauge(metrics.MODEL_READY, self._labels, 0)
        self._thread = threading.Thread(target=self._main, name="ds-collectives", daemon=True)
        self._thread.start()
        await asyncio.shield(self._started)
        self.metrics.set_gauge(metrics.MODEL_READY, self._labels, 1)
        self.metrics.set_gauge(metrics.ENGINE_INFO, {**self._labels, "fallback": "false", "reason": self.info.reason},
                               1)

    def _signal_started(self, exc: BaseException | None) -> None:
        def _set() -> None:
            if self._started is not None and not self._started.done():
                if exc is None:
                    self._started.set_result(None)
                else:
                    self._started.set_exception(exc)

        if self._loop is not None:
            try:
                self._loop.call_soon_threadsafe(_set)
            except RuntimeError:
                pass

    def is_ready(self) -> bool:
        return self._ready and self._dead_reason is None

    async def check_health(self) -> None:
        if self._dead_reason:
            raise EngineDeadError(f"tensor-parallel group is dead: {self._dead_reason}")
        if not self._ready:
            raise EngineNotReadyError(f"model {self.info.model_id} is loading on {self.rank.world_size} ranks")

    def stats(self) -> EngineStats:
        return self._admission.stats()

    async def shutdown(self) -> None:
        """Graceful stop: tell the followers to exit (they return 0)."""
        self._ready = False
        if self._thread is not None and self._thread.is_alive() and self._dead_reason is None:
            self._jobs.put(None)
            await asyncio.to_thread(self._thread.join, self.settings.collective_timeout_s)

    # ------------------------------------------------------------------ collective thread
    def _main(self) -> None:
        wire: _Wire | None = None
        try:
            load_group = init_distributed(self.settings, self.rank)
            runner = load_sharded(self.settings, self.rank, load_group)
            wire = _Wire(runner.device)
            mirror_wire = wire
            runner.wrap_model(lambda model: _MirroredModel(model, mirror_wire))
            self.info.max_context = runner.max_context
            self.info.device = runner.device
            self.info.dtype = runner.dtype
            self._runner = runner
            runner.warmup()  # through the mirror: every rank runs it
            wire.send({"op": "end"})
            self._ready = True
            self._signal_started(None)
            log.info("rank 0: %s ready on %d ranks (collective timeout %ss, heartbeat %ss)",
                     self.info.model_id, self.rank.world_size, self.settings.collective_timeout_s,
                     self.settings.heartbeat_period_s)
            self._serve_jobs(wire)
        except BaseException as exc:  # a collective (or loading) failed: the group is broken
            log.error("rank 0: tensor-parallel group failed: %s: %s", type(exc).__name__, exc)
            self._die(f"{type(exc).__name__}: {exc}")
            self._signal_started(EngineDeadError(f"tensor-parallel group failed: {exc}"))
            self._drain_forever()

    def _serve_jobs(self, wire: _Wire) -> None:
        period = self.settings.heartbeat_period_s
        while True:
            try:
                job = self._jobs.get(timeout=period)
            except queue.Empty:
                wire.send({"op": "ping"})
                wire.all_join()
                continue
            if job is None:
                wire.send({"op": "shutdown"})
                log.info("rank 0: followers told to shut down")
                return
            self._current = job  # on a collective failure _die() answers it with 503
            self._run_job(job, wire)
            self._current = None
            job.finish()

    def _run_job(self, job: _Job, wire: _Wire) -> None:
        if job.cancel.is_set():
            return
        assert self._runner is not None  # set before any job is served
        try:
            for token, finish, logprob in self._runner.decode_steps(job.prompt_ids, job.request, job.max_new,
                                                                   job.cancel):
                job.post("token", token, finish, logprob)
                if finish:
                    break
        except GenerationCancelled:
            pass
        except CollectiveError:
            raise
        except Exception as exc:  # rank 0 only (e.g. sampling): the followers are waiting, the group is fine
            log.exception("generation failed for request %s", job.request.request_id)
            job.post("error", f"{type(exc).__name__}: {exc}")
        try:
            wire.send({"op": "end"})
        except Exception as exc:
            raise CollectiveError(f"broadcast failed: {exc}") from exc

    def _die(self, reason: str) -> None:
        self._dead_reason = reason
        self._ready = False
        self.metrics.set_gauge(metrics.MODEL_READY, self._labels, 0)
        if self._current is not None:
            self._current.post("dead", reason)
            self._current.finish()
        if self.on_dead is not None and self._loop is not None:
            try:
                self._loop.call_soon_threadsafe(self.on_dead, reason)
            except RuntimeError:
                pass

    def _drain_forever(self) -> None:
        """After death: answer every job that still arrives with 'dead'."""
        while True:
            job = self._jobs.get()
            if job is None:
                return
            job.post("dead", self._dead_reason or "dead")
            job.finish()

    # ------------------------------------------------------------------ requests
    def _check_alive(self) -> None:
        if self._dead_reason:
            raise EngineDeadError(f"tensor-parallel group is dead: {self._dead_reason}", retry_after=10)
        if not self._ready:
            raise EngineNotReadyError(f"model {self.info.model_id} is still loading", retry_after=5)

    def _ready_runner(self) -> HFModelRunner:
        self._check_alive()
        assert self._runner is not None  # set before the engine reports ready
        return self._runner

    async def generate(self, request: GenerationRequest) -> AsyncGenerator[GenerationChunk, None]:
        runner = self._ready_runner()
        prompt_ids = runner.prompt_ids(request)
        max_new = runner.max_new_tokens(len(prompt_ids), request, self.settings.default_max_tokens)
        async with self._admission.admitted(self._run(prompt_ids, request, max_new)) as chunks:
            async for chunk in chunks:
                yield chunk

    async def _run(
        self, prompt_ids: list[int], req: GenerationRequest, max_new: int
    ) -> AsyncGenerator[GenerationChunk, None]:
        runner = self._ready_runner()  # again: the group may have died while this request waited for its slot
        chunks = ChunkAssembler(runner.tokenizer, req.stop, len(prompt_ids))
        job = _Job(prompt_ids, req, max_new, asyncio.get_running_loop())
        self._jobs.put(job)
        finished = False
        try:
            while True:
                item = await job.items.get()
                kind = item[0]
                if kind == "dead":
                    raise EngineDeadError(f"tensor-parallel group died during the request: {item[1]}")
                if kind == "error":
                    raise EngineError(f"generation failed: {item[1]}")
                _, token, finish, logprob = item
                chunk = chunks.push(token, finish, logprob)
                if chunk is not None:
                    yield chunk
                if chunks.done:
                    finished = True
                    return
        finally:
            job.cancel.set()
            if not finished:
                self.metrics.inc(metrics.ABORTED, self._labels)
            # keep the slot until the collective thread is done with this job (the next one must wait)
            await asyncio.shield(job.done.wait())


# ----------------------------------------------------------------------------- entrypoints


def serve_rank0(settings: DSSettings, info: RankInfo) -> int:
    """Rank 0: the one API (create_app) on uvicorn over a LocalBackend holding the TPEngine."""
    import uvicorn

    from app.api.app import create_app
    from app.api.backend import LocalBackend

    state: dict[str, Any] = {"dead": None}
    server: uvicorn.Server | None = None

    def on_dead(reason: str) -> None:
        state["dead"] = reason
        linger = settings.dead_linger_s
        log.error("rank 0: group dead (%s); answering 503 for %.1fs, then exiting non-zero", reason, linger)

        def stop() -> None:
            if server is not None:
                server.should_exit = True
        asyncio.get_running_loop().call_later(linger, stop)

    sink = PrometheusSink()
    engine = TPEngine(settings, info, on_dead=on_dead, metrics=sink)
    backend = LocalBackend({settings.model_id: engine}, location=f"rank{info.rank}")
    app = create_app(backend, metrics=sink, api_keys=settings.api_key_list)
    config = uvicorn.Config(app, host=settings.host, port=settings.port, log_level=settings.log_level,
                            timeout_graceful_shutdown=5, access_log=False)
    server = uvicorn.Server(config)
    log.info("rank 0: serving %s on http://%s:%s", settings.model_id, settings.host, settings.port)
    server.run()
    if state["dead"] is not None:
        return 1
    return 0


def run_rank(settings: DSSettings) -> int:
    """Entry of `python -m app deepspeed serve` on every rank (env set by the DeepSpeed launcher)."""
    if not settings.model:
        raise ValueError("no model: set DS_MODEL (the same path on every VM) or pass --model")
    info = rank_info()
    log.info("rank %d/%d (local %d/%d) starting", info.rank, info.world_size, info.local_rank, info.local_size)
    try:
        code = serve_rank0(settings, info) if info.rank == 0 else follow(settings, info)
    except Exception as exc:
        log.error("rank %d: %s: %s", info.rank, type(exc).__name__, exc)
        code = 1
    sys.stdout.flush()
    sys.stderr.flush()
    # torch.distributed / DeepSpeed teardown can block on a broken group: leave at once
    os._exit(code)
