"""Fault steps of the interview demo (`deploy-ray.sh demo`), run against the local cluster on 127.0.0.1.

`replica_kill`: traffic flows while one model replica is SIGKILLed; reports failed requests and how long
Ray Serve took to have a replacement replica serving. `nginx_failover`: a fallback server and nginx (the
shipped template) are started in front of the local Ray Serve proxy, the whole local Ray cluster is
SIGKILLed mid-traffic, and nginx sends the rest to the fallback. Every loop is bounded and only
127.0.0.1 is ever contacted.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[2]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _wait(predicate: Callable[[], object], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if predicate():
                return
        except Exception:  # not up yet: keep polling until the deadline
            pass
        time.sleep(0.5)
    raise TimeoutError(f"timed out after {timeout:.0f}s waiting for {what}")


def _body(model: str) -> dict:
    return {"model": model, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 8}


def _chat(url: str, model: str) -> int:
    """Status of one chat request (0 when it got no answer)."""
    try:
        return httpx.post(url, json=_body(model), timeout=60).status_code
    except httpx.HTTPError:
        return 0


@dataclass
class _Load:
    """A bounded request loop on a background thread (stops after `max_requests` or `stop()`)."""

    url: str
    model: str
    max_requests: int = 400
    results: Counter[str] = field(default_factory=Counter)
    upstreams: Counter[str] = field(default_factory=Counter)
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None

    def _run(self) -> None:
        with httpx.Client(timeout=60) as client:
            for _ in range(self.max_requests):
                if self._stop.is_set():
                    return
                try:
                    r = client.post(self.url, json=_body(self.model))
                    self.results[str(r.status_code)] += 1
                    if "x-upstream" in r.headers:
                        self.upstreams[r.headers["x-upstream"]] += 1
                except httpx.HTTPError as exc:
                    self.results[type(exc).__name__] += 1

    def start(self) -> _Load:
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread:
            self._thread.join(90)

    @property
    def total(self) -> int:
        return sum(self.results.values())

    @property
    def failed(self) -> int:
        return self.total - self.results.get("200", 0)


def _status(address: str) -> dict:
    out = subprocess.run([sys.executable, "-m", "app", "cluster", "status", "--json", "--address", address],
                         capture_output=True, text=True, timeout=120, cwd=ROOT, check=True).stdout
    return json.loads(out[out.index("{"):])


def replica_kill(serve_port: int, address: str, model: str, timeout: float = 180.0) -> dict:
    """SIGKILL one replica of `model` under traffic; wait for a replacement that answers."""
    replicas = [r for r in _status(address)["replicas"] if r.get("model") == model]
    if not replicas:
        raise RuntimeError(f"no running replica of {model!r} found in `cluster status`")
    victim = int(replicas[0]["pid"])
    load = _Load(f"http://127.0.0.1:{serve_port}/v1/chat/completions", model).start()
    _wait(lambda: load.total >= 5, 60, "traffic before the kill")
    print(f"  SIGKILL replica pid {victim} of {model} (after {load.total} requests)", flush=True)
    t0 = time.monotonic()
    os.kill(victim, signal.SIGKILL)

    def replaced() -> bool:
        pids = {int(r["pid"]) for r in _status(address)["replicas"] if r.get("model") == model}
        return bool(pids - {victim}) and load.results.get("200", 0) > 0

    _wait(replaced, timeout, "a replacement replica")
    recovered = time.monotonic() - t0
    # the replacement answers requests of its own: the bounded load may have run out while `cluster status` was
    # slow (a loaded box), so it cannot be the proof
    for _ in range(3):
        _wait(lambda: _chat(load.url, model) == 200, 60, "requests served by the replacement")
    load.stop()
    report = {"killed_pid": victim, "replacement_s": round(recovered, 1), "requests": load.total,
              "failed": load.failed, "results": dict(load.results)}
    print(f"  replacement replica registered {recovered:.1f}s after the kill; {load.total} requests, "
          f"{load.failed} failed (those in flight at the kill): {dict(load.results)}", flush=True)
    return report


def nginx_failover(serve_port: int, model: str, model_dir: Path, kill_ray: Callable[[], None]) -> dict:
    """nginx (Ray primary, fallback backup) under traffic while the whole Ray cluster is SIGKILLed."""
    from app.ops.nginx import NginxSettings, render_nginx

    if shutil.which("nginx") is None:
        raise RuntimeError("nginx is not installed (Debian: apt-get install nginx-light)")
    work = Path(tempfile.mkdtemp(prefix="llm-demo-"))
    fb_port, ng_port, st_port = _free_port(), _free_port(), _free_port()
    procs: list[subprocess.Popen[bytes]] = []
    try:
        procs.append(subprocess.Popen(
            [sys.executable, "-m", "app", "serve", "--model", str(model_dir), "--served-model-name", model,
             "--host", "127.0.0.1", "--port", str(fb_port), "--engine", "transformers"],
            cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT))
        prefix = work / "nginx"
        settings = NginxSettings(serve_port=serve_port, fallback_port=str(fb_port), nginx_port=ng_port,
                                 nginx_status_port=st_port, nginx_expose_upstream=True, nginx_read_timeout="30s",
                                 nginx_bind="127.0.0.1")
        conf = render_nginx(prefix, settings)
        procs.append(subprocess.Popen(
            ["nginx", "-p", str(prefix), "-e", str(prefix / "logs" / "error.log"), "-c", str(conf),
             "-g", "daemon off;"], stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT))
        _wait(lambda: httpx.get(f"http://127.0.0.1:{fb_port}/readyz", timeout=2).status_code == 200, 120,
              "the fallback server")
        _wait(lambda: httpx.get(f"http://127.0.0.1:{ng_port}/nginx-health", timeout=2).status_code == 200, 30,
              "nginx")
        print(f"  nginx on 127.0.0.1:{ng_port}: primary Ray Serve :{serve_port}, backup fallback :{fb_port}",
              flush=True)
        load = _Load(f"http://127.0.0.1:{ng_port}/v1/chat/completions", model, max_requests=300).start()
        _wait(lambda: load.upstreams.get(f"127.0.0.1:{serve_port}", 0) >= 5, 60, "traffic through Ray")
        print(f"  SIGKILL every process of the local Ray cluster (after {load.total} requests)", flush=True)
        kill_ray()
        fb = f"127.0.0.1:{fb_port}"
        _wait(lambda: sum(n for up, n in load.upstreams.items() if fb in up) >= 10, 120, "traffic on the fallback")
        load.stop()
        report = {"requests": load.total, "failed": load.failed, "results": dict(load.results),
                  "upstreams": dict(load.upstreams)}
        print(f"  {load.total} requests through nginx, {load.failed} failed; served by: {dict(load.upstreams)}",
              flush=True)
        return report
    finally:
        for p in reversed(procs):
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
                try:
                    p.wait(30)
                except subprocess.TimeoutExpired:
                    p.kill()
        shutil.rmtree(work, ignore_errors=True)


def kill_local_cluster() -> None:
    """SIGKILL every process of the cluster `cluster local-up` recorded (a crash, not a drain)."""
    from app.cluster import local

    state = local.read_state()
    if state is None:
        raise RuntimeError("no local cluster recorded in .run/ (run `python -m app cluster local-up`)")
    for pid in [state.pid, *local._our_pids(state.temp_dir, state.pid)]:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
