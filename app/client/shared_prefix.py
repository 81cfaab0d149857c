"""The RAG-shaped benchmark load (`python -m app bench --shared-prefix`): documents shared by many questions.

    python -m app bench --shared-prefix --documents 16 --doc-words 600 --questions 8 --levels 8 \
        --metrics-url http://127.0.0.1:8090/metrics --model tiny

`SharedPrefixLoad` makes N documents of `doc_words` random words and `questions` questions per document; a
request's prompt is its document then its question, and the requests arrive in a shuffled order (seeded: the same
seed gives the same documents, questions and order). Every document starts with its own header (run nonce and
document number), so no two documents share even their first characters: a prefix cache can only serve a request
from an earlier request of the same document. `c` closed-loop workers send the requests (streamed, fixed output
length) until all are answered; per request the TTFT, the end-to-end latency, the prompt tokens and the replica
that served it (`X-Served-By`) are kept.

The prefix-cache hit rate comes from the replicas' own counters, `vllm:prefix_cache_queries_total` and
`vllm:prefix_cache_hits_total` (prompt tokens looked up / found), read from each `--metrics-url` before and after
the load: a Ray node's metrics export port (`ray_vllm_*`, one series per replica, `ReplicaId` label) or a
standalone server's /metrics (`vllm:*`). Ray exports with a delay: after the load the counters are read until the
queries count has grown by the prompt tokens the requests reported (bounded by `settle_s`).
"""

from __future__ import annotations

import asyncio
import random
import secrets
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import httpx

from app.client.stats import distribution, fmt_s
from app.client.wire import ClientError, call

SCHEMA = "llm-kit-bench-shared-prefix/1"
_WORDS = ("alpha bravo cluster decode engine failover gateway harbor index jitter kernel ladder matrix nginx "
          "orbit packet queue replica shard tensor upstream vector worker yaml zone batch token stream").split()
QUERIES = "prefix_cache_queries_total"
HITS = "prefix_cache_hits_total"
_PREFIXES = ("vllm:", "ray_vllm_", "vllm_")


@dataclass(frozen=True)
class Item:
    document: int
    question: int
    prompt: str


@dataclass(frozen=True)
class SharedPrefixLoad:
    """N documents x Q questions, shuffled; `nonce` keeps one run's documents apart from another run's."""

    documents: int
    doc_words: int
    questions: int
    question_words: int = 12
    seed: int = 0
    nonce: str = field(default_factory=lambda: secrets.token_hex(4))

    def document(self, d: int) -> str:
        rng = random.Random(f"{self.seed}-doc-{d}")
        return f"[{self.nonce} document {d}] " + " ".join(rng.choice(_WORDS) for _ in range(self.doc_words))

    def question(self, d: int, q: int) -> str:
        rng = random.Random(f"{self.seed}-q-{d}-{q}")
        return f"\n\nQuestion {q}: " + " ".join(rng.choice(_WORDS) for _ in range(self.question_words)) + "?\nAnswer:"

    def items(self) -> list[Item]:
        docs = [self.document(d) for d in range(self.documents)]
        out = [Item(d, q, docs[d] + self.question(d, q)) for d in range(self.documents) for q in range(self.questions)]
        random.Random(f"{self.seed}-order").shuffle(out)
        return out


@dataclass
class Result:
    item: Item
    ok: bool
    ttft_s: float | None = None
    e2e_s: float = 0.0
    prompt_tokens: int = 0
    served_by: str | None = None
    error: str | None = None
    finished_at: float = 0.0  # time.monotonic() when the answer (or the error) was complete


# ----------------------------------------------------------------------------- the replicas' counters


def cache_counters(text: str, model: str | None) -> dict[str, dict[str, float]]:
    """{replica: {"queries": n, "hits": n}} from Prometheus text (`vllm:*` or Ray's `ray_vllm_*` names).

    The replica is the series' `ReplicaId` label (Ray) or, without one, the series' `engine` index."""
    from prometheus_client.parser import text_string_to_metric_families

    out: dict[str, dict[str, float]] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            name = next((sample.name[len(p):] for p in _PREFIXES if sample.name.startswith(p)), None)
            if name not in (QUERIES, HITS):
                continue
            if model is not None and sample.labels.get("model_name", model) != model:
                continue
            replica = sample.labels.get("ReplicaId") or f"engine {sample.labels.get('engine', '0')}"
            slot = out.setdefault(replica, {"queries": 0.0, "hits": 0.0})
            slot["queries" if name == QUERIES else "hits"] += sample.value
    return out


async def read_counters(client: httpx.AsyncClient, urls: Sequence[str], model: str | None
                        ) -> dict[str, dict[str, float]]:
    merged: dict[str, dict[str, float]] = {}
    for url in urls:
        resp = await client.get(url)
        resp.raise_for_status()
        for replica, values in cache_counters(resp.text, model).items():
            slot = merged.setdefault(replica, {"queries": 0.0, "hits": 0.0})
            for key, value in values.items():
                slot[key] += value
    return merged


def counter_delta(before: dict[str, dict[str, float]], after: dict[str, dict[str, float]]
                  ) -> dict[str, dict[str, float]]:
    """Per replica, what the counters grew by (a replica that restarted counts from zero)."""
    out = {}
    for replica, now in after.items():
        was = before.get(replica, {"queries": 0.0, "hits": 0.0})
        q, h = now["queries"] - was["queries"], now["hits"] - was["hits"]
        if q < 0 or h < 0:
            q, h = now["queries"], now["hits"]
        if q or h:
            out[replica] = {"queries": q, "hits": h}
    return out


def hit_rate(delta: dict[str, dict[str, float]]) -> float | None:
    queries = sum(v["queries"] for v in delta.values())
    return round(sum(v["hits"] for v in delta.values()) / queries, 4) if queries else None


# ----------------------------------------------------------------------------- the run


async def send_all(client: httpx.AsyncClient, endpoint: str, model: str, items: list[Item], *, concurrency: int,
                   max_tokens: int, chat: bool, api_key: str | None,
                   on_result: Callable[[Result], None] | None = None) -> tuple[list[Result], float]:
    """`concurrency` closed-loop workers over `items` in order; returns the results and the wall time."""
    queue = list(reversed(items))
    results: list[Result] = []

    async def one(item: Item) -> Result:
        body: dict[str, Any] = {"model": model, "max_tokens": max_tokens, "min_tokens": max_tokens,
                                "ignore_eos": True, "temperature": 0.0}
        if chat:
            body["messages"] = [{"role": "user", "content": item.prompt}]
        else:
            body["prompt"] = item.prompt
        start = time.perf_counter()
        try:
            out = await call(client, endpoint, body, stream=True, api_key=api_key)
        except ClientError as exc:
            return Result(item, ok=False, e2e_s=time.perf_counter() - start,
                          error=f"{exc.status}: {exc.message[:200]}", finished_at=time.monotonic())
        usage = out.usage or {}
        return Result(item, ok=True, ttft_s=out.ttft_s, e2e_s=out.latency_s,
                      prompt_tokens=int(usage.get("prompt_tokens") or 0), served_by=out.served_by,
                      finished_at=time.monotonic())

    async def worker() -> None:
        while queue:
            result = await one(queue.pop())
            results.append(result)
            if on_result is not None:
                on_result(result)

    start = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return results, time.perf_counter() - start


def placement(results: list[Result]) -> dict[str, Any]:
    """How the documents spread: per replica the requests served, and per document how many replicas served it."""
    per_replica = Counter(r.served_by or "?" for r in results if r.ok)
    replicas_per_doc: dict[int, set[str]] = {}
    for r in results:
        if r.ok:
            replicas_per_doc.setdefault(r.item.document, set()).add(r.served_by or "?")
    spread = Counter(len(s) for s in replicas_per_doc.values())
    return {"requests_per_replica": dict(sorted(per_replica.items())),
            "documents_by_replicas_serving_them": {str(k): v for k, v in sorted(spread.items())}}


async def bench_shared_prefix(endpoint: str, *, model: str | None, api_key: str | None, chat: bool,
                              load: SharedPrefixLoad, concurrency: int, max_tokens: int, metrics_urls: Sequence[str],
                              timeout_s: float = 300.0, settle_s: float = 30.0,
                              log: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Run the load once against `endpoint` and report TTFT, e2e, placement and the prefix-cache hit rate."""
    import datetime as dt

    from app.client.batch import discover_model
    from app.client.loadgen import machine_info

    limits = httpx.Limits(max_connections=concurrency * 2, max_keepalive_connections=concurrency * 2)
    async with httpx.AsyncClient(timeout=httpx.Timeout(timeout_s, connect=10.0), limits=limits) as client:
        model = model or await discover_model([endpoint], api_key)
        before = await read_counters(client, metrics_urls, model) if metrics_urls else {}
        results, wall = await send_all(client, endpoint, model, load.items(), concurrency=concurrency,
                                       max_tokens=max_tokens, chat=chat, api_key=api_key)
        ok = [r for r in results if r.ok]
        prompt_tokens = sum(r.prompt_tokens for r in ok)
        delta: dict[str, dict[str, float]] = {}
        if metrics_urls:
            deadline = time.monotonic() + settle_s
            while True:
                delta = counter_delta(before, await read_counters(client, metrics_urls, model))
                if sum(v["queries"] for v in delta.values()) >= prompt_tokens or time.monotonic() > deadline:
                    break
                await asyncio.sleep(0.5)
    errors = Counter(r.error or "?" for r in results if not r.ok)
    report: dict[str, Any] = {
        "schema": SCHEMA,
        "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "machine": machine_info(),
        "target": {"endpoint": endpoint, "model": model, "api": "chat" if chat else "completions"},
        "config": {"documents": load.documents, "doc_words": load.doc_words, "questions": load.questions,
                   "question_words": load.question_words, "seed": load.seed, "concurrency": concurrency,
                   "max_tokens": max_tokens, "stream": True},
        "requests": len(results), "ok": len(ok), "failed": len(results) - len(ok), "errors": dict(errors),
        "wall_s": round(wall, 3), "req_per_s": round(len(ok) / wall, 3) if wall else 0.0,
        "prompt_tokens": prompt_tokens,
        "ttft_s": distribution([r.ttft_s for r in ok if r.ttft_s is not None]),
        "e2e_s": distribution([r.e2e_s for r in ok]),
        "prefix_cache": {"hit_rate": hit_rate(delta), "per_replica": {
            k: {**v, "hit_rate": hit_rate({k: v})} for k, v in sorted(delta.items())},
            "queries_seen": sum(v["queries"] for v in delta.values())} if metrics_urls else None,
        "placement": placement(results),
    }
    if log:
        cache = report["prefix_cache"]
        log(f"{model}: {report['ok']}/{report['requests']} ok, TTFT p50 {fmt_s(report['ttft_s']['p50'])} "
            f"p95 {fmt_s(report['ttft_s']['p95'])}, prefix-cache hit rate "
            f"{cache['hit_rate'] if cache else 'not measured (no --metrics-url)'}")
    return report


def to_markdown(report: dict[str, Any]) -> str:
    c, cache = report["config"], report["prefix_cache"] or {}
    target = report["target"]
    return (f"Shared-prefix benchmark {report['date']} · {target['model']} at {target['endpoint']} · "
            f"{c['documents']} documents x {c['questions']} questions, {c['doc_words']} words each, "
            f"c={c['concurrency']}, seed {c['seed']} · load average {report['machine'].get('loadavg_1m')}\n\n"
            "| requests ok / failed | TTFT p50 / p95 | e2e p50 / p95 | prefix-cache hit rate | requests per replica |\n"
            "|---|---|---|---:|---|\n"
            f"| {report['ok']} / {report['failed']} | {fmt_s(report['ttft_s']['p50'])} / "
            f"{fmt_s(report['ttft_s']['p95'])} | {fmt_s(report['e2e_s']['p50'])} / {fmt_s(report['e2e_s']['p95'])} | "
            f"{cache.get('hit_rate', '-')} | {report['placement']['requests_per_replica']} |\n")
