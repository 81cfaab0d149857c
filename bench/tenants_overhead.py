"""The router's cost of enforcing a keys file: req/s with and without one, same run, paired rounds.

    python -m bench.tenants_overhead --rounds 5 --seconds 8 --concurrency 8 --tokens 4

Starts two API servers on 127.0.0.1 in their own processes (uvicorn, the ONE `create_app`, `FakeEngine`: no
model, so the router is all there is), both with bearer auth: `plain` with the key in `API_KEYS`, `keys` with the
same traffic's key in a keys file that gives it every limit (rpm, tpm and concurrency set far above what the run
sends, so nothing is refused and every request pays the full bookkeeping: file check, hash lookup, three budgets,
x-ratelimit headers, token charging per chunk, per-key metrics and SQLite usage). Rounds alternate plain/keys
(order swapped every round) with `--concurrency` clients sending short non-streamed completions (`--tokens`), and
the report is the median of the per-round ratios keys/plain, so the box's drift between rounds cancels out.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
KEY = "sk-bench-" + "x" * 32


def _serve(port: int, keys_file: str, usage_db: str) -> None:
    """The server process: the API app over FakeEngine on uvicorn."""
    sys.path.insert(0, str(ROOT))
    import uvicorn

    from app.api.app import create_app
    from app.api.backend import LocalBackend
    from app.metrics import PrometheusSink
    from bench.fake_engine import FakeEngine

    sink = PrometheusSink()
    engine = FakeEngine("fake", metrics=sink, max_num_seqs=64, max_waiting=64, max_context=256)
    app = create_app(LocalBackend({"fake": engine}), metrics=sink, api_keys=[] if keys_file else [KEY],
                     keys_file=keys_file or None, usage_db=usage_db or None)
    asyncio.run(engine.start())
    uvicorn.run(app, host="127.0.0.1", port=port, log_level="warning", access_log=False)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def _round(base: str, seconds: float, concurrency: int, tokens: int) -> float:
    import httpx

    body = {"model": "fake", "prompt": "x", "max_tokens": tokens}
    done = 0
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(base_url=base, headers={"Authorization": f"Bearer {KEY}"}, limits=limits,
                                 timeout=30) as http:
        deadline = time.monotonic() + seconds

        async def worker() -> None:
            nonlocal done
            while time.monotonic() < deadline:
                r = await http.post("/v1/completions", json=body)
                if r.status_code != 200:
                    raise RuntimeError(f"{r.status_code}: {r.text}")
                done += 1

        t0 = time.monotonic()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        return done / (time.monotonic() - t0)


def run(rounds: int, seconds: float, concurrency: int, tokens: int) -> dict[str, object]:
    import httpx

    sys.path.insert(0, str(ROOT))
    from app.tenants.keyfile import KeyEntry, KeysFile, hash_key, save

    tmp = Path(tempfile.mkdtemp(prefix="tenants-bench-"))
    keys_file = tmp / "keys.yaml"
    save(keys_file, KeysFile(keys=[KeyEntry(name="bench", hash=hash_key(KEY), rpm=10**9, tpm=10**12,
                                            concurrency=10**6, models=("fake*",))]))
    procs: dict[str, subprocess.Popen[bytes]] = {}
    bases: dict[str, str] = {}
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    try:
        for name, kf, db in (("plain", "", ""), ("keys", str(keys_file), str(tmp / "usage.sqlite"))):
            port = _free_port()
            code = f"from bench.tenants_overhead import _serve; _serve({port}, {kf!r}, {db!r})"
            procs[name] = subprocess.Popen([sys.executable, "-c", code], cwd=ROOT, env=env)
            bases[name] = f"http://127.0.0.1:{port}"
        for name, base in bases.items():
            deadline = time.monotonic() + 60
            while True:
                try:
                    if httpx.get(base + "/healthz", timeout=1).status_code == 200:
                        break
                except httpx.HTTPError:
                    pass
                if time.monotonic() > deadline or procs[name].poll() is not None:
                    raise RuntimeError(f"{name} server did not start")
                time.sleep(0.2)
        for base in bases.values():  # warm-up
            asyncio.run(_round(base, 1.0, concurrency, tokens))
        rows = []
        for i in range(rounds):
            order = ["plain", "keys"] if i % 2 == 0 else ["keys", "plain"]
            rate = {name: asyncio.run(_round(bases[name], seconds, concurrency, tokens)) for name in order}
            rows.append({"plain": round(rate["plain"], 1), "keys": round(rate["keys"], 1),
                         "ratio": round(rate["keys"] / rate["plain"], 3)})
            print(f"round {i + 1}: plain {rate['plain']:.1f} req/s, keys {rate['keys']:.1f} req/s, "
                  f"ratio {rate['keys'] / rate['plain']:.3f}", flush=True)
    finally:
        for proc in procs.values():
            proc.terminate()
            proc.wait(20)
    return {"rounds": rows, "median_ratio": statistics.median(r["ratio"] for r in rows),
            "median_plain": statistics.median(r["plain"] for r in rows),
            "median_keys": statistics.median(r["keys"] for r in rows),
            "concurrency": concurrency, "tokens": tokens, "seconds": seconds,
            "load_average": os.getloadavg()}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--seconds", type=float, default=8.0, help="seconds per server per round")
    ap.add_argument("--concurrency", type=int, default=8)
    ap.add_argument("--tokens", type=int, default=4, help="max_tokens of each completion")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)
    result = run(args.rounds, args.seconds, args.concurrency, args.tokens)
    print(json.dumps(result) if args.json else
          f"median keys/plain {result['median_ratio']:.3f} (plain {result['median_plain']} req/s, keys "
          f"{result['median_keys']} req/s; load average {result['load_average']})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
