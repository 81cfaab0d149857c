"""Per-rank logic of the DeepSpeed tensor-parallel mode.

Every rank loads the model and shards it with `deepspeed.init_inference` (AutoTP).
Rank 0 serves the ONE API router (`create_app`) through a `LocalBackend` holding a
`TPEngine`; ranks 1..N run `follow()`.

Protocol (all collectives run on one dedicated thread per rank, each with the
explicit collective timeout):
- every rank loads the model with the transformers model runner (`HFModelRunner`)
  and shards it through `runner.wrap_model`; rank 0 runs the transformers engine's
  continuous-batching loop (`BatchScheduler`) on its collective thread, over
  `_MirroredModel`: a `RaggedModel` that broadcasts each forward's PLAN before running
  it (a prefill chunk: slot, start and the prompt ids; a decode step: the slots and
  tokens of every running sequence, the padded row count, a cache-length checksum,
  and the slots that left since the last message). Followers keep one `DynamicCache`
  per slot and replay the same `RaggedModel` calls, so every rank runs exactly the same
  batched forwards. A decode step of B sequences costs one fixed-size header broadcast
  (`_Wire`), i.e. what one token cost before batching; tokens are decided on rank 0 only
  and reach the other ranks as the next step's input, whatever the sampling settings.
- while idle, rank 0 broadcasts a `ping` followed by an all-reduce that every rank
  must join: a killed peer fails it at once, a frozen one at the timeout.
- any failure of a collective marks the engine dead: `/readyz` turns 503, the requests
  in flight and queued ones get 503 (`EngineDeadError`), and the rank exits non-zero
  after `dead_linger_s`, which ends the whole group (a rank cannot rejoin).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import sys
import threading
import time
from collections.abc import AsyncGenerator, Callable, Sequence
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

from app import compat, metrics
from app.deepspeed.config import DSSettings
from app.engines.base import (
    EngineDeadError,
    EngineError,
    EngineInfo,
    EngineNotReadyError,
    GenerationChunk,
    GenerationRequest,
    InvalidRequestError,
    missing_local_model,
)
from app.engines.hf.batching import BatchScheduler, stream_sequence
from app.engines.hf.ragged import RaggedModel
from app.engines.hf.runner import HFEngineConfig, HFModelRunner
from app.engines.skeleton import EngineSkeleton
from app.metrics import MetricsSink, PrometheusSink
from app.settings import model_aliases

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
    problem = missing_local_model(settings.model)
    if problem:  # DS_MODEL is the same path on every VM: say which rank's VM lacks it, not the hub client's error
        raise RuntimeError(f"rank {info.rank} ({socket.gethostname()}): DS_MODEL {problem}")
    import deepspeed
    import torch.distributed as dist

    runner = HFModelRunner(settings.model, HFEngineConfig(
        device=_device(settings, info), dtype=settings.dtype, max_model_len=settings.max_model_len,
        max_num_seqs=settings.max_num_seqs, prefill_chunk_tokens=settings.prefill_chunk_tokens,
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


_PING, _SHUTDOWN, _PREFILL, _DECODE, _RELEASE = range(1, 6)
_HEAD = 6  # code, n_free, and four op fields; then the payload


class _Wire:
    """The collectives of the protocol. Only the collective thread calls these.

    Every message is one broadcast of a fixed-size long tensor: [code, n_free, a, b, c, d, payload...] with
    room for 3 x max_num_seqs payload entries (the slots that left, then the op's own lists), so a decode step
    of the whole batch fits in it; a prefill chunk's token ids follow as a second broadcast of exactly that
    many ids. Every rank builds the wire from the same DS_MAX_NUM_SEQS.
    """

    def __init__(self, device: str, max_num_seqs: int):
        import torch
        import torch.distributed as dist

        self.torch, self.dist, self.device = torch, dist, device
        self.max_num_seqs = max_num_seqs
        self.header = torch.zeros(_HEAD + 3 * max_num_seqs, dtype=torch.long, device=device)

    def send(self, code: int, fields: tuple[int, ...] = (), *, free: Sequence[int] = (),
             lists: tuple[list[int], ...] = ()) -> None:
        h = [code, len(free), *fields, *([0] * (4 - len(fields)))]
        payload = [*free, *(x for lst in lists for x in lst)]
        values = h + payload
        self.header.zero_()
        self.header[: len(values)] = self.torch.tensor(values, dtype=self.torch.long)
        self.dist.broadcast(self.header, src=0)

    def recv(self) -> tuple[int, list[int], list[int], list[int]]:
        """(code, four fields, freed slots, the rest of the payload)."""
        self.dist.broadcast(self.header, src=0)
        values = [int(x) for x in self.header.tolist()]
        n_free = values[1]
        return values[0], values[2:_HEAD], values[_HEAD : _HEAD + n_free], values[_HEAD + n_free :]

    def send_ids(self, ids: list[int]) -> None:
        self.dist.broadcast(self.torch.tensor(ids, dtype=self.torch.long, device=self.device), src=0)

    def recv_ids(self, n: int) -> list[int]:
        box = self.torch.zeros(n, dtype=self.torch.long, device=self.device)
        self.dist.broadcast(box, src=0)
        return [int(x) for x in box.tolist()]

    def all_join(self) -> None:
        """An all-reduce every rank must enter: detects dead or frozen peers."""
        t = self.torch.ones(1, device=self.device)
        self.dist.all_reduce(t)


def _checksum(caches: list[Any]) -> int:
    return sum(int(c.get_seq_length()) for c in caches)


class _MirroredModel(RaggedModel):
    """Rank 0's forwards: each call's plan is broadcast first, then run (the followers run the same)."""

    def __init__(self, base: RaggedModel, wire: _Wire):
        super().__init__(base.model, vocab_size=base.vocab_size, device=base.device, granule=base.granule,
                         batched=base.batched)
        self._wire = wire
        self._freed: list[int] = []

    def _take_freed(self) -> list[int]:
        freed, self._freed = self._freed, []
        return freed

    def prefill(self, cache: Any, ids: Sequence[int], start: int, *, slot: int = 0, adapter: str | None = None) -> Any:
        if adapter is not None:  # TPEngine refuses adapter requests before they reach the scheduler
            raise ValueError("LoRA adapters are not broadcast to the other ranks")
        try:
            self._wire.send(_PREFILL, (slot, start, len(ids)), free=self._take_freed())
            self._wire.send_ids(list(ids))
            return super().prefill(cache, ids, start, slot=slot)
        except Exception as exc:
            raise CollectiveError(f"prefill across ranks failed: {type(exc).__name__}: {exc}") from exc

    def decode(self, caches: Sequence[Any], tokens: Sequence[int], rows: int | None = None, *,
               slots: Sequence[int] | None = None, adapters: Sequence[str | None] | None = None) -> Any:
        if adapters is not None and any(a is not None for a in adapters):
            raise ValueError("LoRA adapters are not broadcast to the other ranks")
        rows = rows if rows is not None else self.rows_for(len(caches))
        slot_list = list(slots) if slots is not None else list(range(len(caches)))
        try:
            self._wire.send(_DECODE, (len(caches), rows, _checksum(list(caches))), free=self._take_freed(),
                            lists=(slot_list, list(tokens)))
            return super().decode(caches, tokens, rows, slots=slots)
        except Exception as exc:
            raise CollectiveError(f"decode step across ranks failed: {type(exc).__name__}: {exc}") from exc

    def release(self, slot: int) -> None:
        self._freed.append(slot)  # travels with the next message

    def idle(self) -> None:
        """Heartbeat while nothing runs (and the slots that left, if no step carried them)."""
        freed = self._take_freed()
        if freed:
            self._wire.send(_RELEASE, free=freed)
        self._wire.send(_PING)
        self._wire.all_join()


def follow(settings: DSSettings, info: RankInfo) -> int:
    """Ranks 1..N: load, shard, then replay rank 0's forwards until told to stop. Returns the exit code."""
    import torch

    load_group = init_distributed(settings, info)
    runner = load_sharded(settings, info, load_group)
    model = runner.step_model()
    wire = _Wire(runner.device, settings.max_num_seqs)
    caches: dict[int, Any] = {}
    log.info("rank %d: following rank 0", info.rank)
    with torch.inference_mode():
        while True:
            code, fields, freed, payload = wire.recv()
            for slot in freed:
                caches.pop(slot, None)
            if code == _PING:
                wire.all_join()
            elif code == _RELEASE:
                pass
            elif code == _SHUTDOWN:
                log.info("rank %d: shutdown from rank 0", info.rank)
                return 0
            elif code == _PREFILL:
                slot, start, n = fields[:3]
                ids = wire.recv_ids(n)
                if start == 0:
                    caches[slot] = model.new_cache()
                cache = caches.get(slot)
                if cache is None or cache.get_seq_length() != start:
                    raise CollectiveError(f"rank {info.rank}: slot {slot} is not at position {start} as on rank 0")
                model.prefill(cache, ids, start, slot=slot)
            elif code == _DECODE:
                n, rows, check = fields[:3]
                slots, tokens = payload[:n], payload[n : 2 * n]
                try:
                    rows_caches = [caches[s] for s in slots]
                except KeyError as exc:
                    raise CollectiveError(f"rank {info.rank}: rank 0 decodes unknown slot {exc}") from None
                if _checksum(rows_caches) != check:
                    raise CollectiveError(
                        f"rank {info.rank}: cache lengths {_checksum(rows_caches)} != rank 0's {check}")
                model.decode(rows_caches, tokens, rows, slots=slots)
            else:
                raise CollectiveError(f"unknown message code {code} from rank 0")


# ----------------------------------------------------------------------------- rank 0 engine


class TPEngine(EngineSkeleton):
    """Rank 0's engine: the continuous-batching scheduler over the mirrored (broadcasting) model."""

    name = ENGINE_NAME

    def __init__(self, settings: DSSettings, info: RankInfo, on_dead: Callable[[str], None] | None = None,
                 metrics: MetricsSink | None = None):
        self.settings = settings
        self.rank = info
        self.on_dead = on_dead
        engine_info = EngineInfo(
            model_id=settings.model_id, engine=ENGINE_NAME, model_source=settings.model,
            max_context=settings.max_model_len or 0, device=settings.device, dtype=settings.dtype,
            reason=f"tensor parallel over {info.world_size} ranks (DeepSpeed AutoTP)",
            tool_call_parser=settings.tool_call_parser,
        )
        super().__init__(engine_info, metrics_sink=metrics, max_running=settings.max_num_seqs,
                         max_waiting=settings.max_waiting, retry_after_s=settings.retry_after_s,
                         default_max_tokens=settings.default_max_tokens)
        self._runner: HFModelRunner | None = None
        self._scheduler: BatchScheduler | None = None
        self._died: str | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._started: asyncio.Future[None] | None = None

    # ------------------------------------------------------------------ lifecycle
    async def _load(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._started = self._loop.create_future()
        self._thread = threading.Thread(target=self._main, name="ds-collectives", daemon=True)
        self._thread.start()
        await asyncio.shield(self._started)

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

    def _no_adapters_error(self, name: str) -> EngineError:
        return InvalidRequestError(
            f"model {self.info.model_id}:{name}: the DeepSpeed tensor-parallel engine cannot apply LoRA adapters (its "
            "sharded layers are not PEFT's); serve adapters with the Ray cluster (vLLM) or the transformers engine",
            param="model")

    def _dead_reason(self) -> str | None:
        return self._died

    def _dead_error(self, reason: str) -> EngineDeadError:
        return EngineDeadError(f"tensor-parallel group is dead: {reason}", retry_after=10)

    async def check_health(self) -> None:
        if not self._ready and self._died is None:
            raise EngineNotReadyError(f"model {self.info.model_id} is loading on {self.rank.world_size} ranks")
        self._check_serving()

    async def shutdown(self) -> None:
        """Graceful stop: tell the followers to exit (they return 0)."""
        self._ready = False
        if self._thread is not None and self._thread.is_alive() and self._died is None:
            if self._scheduler is not None:
                self._scheduler.stop()
            await asyncio.to_thread(self._thread.join, self.settings.collective_timeout_s)

    # ------------------------------------------------------------------ collective thread
    def _main(self) -> None:
        try:
            load_group = init_distributed(self.settings, self.rank)
            runner = load_sharded(self.settings, self.rank, load_group)
            wire = _Wire(runner.device, self.settings.max_num_seqs)
            model = _MirroredModel(runner.step_model(), wire)
            self.info.max_context = runner.max_context
            self.info.device = runner.device
            self.info.dtype = runner.dtype
            self._runner = runner
            runner.warmup(model)  # through the mirror: every rank runs it
            model.idle()
            self._scheduler = BatchScheduler(model, max_num_seqs=self.settings.max_num_seqs,
                                             prefill_chunk=self.settings.prefill_chunk_tokens,
                                             fatal=(CollectiveError,), on_decode=self._observe_batch)
            self._ready = True
            self._signal_started(None)
            log.info("rank 0: %s ready on %d ranks (batch %d, collective timeout %ss, heartbeat %ss)",
                     self.info.model_id, self.rank.world_size, self.settings.max_num_seqs,
                     self.settings.collective_timeout_s, self.settings.heartbeat_period_s)
            self._scheduler.run(idle_s=self.settings.heartbeat_period_s, on_idle=model.idle)
            wire.send(_SHUTDOWN)
            log.info("rank 0: followers told to shut down")
        except BaseException as exc:  # a collective (or loading) failed: the group is broken
            log.error("rank 0: tensor-parallel group failed: %s: %s", type(exc).__name__, exc)
            self._die(f"{type(exc).__name__}: {exc}")
            self._signal_started(EngineDeadError(f"tensor-parallel group failed: {exc}"))

    def _observe_batch(self, rows: int) -> None:
        self.metrics.observe(metrics.DECODE_BATCH, self._labels, rows)

    def _die(self, reason: str) -> None:
        self._died = reason
        self._ready = False
        self._mark_not_ready()
        if self._scheduler is not None and self._scheduler.dead_reason is None:
            self._scheduler.fail_all(reason)
        if self.on_dead is not None and self._loop is not None:
            try:
                self._loop.call_soon_threadsafe(self.on_dead, reason)
            except RuntimeError:
                pass

    # ------------------------------------------------------------------ requests
    def _ready_runner(self) -> HFModelRunner:
        self._check_serving()
        assert self._runner is not None  # set before the engine reports ready
        return self._runner

    def _render(self, request: GenerationRequest) -> list[int]:
        return self._ready_runner().prompt_ids(request)

    async def _stream(
        self, prompt_ids: list[int], req: GenerationRequest, max_new: int
    ) -> AsyncGenerator[GenerationChunk, None]:
        runner = self._ready_runner()  # again: the group may have died while this request waited for its slot
        assert self._scheduler is not None
        sampler = await runner.sampler_off_loop(req, max_new)
        stream = stream_sequence(self._scheduler, runner.tokenizer, prompt_ids, req, sampler,
                                 on_abort=self._count_abort)
        try:
            async with contextlib.aclosing(stream) as chunks:
                async for chunk in chunks:
                    yield chunk
        except EngineDeadError as exc:
            raise EngineDeadError(f"tensor-parallel group died during the request: {exc.message}",
                                  retry_after=10) from None


# ----------------------------------------------------------------------------- entrypoints


def serve_rank0(settings: DSSettings, info: RankInfo) -> int:
    """Rank 0: the one API (create_app) on the kit's guarded uvicorn server over a LocalBackend holding the
    TPEngine."""
    from app.api.app import create_app
    from app.api.backend import LocalBackend
    from app.http_guard import DrainingServer, guarded_server

    state: dict[str, Any] = {"dead": None}
    server: DrainingServer | None = None

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
    backend = LocalBackend({settings.model_id: engine}, location=f"rank{info.rank}",
                           aliases=model_aliases(settings.model, settings.model_id))
    app = create_app(backend, metrics=sink, api_keys=settings.api_key_list, max_body_bytes=settings.max_body_bytes,
                     sse_keepalive_s=settings.sse_keepalive_s, keys_file=settings.keys_file or None,
                     usage_db=settings.usage_db or None)
    # the standalone server's transport guard and drain: slow clients are cut, SIGTERM lets streams finish
    server = guarded_server(app, settings, host=settings.host, port=settings.port, log_level=settings.log_level)
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
