"""The server-side batch service against the client-side batch loop, same server, same concurrency (issue 26).

    python -m bench.batch_service [--lines 2000] [--concurrency 8] [--max-tokens 16] [--endpoint URL]

Starts `python -m app serve` on the tiny model (unless `--endpoint` names a running server), then in one run:
1. `client`: `python -m app batch` (the client-side loop) sends the lines at `--concurrency`;
2. `service`: `python -m app batch-server` (its runner at the same concurrency, per batch and overall) gets the
   same lines as an OpenAI batch file; timed from the upload to `completed`;
and, for the interactive side, the TTFT of streamed chat requests sent one after another: on the idle server,
while the service's (flex) batch runs, and while the client's (default tier) batch runs.
Writes bench/results/batch-service.{json,md} (or `--out`).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import httpx

from bench.compare_layers import ROOT, ensure_model, free_port, stop, wait_http


def lines(n: int, max_tokens: int) -> tuple[str, str]:
    """The same requests as client input and as an OpenAI batch file."""
    client, service = [], []
    for i in range(n):
        body = {"model": "tiny", "prompt": f"batch item {i}: the quick brown fox", "max_tokens": max_tokens,
                "min_tokens": max_tokens, "ignore_eos": True}
        client.append(json.dumps({"id": i, **body}))
        service.append(json.dumps({"custom_id": str(i), "method": "POST", "url": "/v1/completions", "body": body}))
    return "\n".join(client) + "\n", "\n".join(service) + "\n"


def ttft_probe(base: str, stop_flag: threading.Event, out: list[float], limit: int) -> None:
    """Streamed chat requests one after another (interactive traffic) until `stop_flag` or `limit` requests."""
    body = {"model": "tiny", "messages": [{"role": "user", "content": "hello there"}], "max_tokens": 8,
            "min_tokens": 8, "ignore_eos": True, "stream": True}
    with httpx.Client(timeout=120) as http:
        while not stop_flag.is_set() and len(out) < limit:
            t0 = time.perf_counter()
            first = None
            with http.stream("POST", base + "/v1/chat/completions", json=body) as r:
                for chunk in r.iter_lines():  # read to the end: the next request starts after this one
                    if first is None and chunk.startswith("data:") and '"content"' in chunk:
                        first = time.perf_counter() - t0
            if first is not None:
                out.append(first)


def p50_ms(values: list[float]) -> float | None:
    return round(statistics.median(values) * 1000, 1) if values else None


def run_client(base: str, src: Path, out: Path, concurrency: int) -> float:
    t0 = time.perf_counter()
    res = subprocess.run([sys.executable, "-m", "app", "batch", str(src), "-o", str(out), "--endpoint", base,
                          "--concurrency", str(concurrency), "--no-progress"], cwd=ROOT, capture_output=True,
                         text=True, timeout=3600)
    if res.returncode != 0:
        raise RuntimeError(f"python -m app batch failed: {res.stderr[-2000:]}")
    return time.perf_counter() - t0


def run_service(base: str, src: Path, work: Path, concurrency: int) -> tuple[float, dict[str, Any]]:
    port = free_port()
    env = {**os.environ, "LLM_BATCH_CONCURRENCY": str(concurrency), "LLM_BATCH_CONCURRENCY_PER_BATCH":
           str(concurrency)}
    with open(work / "batch-server.log", "wb") as log:
        proc = subprocess.Popen([sys.executable, "-m", "app", "batch-server", "--port", str(port), "--data-dir",
                                 str(work / "batch-state"), "--target-url", base], cwd=ROOT, env=env, stdout=log,
                                stderr=subprocess.STDOUT)
    try:
        url = f"http://127.0.0.1:{port}"
        wait_http(url + "/healthz", 60, proc, "batch-server")
        with httpx.Client(base_url=url + "/v1", timeout=600) as http:
            t0 = time.perf_counter()
            with open(src, "rb") as f:
                file_id = http.post("/files", data={"purpose": "batch"}, files={"file": ("in.jsonl", f)}).json()["id"]
            batch = http.post("/batches", json={"input_file_id": file_id, "endpoint": "/v1/completions",
                                                "completion_window": "24h"}).json()
            while batch["status"] not in ("completed", "failed", "expired", "cancelled"):
                time.sleep(0.2)  # polling the batch's state, as a client does
                batch = http.get(f"/batches/{batch['id']}").json()
            return time.perf_counter() - t0, batch
    finally:
        stop(proc)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--lines", type=int, default=2000)
    ap.add_argument("--concurrency", type=int, default=8)
    ap.add_argument("--max-tokens", type=int, default=16)
    ap.add_argument("--probes", type=int, default=30, help="Interactive TTFT requests per condition (at most).")
    ap.add_argument("--endpoint", help="A running server (default: start one on the tiny model).")
    ap.add_argument("--model", help="Model folder (default: the tiny model).")
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results")
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="bench-batch-"))
    server = None
    base = args.endpoint
    if base is None:
        port = free_port()
        base = f"http://127.0.0.1:{port}"
        server = subprocess.Popen([sys.executable, "-m", "app", "serve", "--model", str(ensure_model(args.model, work)),
                                   "--served-model-name", "tiny", "--port", str(port), "--engine", "transformers"],
                                  cwd=ROOT, stdout=open(work / "server.log", "wb"), stderr=subprocess.STDOUT)
    try:
        wait_http(base + "/readyz", 300, server, "server")
        client_in, service_in = lines(args.lines, args.max_tokens)
        (work / "client.jsonl").write_text(client_in)
        (work / "service.jsonl").write_text(service_in)
        idle: list[float] = []
        ttft_probe(base, threading.Event(), idle, args.probes)
        results: dict[str, Any] = {"lines": args.lines, "concurrency": args.concurrency,
                                   "max_tokens": args.max_tokens, "ttft_p50_ms": {"idle": p50_ms(idle)}}
        for name in ("client", "service"):
            probes: list[float] = []
            flag = threading.Event()
            prober = threading.Thread(target=ttft_probe, args=(base, flag, probes, args.probes))
            prober.start()
            try:
                if name == "client":
                    wall = run_client(base, work / "client.jsonl", work / "client-out.jsonl", args.concurrency)
                    done = (work / "client-out.jsonl").read_text().splitlines()
                    ok = sum(bool(json.loads(x).get("ok")) for x in done)
                else:
                    wall, batch = run_service(base, work / "service.jsonl", work, args.concurrency)
                    ok = batch["request_counts"]["completed"]
            finally:
                flag.set()
                prober.join(120)
            results[name] = {"wall_s": round(wall, 2), "ok": ok, "req_per_s": round(args.lines / wall, 2)}
            results["ttft_p50_ms"][f"during {name} batch"] = p50_ms(probes)
        results["ratio_service_to_client"] = round(results["service"]["req_per_s"] / results["client"]["req_per_s"], 3)
    finally:
        stop(server)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "batch-service.json").write_text(json.dumps(results, indent=2) + "\n")
    t = results["ttft_p50_ms"]
    md = (f"| path | lines | c | wall s | req/s | ok |\n|---|---|---|---|---|---|\n"
          f"| `python -m app batch` (client) | {args.lines} | {args.concurrency} | {results['client']['wall_s']} | "
          f"{results['client']['req_per_s']} | {results['client']['ok']} |\n"
          f"| batch service (runner, flex) | {args.lines} | {args.concurrency} | {results['service']['wall_s']} | "
          f"{results['service']['req_per_s']} | {results['service']['ok']} |\n\n"
          f"service / client: {results['ratio_service_to_client']}. Interactive TTFT p50: idle {t['idle']} ms, "
          f"during the client batch {t['during client batch']} ms, during the service batch "
          f"{t['during service batch']} ms.\n")
    (args.out / "batch-service.md").write_text(md)
    print(md)


if __name__ == "__main__":
    main()
