"""Ray Serve's own floor on this machine: what proxy -> ingress -> replica costs with no model and none of our code.

    python -m bench.ray_floor --levels 1,8 --duration 10 --messages 3

Serves the same streamed response up to three ways (`--servers`) and drives each with one closed-loop load
generator (`c` workers, each POSTs and reads the whole SSE stream, back to back):

- `bare`: a Starlette app on uvicorn (uvloop, httptools) that writes `--messages` SSE events at once;
- `ray`: a local one-node Ray cluster (`ray.init(address="local")`, its own temp dir) with Serve's proxy on
  127.0.0.1, an ingress deployment (FastAPI, `@serve.ingress`) streaming from a handle to a replica
  deployment that yields `--messages` messages: the shape of this project's Ray path before direct ingress
  (proxy, ingress, model replica; the replica's stream coalesced into a few messages), without model or API code;
- `ray-direct`: the same app with Serve's settings of this kit (app/compat.py: direct ingress, the load goes to
  the ingress replica's own port, no proxy; user code and router on each replica's one event loop).

Reports per level req/s, e2e p50 and the CPU of every process role (bench/cpu_share.py). What Ray adds here is
the least it can add to any model on this box: compare it with the "+ ingress" and "+ proxy" columns of
compare_layers.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import secrets
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from app import compat
from app.client.loadgen import machine_info
from bench.compare_layers import env_of, free_port, key_value, stop, wait_http
from bench.cpu_share import CPUShare

ROOT = Path(__file__).resolve().parents[1]


def serve_bare(port: int, messages: int) -> None:
    import uvicorn
    from starlette.applications import Starlette
    from starlette.responses import StreamingResponse
    from starlette.routing import Route

    async def stream(request: Any) -> StreamingResponse:
        async def body() -> Any:
            for i in range(messages):
                yield f"data: {{\"message\": {i}}}\n\n"
            yield "data: [DONE]\n\n"

        return StreamingResponse(body(), media_type="text/event-stream")

    async def health(request: Any) -> Any:
        from starlette.responses import PlainTextResponse

        return PlainTextResponse("ok")

    app = Starlette(routes=[Route("/stream", stream, methods=["POST"]), Route("/healthz", health)])
    uvicorn.run(app, host="127.0.0.1", port=port, log_level="warning", http="httptools", loop="uvloop")


def serve_ray(port: int, messages: int, temp_dir: str) -> None:
    import ray
    from fastapi import FastAPI
    from fastapi.responses import StreamingResponse
    from ray import serve

    ray.init(address="local", num_cpus=2, include_dashboard=False, _temp_dir=temp_dir)
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    api = FastAPI()

    @serve.deployment(max_ongoing_requests=64)
    class Replica:
        async def __call__(self, n: int) -> Any:
            for i in range(n):
                yield i

    @serve.deployment(max_ongoing_requests=64)
    @serve.ingress(api)
    class Ingress:
        def __init__(self, replica: Any) -> None:
            self.replica = replica.options(stream=True)

        @api.post("/stream")
        async def stream(self) -> StreamingResponse:
            gen = self.replica.remote(messages)

            async def body() -> Any:
                async for i in gen:
                    yield f"data: {{\"message\": {i}}}\n\n"
                yield "data: [DONE]\n\n"

            return StreamingResponse(body(), media_type="text/event-stream")

        @api.get("/healthz")
        async def health(self) -> str:
            return "ok"

    serve.run(Ingress.bind(Replica.bind()), route_prefix="/")  # type: ignore[attr-defined]
    print("ready", flush=True)
    while True:
        time.sleep(3600)


async def load(url: str, concurrency: int, duration: float) -> dict[str, Any]:
    import httpx

    latencies: list[float] = []
    failed = 0
    limits = httpx.Limits(max_connections=concurrency)
    async with httpx.AsyncClient(timeout=30, limits=limits) as client:

        async def worker(deadline: float, record: bool) -> None:
            nonlocal failed
            while time.monotonic() < deadline:
                t0 = time.perf_counter()
                try:
                    async with client.stream("POST", url + "/stream") as resp:
                        async for _ in resp.aiter_lines():
                            pass
                    ok = resp.status_code == 200
                except httpx.HTTPError:
                    ok = False
                if record:
                    if ok:
                        latencies.append(time.perf_counter() - t0)
                    else:
                        failed += 1

        await asyncio.gather(*(worker(time.monotonic() + 1.0, False) for _ in range(concurrency)))  # warm-up
        with CPUShare() as share:
            t0 = time.monotonic()
            await asyncio.gather(*(worker(t0 + duration, True) for _ in range(concurrency)))
            wall = time.monotonic() - t0
    return {"c": concurrency, "req_s": round(len(latencies) / wall, 1), "ok": len(latencies), "failed": failed,
            "e2e_p50_ms": round(statistics.median(latencies) * 1e3, 1) if latencies else None,
            "cpu": share.result()}


SERVERS = ("bare", "ray", "ray-direct")


def server_env(kind: str, extra: list[str]) -> tuple[dict[str, str], int, int]:
    """The environment a server kind runs with, the port it is started on and the port the load goes to.

    `ray-direct` runs Serve as the kit does (app/compat.py): direct ingress, the ingress replica serving HTTP on a
    port of its own (one free port) so the load skips the proxy, and every replica on one event loop."""
    env = {**os.environ, "RAY_AUTH_TOKEN": os.environ.get("RAY_AUTH_TOKEN") or secrets.token_hex(32)}
    if kind.startswith("ray"):
        env.update(env_of(extra))
    port = free_port()
    if kind != "ray-direct":
        return env, port, port
    direct = free_port()
    env.update({**compat.serve_direct_ingress_env(direct), **compat.SERVE_ONE_LOOP_VARS})
    return env, port, direct


def run(args: argparse.Namespace) -> dict[str, Any]:
    results: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="ray-floor-") as tmp:
        for kind in args.servers:
            env, port, target = server_env(kind, args.ray_env)
            serve_as = "bare" if kind == "bare" else "ray"
            cmd = [sys.executable, "-m", "bench.ray_floor", f"--serve-{serve_as}", str(port), "--messages",
                   str(args.messages), "--ray-temp-dir", tmp]
            with open(Path(tmp) / f"{kind}.log", "wb") as logf:
                proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=logf, stderr=subprocess.STDOUT,
                                        start_new_session=True)
            try:
                wait_http(f"http://127.0.0.1:{target}/healthz", 300, proc, kind)
                results[kind] = [asyncio.run(load(f"http://127.0.0.1:{target}", c, args.duration))
                                 for c in args.levels]
            finally:
                stop(proc)
    return results


def markdown(result: dict[str, Any]) -> str:
    out = [f"Ray Serve's floor, {result['date']} · {result['machine'].get('cpus')} CPUs · load average "
           f"{result['loadavg_before']} before / {result['loadavg_after']} after · {result['messages']} messages "
           "per response" + (f" · Ray env {' '.join(result['ray_env'])}" if result.get("ray_env") else ""),
           f"Command: `{result['command']}`", "",
           "| server | c | req/s | e2e p50 | ok/failed | CPU by process |", "|---|---:|---:|---:|---:|---|"]
    for kind, levels in result["servers"].items():
        for lv in levels:
            cpu = ", ".join(f"{k} {v:.2f}" for k, v in lv["cpu"].items() if v >= 0.01)
            out.append(f"| {kind} | {lv['c']} | {lv['req_s']} | {lv['e2e_p50_ms']} ms | {lv['ok']}/{lv['failed']} "
                       f"| {cpu} |")
    return "\n".join(out) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--levels", type=lambda s: [int(x) for x in s.split(",")], default=[1, 8])
    ap.add_argument("--duration", type=float, default=10.0, help="seconds per level")
    ap.add_argument("--messages", type=int, default=3, help="SSE events (Ray: replica messages) per response")
    ap.add_argument("--out", type=Path, default=None, help="folder for ray-floor.json and ray-floor.md")
    ap.add_argument("--servers", type=lambda s: s.split(","), default=["bare", "ray"],
                    help=f"which of {','.join(SERVERS)} to measure, in this order")
    ap.add_argument("--ray-env", action="append", default=[], metavar="KEY=VALUE", type=key_value,
                    help="an environment variable for the Ray servers (repeatable), e.g. Serve's flags")
    ap.add_argument("--serve-bare", type=int, default=None, help=argparse.SUPPRESS)
    ap.add_argument("--serve-ray", type=int, default=None, help=argparse.SUPPRESS)
    ap.add_argument("--ray-temp-dir", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    unknown = [k for k in args.servers if k not in SERVERS]
    if unknown:
        ap.error(f"unknown server kind: {', '.join(unknown)}")
    if args.serve_bare is not None:
        serve_bare(args.serve_bare, args.messages)
        return 0
    if args.serve_ray is not None:
        serve_ray(args.serve_ray, args.messages, args.ray_temp_dir or tempfile.mkdtemp(prefix="ray-floor-"))
        return 0
    before = round(os.getloadavg()[0], 2)
    servers = run(args)
    result = {"schema": "llm-kit-ray-floor/1", "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
              "command": "python -m bench.ray_floor " + " ".join(argv if argv is not None else sys.argv[1:]),
              "machine": machine_info(), "loadavg_before": before, "loadavg_after": round(os.getloadavg()[0], 2),
              "messages": args.messages, "ray_env": args.ray_env, "servers": servers}
    md = markdown(result)
    print(md)
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "ray-floor.json").write_text(json.dumps(result, indent=1))
        (args.out / "ray-floor.md").write_text(md)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
