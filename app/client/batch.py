"""Batch client: JSONL prompts in, one JSONL result line per input id out, through failing endpoints.

    python -m app batch prompts.jsonl -o results.jsonl --endpoint http://127.0.0.1:8080 \
        --endpoint http://127.0.0.1:8000 --concurrency 8 [--stream] [--resume]

Input lines are `{"id": ..., "messages": [...]}` or `{"id": ..., "prompt": "..."}`
plus optional request parameters (`max_tokens`, `temperature`, `model`, ...), sent
as they are. Lines that are not valid are reported with their line number and
skipped; the batch goes on.

Endpoints are tried in the order given: the first healthy one gets the traffic;
an endpoint that refuses/drops connections or answers 502/503/504 is benched for
a cooldown (doubling per consecutive failure) and requests fail over to the next
one. Retries (tenacity): exponential backoff with full jitter, `Retry-After`
honoured on 429, at most `--max-attempts` per request and `--retry-budget`
retries over the whole batch (so a dead cluster does not turn into a retry storm).
Other 4xx (and 500) are final at once.

Each finished request is appended to OUTPUT as one JSON line and flushed at once
(fsync at most once a second and at the end): killing the client loses only the
requests in flight, and `--resume` skips every id already in OUTPUT (a torn last
line from a crash is dropped first).
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
import time
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
from tenacity import AsyncRetrying, RetryCallState, retry_if_exception_type, stop_after_attempt, stop_any
from tenacity.stop import stop_base

from app.client.stats import distribution
from app.client.wire import ClientError, ClusterClient, Outcome, RetryableError, RetryPolicy, call
from app.jsonline import dumps_line

# ----------------------------------------------------------------------------- input


@dataclass
class Item:
    line_no: int
    id: str | int
    body: dict[str, Any]


@dataclass
class BadLine:
    line_no: int
    error: str


def id_key(value: Any) -> str:
    """Ids compare by their JSON form: 1 and "1" are different ids."""
    return json.dumps(value, ensure_ascii=False)


def parse_input(
    lines: Iterable[str | bytes], *, max_tokens: int | None = None
) -> tuple[list[Item], list[BadLine]]:
    """Parse JSONL input into request items; every unusable line becomes a BadLine (with its 1-based number).

    Lines given as bytes are decoded as strict UTF-8: a line that is not valid UTF-8 is reported, never sent
    with replacement characters in place of the user's text. A UTF-8 byte-order mark on line 1 is dropped.
    """
    items: list[Item] = []
    bad: list[BadLine] = []
    seen: dict[str, int] = {}
    for n, raw in enumerate(lines, start=1):
        if isinstance(raw, bytes):
            try:
                raw = raw.decode("utf-8")
            except UnicodeDecodeError as exc:
                bad.append(BadLine(n, f"not valid UTF-8 (byte {exc.start} of the line)"))
                continue
        if n == 1:
            raw = raw.removeprefix("\ufeff")
        text = raw.strip()
        if not text:
            continue
        try:
            obj = json.loads(text)
        except ValueError as exc:
            bad.append(BadLine(n, f"not valid JSON: {exc}"))
            continue
        if not isinstance(obj, dict):
            bad.append(BadLine(n, "not a JSON object"))
            continue
        rid = obj.pop("id", None)
        if isinstance(rid, bool) or not isinstance(rid, str | int) or rid == "":
            bad.append(BadLine(n, "missing or invalid 'id' (a non-empty string or an integer)"))
            continue
        has_messages, has_prompt = "messages" in obj, "prompt" in obj
        if has_messages == has_prompt:
            bad.append(BadLine(n, "needs exactly one of 'messages' or 'prompt'"))
            continue
        if has_messages and (not isinstance(obj["messages"], list) or not obj["messages"]
                             or not all(isinstance(m, dict) for m in obj["messages"])):
            bad.append(BadLine(n, "'messages' must be a non-empty list of objects"))
            continue
        if has_prompt and not isinstance(obj["prompt"], str):
            bad.append(BadLine(n, "'prompt' must be a string"))
            continue
        key = id_key(rid)
        if key in seen:
            bad.append(BadLine(n, f"duplicate id {key} (first on line {seen[key]})"))
            continue
        seen[key] = n
        obj.pop("stream", None)
        obj.pop("stream_options", None)
        if max_tokens is not None:
            obj.setdefault("max_tokens", max_tokens)
        items.append(Item(n, rid, obj))
    return items, bad


# ----------------------------------------------------------------------------- output


def load_done(path: Path) -> set[str]:
    """Ids already in OUTPUT. A torn last line (no newline: the client died mid-write) is cut off first."""
    if not path.exists():
        return set()
    data = path.read_bytes()
    if data and not data.endswith(b"\n"):
        cut = data.rfind(b"\n") + 1
        with open(path, "r+b") as f:
            f.truncate(cut)
        data = data[:cut]
    done: set[str] = set()
    for line in data.splitlines():
        try:
            rec = json.loads(line)
        except ValueError:
            continue
        if isinstance(rec, dict) and "id" in rec:
            done.add(id_key(rec["id"]))
    return done


class ResultWriter:
    """Append-only JSONL writer: flush per line (survives a client kill), fsync at most every `fsync_s`."""

    def __init__(self, path: Path, fsync_s: float = 1.0):
        path.parent.mkdir(parents=True, exist_ok=True)
        self._f = open(path, "a", encoding="utf-8")
        self._fsync_s = fsync_s
        self._last_sync = time.monotonic()

    def write(self, record: dict[str, Any]) -> None:
        self._f.write(dumps_line(record) + "\n")
        self._f.flush()
        if time.monotonic() - self._last_sync >= self._fsync_s:
            os.fsync(self._f.fileno())
            self._last_sync = time.monotonic()

    def close(self) -> None:
        if not self._f.closed:
            self._f.flush()
            os.fsync(self._f.fileno())
            self._f.close()


# ----------------------------------------------------------------------------- endpoints and retries


@dataclass
class _Endpoint:
    url: str
    fails: int = 0
    down_until: float = 0.0


class EndpointPool:
    """Priority failover: the first endpoint not benched gets the request; failures bench it for a cooldown."""

    def __init__(self, urls: list[str], cooldown_s: float = 2.0, max_cooldown_s: float = 30.0):
        if not urls:
            raise ValueError("at least one endpoint is needed")
        self._eps = [_Endpoint(u.rstrip("/")) for u in urls]
        self.cooldown_s = cooldown_s
        self.max_cooldown_s = max_cooldown_s

    def pick(self) -> str:
        now = time.monotonic()
        for ep in self._eps:
            if ep.down_until <= now:
                return ep.url
        return min(self._eps, key=lambda e: e.down_until).url  # all benched: the one back soonest

    def _get(self, url: str) -> _Endpoint:
        return next(e for e in self._eps if e.url == url)

    def failed(self, url: str) -> None:
        ep = self._get(url)
        ep.fails += 1
        ep.down_until = time.monotonic() + min(self.cooldown_s * 2 ** (ep.fails - 1), self.max_cooldown_s)

    def succeeded(self, url: str) -> None:
        ep = self._get(url)
        ep.fails, ep.down_until = 0, 0.0

    def other_available(self, url: str) -> bool:
        now = time.monotonic()
        return any(e.url != url and e.down_until <= now for e in self._eps)


class RetryBudget:
    """Retries allowed over the whole batch; when spent, transient errors become final."""

    def __init__(self, total: int):
        self.total = total
        self.used = 0

    def take(self) -> bool:
        if self.used >= self.total:
            return False
        self.used += 1
        return True


class _BudgetStop(stop_base):
    """tenacity stop condition: stop once the batch's retry budget is spent (each retry takes one)."""

    def __init__(self, budget: RetryBudget):
        self.budget = budget

    def __call__(self, retry_state: RetryCallState) -> bool:
        return not self.budget.take()


# ----------------------------------------------------------------------------- the batch


@dataclass
class BatchOptions:
    endpoints: list[str]
    concurrency: int = 8
    api_key: str | None = None
    model: str | None = None
    stream: bool = False
    timeout_s: float = 120.0
    connect_timeout_s: float = 5.0
    retry: RetryPolicy = field(default_factory=RetryPolicy)  # the one policy of app.client.wire
    retry_budget: int | None = None  # None: 10 + half the number of requests
    cooldown_s: float = 2.0
    progress: bool = True


@dataclass
class BatchStats:
    input_lines: int = 0
    requests: int = 0
    skipped: int = 0
    ok: int = 0
    failed: int = 0
    retries: int = 0
    output_tokens: int = 0
    latencies: list[float] = field(default_factory=list)
    ttfts: list[float] = field(default_factory=list)
    errors: Counter[str] = field(default_factory=Counter)
    per_endpoint: dict[str, Counter[str]] = field(default_factory=dict)
    bad_lines: list[BadLine] = field(default_factory=list)
    wall_s: float = 0.0
    retry_budget: int = 0

    def summary(self) -> dict[str, Any]:
        wall = max(self.wall_s, 1e-9)
        return {
            "input_lines": self.input_lines,
            "requests": self.requests,
            "skipped_resume": self.skipped,
            "ok": self.ok,
            "failed": self.failed,
            "invalid_lines": [{"line": b.line_no, "error": b.error} for b in self.bad_lines],
            "retries": self.retries,
            "retry_budget": self.retry_budget,
            "wall_s": round(self.wall_s, 3),
            "req_per_s": round(self.ok / wall, 3),
            "output_tokens": self.output_tokens,
            "output_tokens_per_s": round(self.output_tokens / wall, 3),
            "latency_s": distribution(self.latencies),
            "ttft_s": distribution(self.ttfts) if self.ttfts else None,
            "errors": dict(self.errors),
            "endpoints": {url: dict(c) for url, c in self.per_endpoint.items()},
        }


async def discover_model(endpoints: list[str], api_key: str | None, timeout_s: float = 30.0) -> str:
    """The first model id listed by the first endpoint that answers /v1/models (one try each)."""
    problems = []
    for url in endpoints:
        async with ClusterClient(url.rstrip("/") + "/v1", api_key=api_key or "", timeout_s=timeout_s,
                                 policy=RetryPolicy(max_attempts=1)) as cluster:
            try:
                return await cluster.resolve_model(None)
            except ClientError as exc:
                problems.append(f"{url}: {exc.message}")
    raise RuntimeError("no --model given and no endpoint listed a model (" + "; ".join(problems) + ")")


class _Runner:
    def __init__(self, opts: BatchOptions, client: httpx.AsyncClient, writer: ResultWriter, stats: BatchStats,
                 budget: RetryBudget, on_done: Any):
        self.opts, self.client, self.writer, self.stats, self.budget = opts, client, writer, stats, budget
        self.pool = EndpointPool(opts.endpoints, cooldown_s=opts.cooldown_s)
        self.on_done = on_done

    def _wait(self, state: RetryCallState) -> float:
        exc = state.outcome.exception() if state.outcome else None
        if isinstance(exc, ClientError) and exc.retry_after is None:
            endpoint = getattr(exc, "endpoint", None)
            if exc.connection_level and endpoint and self.pool.other_available(endpoint):
                return 0.0  # fail over to the next endpoint at once
        return self.opts.retry.wait(state)  # Retry-After (capped) or full-jitter backoff


    async def one(self, item: Item) -> None:
        body = dict(item.body)
        if "model" not in body and self.opts.model:
            body["model"] = self.opts.model
        attempts = 0
        endpoint = ""
        start = time.perf_counter()
        record: dict[str, Any] = {"id": item.id}
        try:
            retrying = AsyncRetrying(
                stop=stop_any(stop_after_attempt(self.opts.retry.max_attempts), _BudgetStop(self.budget)),
                wait=self._wait, retry=retry_if_exception_type(RetryableError), reraise=True,
            )
            async for attempt in retrying:
                with attempt:
                    attempts += 1
                    if attempts > 1:
                        self.stats.retries += 1
                    endpoint = self.pool.pick()
                    try:
                        out: Outcome = await call(self.client, endpoint, body, stream=self.opts.stream,
                                                  api_key=self.opts.api_key)
                    except ClientError as exc:
                        exc.endpoint = endpoint  # type: ignore[attr-defined]
                        if exc.connection_level:
                            self.pool.failed(endpoint)
                        raise
                    self.pool.succeeded(endpoint)
            record.update(ok=True, text=out.text, finish_reason=out.finish_reason, usage=out.usage,
                          latency_s=round(out.latency_s, 6),
                          ttft_s=None if out.ttft_s is None else round(out.ttft_s, 6),
                          endpoint=endpoint, attempts=attempts, error=None)
            self.stats.ok += 1
            self.stats.latencies.append(out.latency_s)
            if out.ttft_s is not None:
                self.stats.ttfts.append(out.ttft_s)
            self.stats.output_tokens += out.completion_tokens
            outcome = "ok"
        except ClientError as exc:
            error = exc.as_dict()
            if isinstance(exc, RetryableError) and attempts < self.opts.retry.max_attempts:
                error["message"] = f"retry budget exhausted; last error: {exc.message}"
            record.update(ok=False, text=None, usage=None, latency_s=round(time.perf_counter() - start, 6),
                          ttft_s=None, endpoint=endpoint, attempts=attempts, error=error)
            self.stats.failed += 1
            self.stats.errors[str(exc.status or exc.error_type)] += 1
            outcome = "failed"
        except Exception as exc:  # a client-side bug must not lose the line or stop the batch
            record.update(ok=False, text=None, usage=None, latency_s=round(time.perf_counter() - start, 6),
                          ttft_s=None, endpoint=endpoint, attempts=attempts,
                          error={"status": 0, "type": "client_error", "message": f"{type(exc).__name__}: {exc}"})
            self.stats.failed += 1
            self.stats.errors["client_error"] += 1
            outcome = "failed"
        self.stats.per_endpoint.setdefault(endpoint, Counter())[outcome] += 1
        self.writer.write(record)
        self.on_done(outcome == "ok")


def prepare_batch(input_path: Path, output_path: Path, *, resume: bool, max_tokens: int | None,
                  console: Any) -> tuple[BatchStats, list[Item]]:
    """Parse the input (reporting bad lines), apply --resume; returns the stats so far and the items to send."""
    stats = BatchStats()
    with open(input_path, "rb") as f:
        lines = f.read().split(b"\n")
    if lines and not lines[-1].strip():
        lines.pop()  # the newline that ends the last line starts no line of its own
    stats.input_lines = len(lines)
    items, bad = parse_input(lines, max_tokens=max_tokens)
    stats.bad_lines = bad
    for b in bad:
        console.print(f"[yellow]{input_path}:{b.line_no}: skipped: {b.error}[/yellow]", markup=True, highlight=False,
                      soft_wrap=True)
    if output_path.exists() and output_path.stat().st_size and not resume:
        raise FileExistsError(f"{output_path} already has results: pass --resume to continue it, or remove it")
    done = load_done(output_path) if resume else set()
    todo = [it for it in items if id_key(it.id) not in done]
    stats.skipped = len(items) - len(todo)
    stats.requests = len(todo)
    return stats, todo


async def run_batch(todo: list[Item], output_path: Path, opts: BatchOptions, stats: BatchStats,
                    console: Any) -> BatchStats:
    """Send `todo` (from `prepare_batch`), appending each result to `output_path`; fills and returns `stats`."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    stats.retry_budget = opts.retry_budget if opts.retry_budget is not None else 10 + len(todo) // 2
    budget = RetryBudget(stats.retry_budget)

    timeout = httpx.Timeout(opts.timeout_s, connect=opts.connect_timeout_s)
    limits = httpx.Limits(max_connections=opts.concurrency * 2, max_keepalive_connections=opts.concurrency * 2)
    writer = ResultWriter(output_path)
    t0 = time.perf_counter()
    progress = Progress(
        TextColumn("batch"), BarColumn(), MofNCompleteColumn(),
        TextColumn("{task.fields[rps]:.1f} req/s"), TextColumn("errors {task.fields[errors]}"),
        TimeElapsedColumn(), console=console, disable=not opts.progress, transient=False,
    )
    try:
        async with httpx.AsyncClient(timeout=timeout, limits=limits) as client:
            if todo and opts.model is None and any("model" not in it.body for it in todo):
                opts.model = await discover_model(opts.endpoints, opts.api_key, opts.connect_timeout_s + 30)
            with progress:
                task = progress.add_task("batch", total=len(todo), rps=0.0, errors=0)

                def on_done(ok: bool) -> None:
                    elapsed = max(time.perf_counter() - t0, 1e-9)
                    progress.update(task, advance=1, rps=(stats.ok + stats.failed) / elapsed, errors=stats.failed)

                runner = _Runner(opts, client, writer, stats, budget, on_done)
                queue: asyncio.Queue[Item] = asyncio.Queue()
                for it in todo:
                    queue.put_nowait(it)

                async def worker() -> None:
                    while True:
                        try:
                            it = queue.get_nowait()
                        except asyncio.QueueEmpty:
                            return
                        await runner.one(it)

                await asyncio.gather(*(worker() for _ in range(max(1, min(opts.concurrency, len(todo) or 1)))))
    finally:
        stats.wall_s = time.perf_counter() - t0
        writer.close()
    return stats


def print_summary(summary: dict[str, Any], console: Any) -> None:
    """The final table (rich) on the console."""
    from rich.table import Table

    from app.client.stats import fmt_s

    table = Table(title="batch summary", show_header=True)
    table.add_column("metric")
    table.add_column("value", justify="right")
    lat, ttft = summary["latency_s"], summary["ttft_s"] or {}
    rows = [
        ("requests (this run)", str(summary["requests"])),
        ("ok", str(summary["ok"])),
        ("failed", str(summary["failed"])),
        ("invalid input lines", str(len(summary["invalid_lines"]))),
        ("skipped (--resume)", str(summary["skipped_resume"])),
        ("retries (budget)", f"{summary['retries']} ({summary['retry_budget']})"),
        ("wall time", f"{summary['wall_s']:.2f} s"),
        ("req/s", f"{summary['req_per_s']:.2f}"),
        ("output tokens/s", f"{summary['output_tokens_per_s']:.1f}"),
        ("latency p50 / p95 / p99", " / ".join(fmt_s(lat[k]) for k in ("p50", "p95", "p99"))),
        ("TTFT p50 / p95 / p99", " / ".join(fmt_s(ttft.get(k)) for k in ("p50", "p95", "p99")) if ttft else "-"),
    ]
    for url, counts in summary["endpoints"].items():
        rows.append((f"endpoint {url or '(none)'}", ", ".join(f"{k} {v}" for k, v in sorted(counts.items()))))
    for kind, n in sorted(summary["errors"].items()):
        rows.append((f"errors {kind}", str(n)))
    for name, value in rows:
        table.add_row(name, value)
    console.print(table)


def main_batch(input_path: Path, output_path: Path, opts: BatchOptions, *, resume: bool, max_tokens: int | None,
               summary_json: Path | None) -> int:
    """CLI body: run, print the table, write --summary-json; exit status 0 only when every line succeeded."""
    from rich.console import Console

    console = Console(stderr=True)
    stats, todo = prepare_batch(input_path, output_path, resume=resume, max_tokens=max_tokens, console=console)
    asyncio.run(run_batch(todo, output_path, opts, stats, console))
    summary = stats.summary()
    print_summary(summary, console)
    if summary_json is not None:
        summary_json.parent.mkdir(parents=True, exist_ok=True)
        summary_json.write_text(json.dumps(summary, indent=2) + "\n")
    sys.stderr.flush()
    return 0 if stats.failed == 0 and not stats.bad_lines else 1
