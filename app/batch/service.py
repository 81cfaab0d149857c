"""The batch service a server mounts: the store, the runner and the limits, built from the settings.

`python -m app serve` mounts it when `LLM_BATCH_DIR` is set (its runner then targets the server itself);
`python -m app batch-server` runs it alone (the compose `batch` service, targeting the front door).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from dataclasses import dataclass
from pathlib import Path

from app import metrics
from app.batch.runner import Runner, RunnerConfig
from app.batch.shapes import WINDOW_S
from app.batch.store import Store
from app.client.wire import RetryPolicy
from app.metrics import MetricsSink
from app.settings import Settings

log = logging.getLogger(__name__)

GAUGE_PERIOD_S = 2.0
_LABELS = {"model": "-", "engine": "batch"}
_STATUSES = ("validating", "failed", "in_progress", "finalizing", "completed", "expired", "cancelling", "cancelled")


@dataclass
class BatchLimits:
    max_lines: int = 50_000
    max_file_bytes: int = 200 * 1024 * 1024
    window_s: float | None = None  # overrides the 24 h completion window (tests, short-lived clusters)

    def window_of(self, completion_window: str) -> float:
        return self.window_s if self.window_s is not None else WINDOW_S[completion_window]


class BatchService:
    def __init__(self, store: Store, runner: Runner, limits: BatchLimits, sink: MetricsSink):
        self.store, self.runner, self.limits, self.sink = store, runner, limits, sink
        self._gauges: asyncio.Task[None] | None = None

    @classmethod
    def from_settings(cls, settings: Settings, sink: MetricsSink, target_url: str) -> BatchService:
        store = Store(Path(settings.batch_dir))
        key = settings.batch_api_key or next(iter(settings.api_key_list), "")
        if not key and settings.keys_file:
            log.warning("the batch runner has no key: with only a keys file (KEYS_FILE), set LLM_BATCH_API_KEY to a "
                        "key of it (e.g. one added with --priority batch) or every batch line fails with 401")
        config = RunnerConfig(
            target_url=target_url, api_key=key, concurrency=settings.batch_concurrency,
            per_batch=settings.batch_concurrency_per_batch, max_lines=settings.batch_max_lines,
            request_timeout_s=settings.batch_request_timeout_s,
            policy=RetryPolicy(max_attempts=settings.batch_max_attempts))
        limits = BatchLimits(max_lines=settings.batch_max_lines, max_file_bytes=settings.batch_max_file_bytes,
                             window_s=settings.batch_window_s)
        return cls(store, Runner(store, config, sink), limits, sink)

    async def start(self) -> None:
        await self.runner.start()
        self._gauges = asyncio.create_task(self._publish_loop())

    async def stop(self) -> None:
        if self._gauges is not None:
            self._gauges.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._gauges
        await self.runner.stop()
        self.store.close()

    def publish(self) -> None:
        """Set the batch gauges (statuses, queued lines, requests in flight) from the store."""
        counts = self.store.status_counts()
        for status in _STATUSES:
            self.sink.set_gauge(metrics.BATCHES, {**_LABELS, "status": status}, counts.get(status, 0))
        self.sink.set_gauge(metrics.BATCH_QUEUE, _LABELS, self.store.pending_count())
        self.sink.set_gauge(metrics.BATCH_IN_FLIGHT, _LABELS, self.runner.in_flight)

    async def _publish_loop(self) -> None:
        while True:  # a periodic refresh for the scrapes, until stop() cancels it
            self.publish()
            await asyncio.sleep(GAUGE_PERIOD_S)
