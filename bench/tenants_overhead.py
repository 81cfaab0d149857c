"""The router's cost of enforcing a keys file: req/s with and without one, same run, paired rounds.

    python -m bench.tenants_overhead --rounds 5 --seconds 8 --concurrency 8 --tokens 4 [--plain-root DIR]

Starts two API servers on 127.0.0.1 in their own processes (uvicorn, the ONE `create_app`, `FakeEngine`: no
model, so the router is all there is), both with bearer auth: `plain` with the key in `API_KEYS`, `keys` with the
same traffic's key in a keys file that gives it every limit (rpm, tpm and concurrency set far above what the run
sends, so nothing is refused and every request pays the full bookkeeping: file check, hash lookup, three budgets,
x-ratelimit headers, token charging per chunk, per-key metrics and SQLite usage). Rounds alternate plain/keys
(order swapped every round) with `--concurrency` clients sending short non-streamed completions (`--tokens`).
Per round and server: req/s, and the server process's own CPU time per request (user + system, from psutil),
which a shared box's load disturbs far less than wall-clock rates. The report is the median of the per-round
ratios keys/plain for both: `rps_ratio` (keys req/s / plain req/s) and `capacity_ratio` (plain CPU per request /
keys CPU per request: the req/s a saturated core would serve with a keys file, relative to without).
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


# the server process: the API app over FakeEngine on uvicorn (a string, so that `--plain-root` can run it from a
# checkout that predates this file and the keys-file arguments)
_SERVER = """
import asyncio, sys
import uvicorn
from app.api.app import create_app
from app.api.backend import LocalBackend
from app.metrics import PrometheusSink
from bench.fake_engine import FakeEngine
port, key, keys_file, usage_db = int(sys.argv[1]), sys.argv[2], sys.argv[3], sys.argv[4]
sink = PrometheusSink()
engine = FakeEngine("fake", metrics=sink, max_num_seqs=64, max_waiting=64, max_context=256)
extra = {"keys_file": keys_file, "usage_db": usage_db} if keys_file else {}
app = create_app(LocalBackend({"fake": engine}), metrics=sink, api_keys=[] if keys_file else [key], **extra)
asyncio.run(engine.start())
uvicorn.run(app, host="127.0.0.1", port=port, log_level="warning", access_log=False)
"""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _cpu_s(pid: int) -> float:
    import psutil

    t = psutil.Process(pid).cpu_times()
    return float(t.user + t.system)


async def _round(base: str, seconds: float, concurrency: int, tokens: int) -> tuple[float, int]:
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
        return done / (time.monotonic() - t0), done


def run(rounds: int, seconds: float, concurrency: int, tokens: int, plain_root: Path = ROOT) -> dict[str, object]:
    import httpx

    sys.path.insert(0, str(ROOT))
    from app.tenants.keyfile import KeyEntry, KeysFile, hash_key, save

    tmp = Path(tempfile.mkdtemp(prefix="tenants-bench-"))
    keys_file = tmp / "keys.yaml"
    save(keys_file, KeysFile(keys=[KeyEntry(name="bench", hash=hash_key(KEY), rpm=10**9, tpm=10**12,
                                            concurrency=10**6, models=("fake*",))]))
    procs: dict[str, subprocess.Popen[bytes]] = {}
    bases: dict[str, str] = {}
    try:
        for name, root, kf, db in (("plain", plain_root, "", ""),
                                   ("keys", ROOT, str(keys_file), str(tmp / "usage.sqlite"))):
            port = _free_port()
            procs[name] = subprocess.Popen([sys.executable, "-c", _SERVER, str(port), KEY, kf, db], cwd=root,
                                           env={**os.environ, "PYTHONPATH": str(root)})
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
            asyncio.run(_round(base, 2.0, concurrency, tokens))
        rows = []
        for i in range(rounds):
            order = ["plain", "keys"] if i % 2 == 0 else ["keys", "plain"]
            rate: dict[str, float] = {}
            cpu_us: dict[str, float] = {}
            for name in order:
                before = _cpu_s(procs[name].pid)
                rate[name], done = asyncio.run(_round(bases[name], seconds, concurrency, tokens))
                cpu_us[name] = (_cpu_s(procs[name].pid) - before) / max(done, 1) * 1e6
            row = {"plain_rps": round(rate["plain"], 1), "keys_rps": round(rate["keys"], 1),
                   "plain_cpu_us": round(cpu_us["plain"]), "keys_cpu_us": round(cpu_us["keys"]),
                   "rps_ratio": round(rate["keys"] / rate["plain"], 3),
                   "capacity_ratio": round(cpu_us["plain"] / cpu_us["keys"], 3)}
            rows.append(row)
            print(f"round {i + 1}: " + ", ".join(f"{k} {v}" for k, v in row.items()), flush=True)
    finally:
        for proc in procs.values():
            proc.terminate()
            proc.wait(20)
    medians = {f"median_{k}": statistics.median(r[k] for r in rows) for k in rows[0]}
    return {"rounds": rows, "plain_root": str(plain_root), **medians,
            "concurrency": concurrency, "tokens": tokens, "seconds": seconds,
            "load_average": os.getloadavg()}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--seconds", type=float, default=8.0, help="seconds per server per round")
    ap.add_argument("--concurrency", type=int, default=8)
    ap.add_argument("--tokens", type=int, default=4, help="max_tokens of each completion")
    ap.add_argument("--plain-root", type=Path, default=ROOT,
                    help="checkout the plain server runs from (e.g. one from before tenants; default: this one)")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)
    result = run(args.rounds, args.seconds, args.concurrency, args.tokens, args.plain_root.resolve())
    print(json.dumps(result) if args.json else
          f"medians: req/s keys/plain {result['median_rps_ratio']}, capacity (CPU per request) plain/keys "
          f"{result['median_capacity_ratio']}; plain {result['median_plain_cpu_us']} us, keys "
          f"{result['median_keys_cpu_us']} us CPU per request; load average {result['load_average']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
