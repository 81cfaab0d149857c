"""Which LoRA adapters an engine holds, decided once for every engine: `AdapterCache`.

An engine with a `lora_config` asks its cache for a request's adapter (`acquire`): the folder is checked
(`app.engines.lora.AdapterFolder`: 404/400 before anything loads), the adapter is loaded on first use through the
engine's own `load` (PEFT layers in the transformers engine, `add_lora` in vLLM) and stays held until it is the
least recently used one and room is needed: at most `max_num_adapters_per_replica` are held, an adapter in use by
a running or waiting request is never unloaded (a request for yet another adapter then waits for one to become
idle), and concurrent first requests for one adapter load it once. `hold`/`drop` are the same without a request:
Ray Serve's model multiplexing calls them when it loads and evicts an adapter on a replica
(`app.ray_serve.llm_server`), so Serve's view of what a replica holds and the engine's stay the same.

Metrics (labels model, engine, adapter): loads, evictions, the held gauge; requests and output tokens per adapter
are counted by the engine skeleton.
"""

from __future__ import annotations

import asyncio
import logging
from collections import Counter, OrderedDict
from collections.abc import Awaitable, Callable

from app import metrics
from app.engines.base import EngineError, InvalidRequestError
from app.engines.lora import AdapterFolder, AdapterInfo
from app.metrics import MetricsSink

log = logging.getLogger(__name__)


class AdapterCache:
    """LRU of loaded adapters with in-use counts; `load`/`unload` are the engine's (called one at a time)."""

    def __init__(self, folder: AdapterFolder, *, load: Callable[[AdapterInfo], Awaitable[None]],
                 unload: Callable[[str], Awaitable[None]], sink: MetricsSink, labels: dict[str, str]):
        self.folder = folder
        self.capacity = folder.max_adapters
        self._load = load
        self._unload = unload
        self._sink = sink
        self._labels = labels
        self.held: OrderedDict[str, AdapterInfo] = OrderedDict()
        self.in_use: Counter[str] = Counter()
        self._loading: dict[str, asyncio.Future[None]] = {}
        self._dropped: set[str] = set()  # asked to go while in use: unloaded once idle
        self._waiters: list[asyncio.Future[None]] = []
        # load/unload one at a time (the engine's calls are not reentrant); a lock per event loop (tests drive one
        # engine from several loops, as the in-process scheduler allows)
        self._lock: tuple[asyncio.AbstractEventLoop, asyncio.Lock] | None = None

    def names(self) -> list[str]:
        return list(self.held)

    async def acquire(self, name: str) -> AdapterInfo:
        """The adapter, loaded and marked in use until `release(name)`."""
        info = await self._ensure(name)
        self.in_use[name] += 1
        self._dropped.discard(name)
        return info

    async def release(self, name: str) -> None:
        self.in_use[name] -= 1
        if self.in_use[name] <= 0:
            del self.in_use[name]
            if name in self._dropped:
                await self._evict(name)
            self._wake()

    async def hold(self, name: str) -> AdapterInfo:
        """Load the adapter (if it is not held) without a request (Serve's multiplexing loads it so)."""
        info = await self._ensure(name)
        self._dropped.discard(name)
        return info

    async def drop(self, name: str) -> None:
        """Unload the adapter now, or once the requests using it are done."""
        if name not in self.held:
            return
        if self.in_use[name]:
            self._dropped.add(name)
        else:
            await self._evict(name)

    # ------------------------------------------------------------------ internals
    def _wake(self) -> None:
        waiters, self._waiters = self._waiters, []
        for w in waiters:
            if not w.done():
                w.set_result(None)

    def _locked(self) -> asyncio.Lock:
        loop = asyncio.get_running_loop()
        if self._lock is None or self._lock[0] is not loop:
            self._lock = (loop, asyncio.Lock())
        return self._lock[1]

    async def _ensure(self, name: str) -> AdapterInfo:
        info = await asyncio.to_thread(self.folder.check, name)  # 404 / 400 before anything loads
        while True:
            held = self.held.get(name)
            if held is not None:
                self.held.move_to_end(name)
                return held
            pending = self._loading.get(name)
            if pending is not None:
                await asyncio.shield(pending)
                continue
            if len(self.held) + len(self._loading) >= self.capacity:
                victim = next((n for n in self.held if not self.in_use[n]), None)
                if victim is None:  # every held adapter is in use: wait until one is idle
                    waiter = asyncio.get_running_loop().create_future()
                    self._waiters.append(waiter)
                    await waiter
                    continue
                await self._evict(victim)
                continue
            return await self._load_now(info)

    async def _load_now(self, info: AdapterInfo) -> AdapterInfo:
        done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._loading[info.name] = done
        try:
            async with self._locked():
                try:
                    await self._load(info)
                except EngineError:
                    raise
                except Exception as exc:
                    log.warning("model %s: adapter %s failed to load: %s: %s", self.folder.model_id, info.name,
                                type(exc).__name__, exc)
                    raise InvalidRequestError(
                        f"adapter {self.folder.model_id}:{info.name} cannot be served: it failed to load "
                        f"({type(exc).__name__}: {exc})", param="model") from None
            self.held[info.name] = info
            self._sink.inc(metrics.LORA_LOADS, {**self._labels, "adapter": info.name})
            self._sink.set_gauge(metrics.LORA_HELD, self._labels, len(self.held))
            log.info("model %s: loaded adapter %s (rank %d) from %s; %d of %d held", self.folder.model_id, info.name,
                     info.rank, info.path, len(self.held), self.capacity)
            return info
        finally:
            del self._loading[info.name]
            done.set_result(None)
            self._wake()

    async def _evict(self, name: str) -> None:
        if self.held.pop(name, None) is None:
            return
        self._dropped.discard(name)
        async with self._locked():
            try:
                await self._unload(name)
            except Exception:
                log.exception("model %s: unloading adapter %s failed", self.folder.model_id, name)
        self._sink.inc(metrics.LORA_EVICTIONS, {**self._labels, "adapter": name})
        self._sink.set_gauge(metrics.LORA_HELD, self._labels, len(self.held))
        log.info("model %s: unloaded adapter %s; %d of %d held", self.folder.model_id, name, len(self.held),
                 self.capacity)
        self._wake()
