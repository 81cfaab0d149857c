"""Benchmark harness: fixed concurrency levels against any OpenAI-compatible endpoint (or an in-process engine).

    python -m app bench --endpoint http://127.0.0.1:8000 --levels 1,4,16 --duration 20 --out bench/results

Per level, `c` workers send streamed requests back to back for `--duration`
seconds (after `--warmup` unmeasured requests); the level ends when the last
request started in time finishes. Reported per level: TTFT, inter-token latency
(per request: (last chunk - first chunk) / (tokens - 1)), end-to-end latency as
p50/p95/p99, requests/s and output tokens/s, as JSON (schema `llm-kit-bench/1`)
and a markdown table.

Prompts are prefix-cache-safe: each starts with a per-run nonce and request
number followed by randomly drawn words, so no two requests share a prefix that a
prefix cache could serve. Output length is fixed with our server's vLLM-compatible
extensions `ignore_eos` + `min_tokens` (= `max_tokens`), so every request costs
the same number of decode steps.

The seed targets (>= 10 requests/s and p95 end-to-end < 3 s at some level) are
evaluated in the report (`seed_targets`), not asserted by a test.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import os
import platform
import random
import secrets
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

from app.client.stats import distribution, fmt_s
from app.client.wire import ClientError, call

SCHEMA = "llm-kit-bench/1"
SEED_MIN_RPS = 10.0
SEED_MAX_P95_S = 3.0
_WORDS = ("alpha bravo cluster decode engine failover gateway harbor index jitter kernel ladder matrix nginx "
          "orbit packet queue replica shard tensor upstream vector worker yaml zone batch token stream").split()


@dataclass
class Sample:
    ok: bool
    e2e_s: float
    ttft_s: float | None = None
    itl_s: float | None = None
    output_tokens: int = 0
    error: str | None = None


# A target sends one prompt asking for exactly `max_tokens` tokens and returns a Sample.
Target = Callable[[str, int], Awaitable[Sample]]


def synthetic_prompt(nonce: str, n: int, words: int, rng: random.Random) -> str:
    """A prompt no other request shares a prefix with (nonce and request number first)."""
    return f"[{nonce}-{n}] " + " ".join(rng.choice(_WORDS) for _ in range(words))


def itl_of(chunk_times: list[float], tokens: int) -> float | None:
    if len(chunk_times) < 2 or tokens < 2:
        return None
    return (chunk_times[-1] - chunk_times[0]) / (tokens - 1)


def http_target(client: httpx.AsyncClient, endpoint: str, model: str, *, api_key: str | None = None,
                chat: bool = False) -> Target:
    """Streamed chat or completions requests to `endpoint`, fixed length via ignore_eos/min_tokens."""

    async def send(prompt: str, max_tokens: int) -> Sample:
        body: dict[str, Any] = {"model": model, "max_tokens": max_tokens, "min_tokens": max_tokens,
                                "ignore_eos": True, "temperature": 0.0}
        if chat:
            body["messages"] = [{"role": "user", "content": prompt}]
        else:
            body["prompt"] = prompt
        start = time.perf_counter()
        try:
            out = await call(client, endpoint, body, stream=True, api_key=api_key)
        except ClientError as exc:
            return Sample(ok=False, e2e_s=time.perf_counter() - start, error=f"{exc.status}: {exc.message[:200]}")
        tokens = out.completion_tokens
        return Sample(ok=True, e2e_s=out.latency_s, ttft_s=out.ttft_s, itl_s=itl_of(out.chunk_times, tokens),
                      output_tokens=tokens)

    return send


def engine_target(engine: Any) -> Target:
    """The engine protocol called in-process (no HTTP): the bottom layer of the comparison."""
    from app.engines.base import EngineError, GenerationRequest

    async def send(prompt: str, max_tokens: int) -> Sample:
        req = GenerationRequest(prompt=prompt, max_tokens=max_tokens, min_tokens=max_tokens, ignore_eos=True,
                                temperature=0.0)
        start = time.perf_counter()
        times: list[float] = []
        tokens = 0
        try:
            async for chunk in engine.generate(req):
                if chunk.text:
                    times.append(time.perf_counter() - start)
                tokens = chunk.completion_tokens
        except EngineError as exc:
            return Sample(ok=False, e2e_s=time.perf_counter() - start, error=f"{exc.status_code}: {exc.message}")
        return Sample(ok=True, e2e_s=time.perf_counter() - start, ttft_s=times[0] if times else None,
                      itl_s=itl_of(times, tokens), output_tokens=tokens)

    return send


async def run_level(target: Target, concurrency: int, *, duration_s: float, max_tokens: int, prompt_words: int,
                    warmup: int, nonce: str, seed: int = 0, max_requests: int | None = None) -> dict[str, Any]:
    """One concurrency level: warm-up, then `concurrency` closed-loop workers for `duration_s` seconds."""
    rng = random.Random(f"{seed}-{concurrency}")
    counter = 0

    def next_prompt() -> str:
        nonlocal counter
        counter += 1
        return synthetic_prompt(f"{nonce}c{concurrency}", counter, prompt_words, rng)

    if warmup:
        await asyncio.gather(*(target(next_prompt(), max_tokens) for _ in range(warmup)))
    samples: list[Sample] = []
    start = time.perf_counter()
    deadline = start + duration_s
    started = 0

    async def worker() -> None:
        nonlocal started
        while time.perf_counter() < deadline and (max_requests is None or started < max_requests):
            started += 1
            samples.append(await target(next_prompt(), max_tokens))

    await asyncio.gather(*(worker() for _ in range(concurrency)))
    wall = time.perf_counter() - start
    ok = [s for s in samples if s.ok]
    tokens = sum(s.output_tokens for s in ok)
    errors: dict[str, int] = {}
    for s in samples:
        if not s.ok:
            errors[s.error or "?"] = errors.get(s.error or "?", 0) + 1
    return {
        "concurrency": concurrency,
        "requests": len(samples),
        "ok": len(ok),
        "failed": len(samples) - len(ok),
        "wall_s": round(wall, 3),
        "req_per_s": round(len(ok) / wall, 3) if wall else 0.0,
        "output_tokens": tokens,
        "output_tokens_per_s": round(tokens / wall, 2) if wall else 0.0,
        "mean_output_tokens": round(tokens / len(ok), 2) if ok else 0.0,
        "ttft_s": distribution([s.ttft_s for s in ok if s.ttft_s is not None]),
        "itl_s": distribution([s.itl_s for s in ok if s.itl_s is not None]),
        "e2e_s": distribution([s.e2e_s for s in ok]),
        "errors": errors,
    }


def machine_info() -> dict[str, Any]:
    info: dict[str, Any] = {"hostname": platform.node(), "platform": platform.platform(),
                            "python": platform.python_version(), "cpus": os.cpu_count()}
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                info["cpu"] = line.split(":", 1)[1].strip()
                break
        mem = Path("/proc/meminfo").read_text().split()[1]
        info["mem_gib"] = round(int(mem) / 2**20, 1)
    except (OSError, IndexError, ValueError):
        pass
    try:
        info["loadavg_1m"] = round(os.getloadavg()[0], 2)
    except OSError:
        pass
    return info


def seed_targets(levels: list[dict[str, Any]]) -> dict[str, Any]:
    """Which levels meet the seed targets (>= 10 req/s and p95 e2e < 3 s) and whether any meets both."""
    rows = []
    for lv in levels:
        p95 = lv["e2e_s"]["p95"]
        rps_ok = lv["req_per_s"] >= SEED_MIN_RPS
        p95_ok = p95 is not None and p95 < SEED_MAX_P95_S and lv["failed"] == 0
        rows.append({"concurrency": lv["concurrency"], "req_per_s": lv["req_per_s"], "p95_e2e_s": p95,
                     "meets_throughput": rps_ok, "meets_p95": p95_ok, "meets_both": rps_ok and p95_ok})
    return {"min_req_per_s": SEED_MIN_RPS, "max_p95_e2e_s": SEED_MAX_P95_S, "levels": rows,
            "met": any(r["meets_both"] for r in rows)}


async def run_bench(target: Target, *, levels: list[int], duration_s: float, max_tokens: int, prompt_words: int,
                    warmup: int | None, describe: dict[str, Any], seed: int = 0,
                    max_requests: int | None = None, log: Callable[[str], None] | None = None,
                    probe: Callable[[], Any] | None = None) -> dict[str, Any]:
    """All levels in order; returns the report (schema `llm-kit-bench/1`). `probe()`: a context manager around
    each level whose `result()` is stored in the level as `cpu_share` (bench/cpu_share.py)."""
    nonce = secrets.token_hex(4)
    results = []
    for c in levels:
        sampler = probe() if probe is not None else None
        with sampler if sampler is not None else contextlib.nullcontext():
            lv = await run_level(target, c, duration_s=duration_s, max_tokens=max_tokens, prompt_words=prompt_words,
                                 warmup=c if warmup is None else warmup, nonce=nonce, seed=seed,
                                 max_requests=max_requests)
        if sampler is not None:
            lv["cpu_share"] = sampler.result()
        results.append(lv)
        if log:
            log(f"c={c}: {lv['req_per_s']:.2f} req/s, e2e p50 {fmt_s(lv['e2e_s']['p50'])} "
                f"p95 {fmt_s(lv['e2e_s']['p95'])}, TTFT p50 {fmt_s(lv['ttft_s']['p50'])}, failed {lv['failed']}")
    return {
        "schema": SCHEMA,
        "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "machine": machine_info(),
        "target": describe,
        "config": {"levels": levels, "duration_s": duration_s, "max_tokens": max_tokens,
                   "prompt_words": prompt_words, "warmup": warmup, "ignore_eos": True, "min_tokens": max_tokens,
                   "stream": True},
        "levels": results,
        "seed_targets": seed_targets(results),
    }


def to_markdown(report: dict[str, Any]) -> str:
    t = report["target"]
    head = (f"Benchmark {report['date']} · {t.get('kind', '?')} {t.get('endpoint', '')} · model {t.get('model', '?')} "
            f"· {report['config']['max_tokens']} output tokens · {report['machine'].get('cpus')} CPUs "
            f"{report['machine'].get('cpu', '')}\n\n")
    lines = ["| concurrency | req/s | output tok/s | TTFT p50 / p95 / p99 | ITL p50 / p95 / p99 "
             "| e2e p50 / p95 / p99 | ok / failed |",
             "|---:|---:|---:|---|---|---|---|"]
    for lv in report["levels"]:
        def trio(d: dict[str, Any]) -> str:
            return " / ".join(fmt_s(d[k]) for k in ("p50", "p95", "p99"))

        lines.append(f"| {lv['concurrency']} | {lv['req_per_s']:.2f} | {lv['output_tokens_per_s']:.1f} | "
                     f"{trio(lv['ttft_s'])} | {trio(lv['itl_s'])} | {trio(lv['e2e_s'])} | "
                     f"{lv['ok']} / {lv['failed']} |")
    st = report["seed_targets"]
    verdict = "met" if st["met"] else "NOT met"
    lines.append("")
    lines.append(f"Seed targets (>= {st['min_req_per_s']:g} req/s and p95 e2e < {st['max_p95_e2e_s']:g} s at one "
                 f"level): **{verdict}**" + (" at c=" + ", ".join(str(r["concurrency"]) for r in st["levels"]
                                                             if r["meets_both"]) if st["met"] else ""))
    return head + "\n".join(lines) + "\n"


def write_report(report: dict[str, Any], out_dir: Path, name: str = "bench") -> tuple[Path, Path]:
    import json

    out_dir.mkdir(parents=True, exist_ok=True)
    jpath, mpath = out_dir / f"{name}.json", out_dir / f"{name}.md"
    jpath.write_text(json.dumps(report, indent=2) + "\n")
    mpath.write_text(to_markdown(report))
    return jpath, mpath


async def bench_endpoint(endpoint: str, *, model: str | None, api_key: str | None, chat: bool, levels: list[int],
                         duration_s: float, max_tokens: int, prompt_words: int, warmup: int | None,
                         timeout_s: float = 120.0, max_requests: int | None = None,
                         log: Callable[[str], None] | None = None, probe: Callable[[], Any] | None = None
                         ) -> dict[str, Any]:
    """Benchmark one HTTP endpoint (model discovered from /v1/models when not given)."""
    from app.client.batch import discover_model

    limits = httpx.Limits(max_connections=max(levels) * 2, max_keepalive_connections=max(levels) * 2)
    async with httpx.AsyncClient(timeout=httpx.Timeout(timeout_s, connect=10.0), limits=limits) as client:
        model = model or await discover_model([endpoint], api_key)
        target = http_target(client, endpoint, model, api_key=api_key, chat=chat)
        return await run_bench(target, levels=levels, duration_s=duration_s, max_tokens=max_tokens,
                               prompt_words=prompt_words, warmup=warmup, max_requests=max_requests, log=log,
                               probe=probe,
                               describe={"kind": "http", "endpoint": endpoint, "model": model,
                                         "api": "chat" if chat else "completions"})
