"""The durable batch runner: drives each batch from `validating` to a final status, resuming after a restart.

Per batch: validate the input file (app.batch.validation) against the models the target serves, store its
lines, then send the pending ones to the target (the front door: nginx, so its failover covers batch traffic)
with `per_batch` workers, each also holding one of `concurrency` slots shared by every batch. Requests go
through the kit's one retry policy (`app.client.wire.AsyncRetryTransport`: 429/502/503/504 and transport errors
retried, `Retry-After` honoured) and carry `service_tier: "flex"` so the engines admit interactive requests
first. Each outcome is committed once (`Store.finish_line`); output and error files are rebuilt from the
lines at the end, so a restart (which resends only the lines without an outcome) never loses or doubles one.

Cancel stops new lines at once and aborts those in flight (their HTTP requests are closed, so the server stops
generating); the batch ends `cancelled` with what it finished. A batch still running at `expires_at` ends
`expired`: its unfinished lines go to the error file with code `batch_expired`, as OpenAI writes them.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import logging
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import httpx

from app import metrics
from app.batch.shapes import Batch, BatchError, BatchErrors, FileObject
from app.batch.store import Store, now
from app.batch.validation import check_file
from app.client.wire import AsyncRetryTransport, ClientError, ClusterClient, RetryPolicy, transport_error
from app.jsonline import dumps_line
from app.metrics import MetricsSink

log = logging.getLogger(__name__)

EXPIRED_ERROR = {"code": "batch_expired",
                 "message": "This request could not be executed before the completion window expired."}
_LABELS = {"model": "-", "engine": "batch"}
TARGET_POLL_S = 1.0


@dataclass
class RunnerConfig:
    """Where and how hard the runner sends: `target_url` is the API's base URL (without /v1)."""

    target_url: str
    api_key: str = ""
    concurrency: int = 16
    per_batch: int = 8
    max_lines: int = 50_000
    request_timeout_s: float = 600.0
    policy: RetryPolicy = field(default_factory=RetryPolicy)


def line_request_id(batch_id: str, line_no: int) -> str:
    """The stable `id` of a line's output record (the same after a restart)."""
    return "batch_req_" + hashlib.sha256(f"{batch_id}:{line_no}".encode()).hexdigest()[:32]


def result_file_id(batch_id: str, kind: str) -> str:
    return "file-" + hashlib.sha256(f"{batch_id}:{kind}".encode()).hexdigest()[:32]


class Runner:
    def __init__(self, store: Store, config: RunnerConfig, sink: MetricsSink):
        self.store = store
        self.config = config
        self.sink = sink
        self._tasks: dict[str, asyncio.Task[None]] = {}
        self._cancel: dict[str, asyncio.Event] = {}
        self._slots: asyncio.Semaphore | None = None
        self._http: httpx.AsyncClient | None = None
        self.in_flight = 0

    # ------------------------------------------------------------------------------------------ control

    async def start(self) -> None:
        """Open the client and resume every batch a previous process left unfinished."""
        self._slots = asyncio.Semaphore(self.config.concurrency)
        headers = {"Authorization": f"Bearer {self.config.api_key}"} if self.config.api_key else {}
        self._http = httpx.AsyncClient(
            headers=headers, timeout=httpx.Timeout(self.config.request_timeout_s, connect=10.0),
            # whole_body: an answer cut after its headers (primary killed mid-reply) is resent, not failed
            transport=AsyncRetryTransport(self.config.policy, whole_body=True),
            limits=httpx.Limits(max_connections=self.config.concurrency + 4))
        for batch_id in self.store.active_batch_ids():
            log.info("resuming batch %s", batch_id)
            self.schedule(batch_id)

    async def stop(self) -> None:
        tasks = list(self._tasks.values())
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(BaseException):
                await task
        if self._http is not None:
            await self._http.aclose()

    def schedule(self, batch_id: str) -> None:
        task = self._tasks.get(batch_id)
        if task is None or task.done():
            self._cancel.setdefault(batch_id, asyncio.Event())
            self._tasks[batch_id] = asyncio.create_task(self._drive(batch_id), name=f"batch {batch_id}")

    def cancel(self, batch_id: str) -> None:
        """The batch was marked `cancelling`: stop it (or finish it as cancelled if it is not running)."""
        self._cancel.setdefault(batch_id, asyncio.Event()).set()
        self.schedule(batch_id)

    # --------------------------------------------------------------------------------------- the driver

    async def _drive(self, batch_id: str) -> None:
        try:
            batch = self.store.get_batch(None, batch_id)
            if batch is None:
                return
            if batch.status == "validating":
                batch = await self._validate(batch)
            if batch.status == "in_progress":
                batch = await self._run_lines(batch)
            if batch.status in ("finalizing", "cancelling"):
                await asyncio.to_thread(self._finalize, batch, "completed" if batch.status == "finalizing"
                                        else "cancelled")
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("batch %s: runner error (the batch resumes when the service restarts)", batch_id)
        finally:
            self._cancel.pop(batch_id, None)

    def _reload(self, batch_id: str) -> Batch:
        batch = self.store.get_batch(None, batch_id)
        assert batch is not None
        return batch

    async def _models(self) -> set[str] | None:
        try:
            async with ClusterClient(self.config.target_url.rstrip("/") + "/v1", api_key=self.config.api_key,
                                     timeout_s=30, policy=RetryPolicy(max_attempts=3)) as client:
                return {str(c["id"]) for c in await client.list_models(refresh=True)}
        except ClientError as exc:
            log.warning("cannot list the target's models (%s): batch lines' models are not checked", exc.message)
            return None

    async def _validate(self, batch: Batch) -> Batch:
        path = self.store.file_path(batch.input_file_id)
        if not path.exists():
            checked_errors = [BatchError(code="file_not_found", message=f"input file {batch.input_file_id} is gone",
                                         param="input_file_id")]
            rows: list[tuple[int, str, str]] = []
            model = None
        else:
            checked = await asyncio.to_thread(check_file, path, batch.endpoint, models=await self._models(),
                                              max_lines=self.config.max_lines)
            checked_errors, rows, model = checked.errors, checked.rows, checked.model
        if checked_errors:
            batch.status, batch.failed_at = "failed", now()
            batch.errors = BatchErrors(data=checked_errors)
            if not self.store.save_batch(batch, only_if=("validating",)):
                return self._reload(batch.id)
            log.info("batch %s failed validation: %d error(s)", batch.id, len(checked_errors))
            return batch
        await asyncio.to_thread(self.store.insert_lines, batch.id, rows)
        batch.status, batch.in_progress_at, batch.model = "in_progress", now(), model
        batch.request_counts.total = len(rows)
        if not self.store.save_batch(batch, only_if=("validating",)):
            return self._reload(batch.id)  # cancelled while validating
        return batch

    async def _target_ready(self, model: str | None, cancel: asyncio.Event, deadline: float | None) -> None:
        """Wait until the target lists `model` as ready (after a restart of the target or of this service,
        lines would otherwise spend their retries on a server still loading); gives up at the deadline or on
        cancel (the lines then run, or the batch ends, as usual)."""
        while not cancel.is_set() and (deadline is None or time.time() < deadline):
            try:
                async with ClusterClient(self.config.target_url.rstrip("/") + "/v1", api_key=self.config.api_key,
                                         timeout_s=10, policy=RetryPolicy(max_attempts=1)) as client:
                    cards = await client.list_models(refresh=True)
                if model is None or any(c.get("id") == model and c.get("ready", True) for c in cards):
                    return
            except ClientError:
                pass
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(cancel.wait(), TARGET_POLL_S)  # the next look at the target

    async def _run_lines(self, batch: Batch) -> Batch:
        pending = iter(await asyncio.to_thread(self.store.pending_lines, batch.id))
        cancel = self._cancel.setdefault(batch.id, asyncio.Event())
        await self._target_ready(batch.model, cancel, batch.expires_at)
        if cancel.is_set():
            return self._reload(batch.id)  # cancelling: finalized by the driver
        workers = [asyncio.create_task(self._worker(batch, pending)) for _ in range(self.config.per_batch)]
        everything: asyncio.Future[list[None]] = asyncio.ensure_future(asyncio.gather(*workers))
        cancelled: asyncio.Future[Any] = asyncio.ensure_future(cancel.wait())
        timeout = max(0.0, (batch.expires_at or 0) - time.time()) if batch.expires_at else None
        try:
            await asyncio.wait([everything, cancelled], timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
            finished = everything.done()
        finally:
            cancelled.cancel()
            if not everything.done():
                for w in workers:
                    w.cancel()
                with contextlib.suppress(BaseException):
                    await everything
        if finished:
            everything.result()  # a worker's error (the store failing) ends the drive: resumed on restart
            batch.status, batch.finalizing_at = "finalizing", now()
            if self.store.save_batch(batch, only_if=("in_progress",)):
                return batch
            return self._reload(batch.id)  # cancelled just as the last line finished
        current = self._reload(batch.id)
        if current.status == "cancelling":
            return current
        await asyncio.to_thread(self._expire, current)
        return self._reload(batch.id)

    async def _worker(self, batch: Batch, pending: Iterator[tuple[int, str, str]]) -> None:
        assert self._slots is not None
        for line_no, custom_id, body in pending:
            async with self._slots:
                self.in_flight += 1
                try:
                    state, record = await self._send(batch, line_no, custom_id, body)
                finally:
                    self.in_flight -= 1
            if self.store.finish_line(batch.id, line_no, state, record):
                self.sink.inc(metrics.BATCH_LINES, {**_LABELS, "outcome": state})

    async def _send(self, batch: Batch, line_no: int, custom_id: str, body_text: str) -> tuple[str, dict[str, Any]]:
        assert self._http is not None
        body = json.loads(body_text)
        body["service_tier"] = "flex"  # batch traffic yields to interactive requests in the engines
        url = self.config.target_url.rstrip("/") + batch.endpoint
        record: dict[str, Any] = {"id": line_request_id(batch.id, line_no), "custom_id": custom_id}
        try:
            resp = await self._http.post(url, json=body, headers={"X-Request-Id": f"{batch.id}-{line_no}"})
        except httpx.TransportError as exc:
            err = transport_error(exc, url)
            return "failed", {**record, "response": None,
                              "error": {"code": err.error_type or "connection_error", "message": err.message}}
        try:
            answer: Any = resp.json()
        except ValueError:
            answer = {"error": {"message": resp.text[:2000], "type": "bad_response"}}
        record["response"] = {"status_code": resp.status_code, "request_id": resp.headers.get("x-request-id", ""),
                              "body": answer}
        record["error"] = None
        return ("completed" if 200 <= resp.status_code < 300 else "failed"), record

    # ------------------------------------------------------------------------------------------ endings

    def _expire(self, batch: Batch) -> None:
        for line_no, custom_id, _ in self.store.pending_lines(batch.id):
            record = {"id": line_request_id(batch.id, line_no), "custom_id": custom_id, "response": None,
                      "error": EXPIRED_ERROR}
            if self.store.finish_line(batch.id, line_no, "failed", record):
                self.sink.inc(metrics.BATCH_LINES, {**_LABELS, "outcome": "expired"})
        self._finalize(batch, "expired")

    def _result_file(self, batch: Batch, owner: str, kind: str, state: str) -> str | None:
        records = self.store.records(batch.id, state)
        first = next(records, None)
        if first is None:
            return None
        file_id = result_file_id(batch.id, kind)

        def lines() -> Iterator[str]:
            yield dumps_line(first, compact=True)
            for record in records:
                yield dumps_line(record, compact=True)

        size = self.store.write_file(file_id, lines())
        self.store.add_file(owner, FileObject(id=file_id, bytes=size, created_at=now(), purpose="batch_output",
                                              filename=f"{batch.id}_{kind}.jsonl"))
        return file_id

    def _finalize(self, batch: Batch, final: str) -> None:
        """Write the output and error files from the committed lines, then the final status (idempotent)."""
        owner = self.store.owner_of_batch(batch.id)
        batch.output_file_id = self._result_file(batch, owner, "output", "completed")
        batch.error_file_id = self._result_file(batch, owner, "error", "failed")
        batch.request_counts = self.store.counts(batch.id)
        stamp = now()
        if final == "completed":
            batch.status, batch.completed_at = "completed", stamp
        elif final == "cancelled":
            batch.status, batch.cancelled_at = "cancelled", stamp
        else:
            batch.status, batch.expired_at = "expired", stamp
        self.store.save_batch(batch)
        log.info("batch %s %s: %s", batch.id, batch.status, batch.request_counts.model_dump())
