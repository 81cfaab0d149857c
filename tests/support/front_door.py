"""Front-door processes for tests: the rendered nginx in front of servers on 127.0.0.1, and load loops through it."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
from pathlib import Path

import httpx

from app.ops.nginx import NginxSettings, render_nginx
from tests.support.env import ROOT, need_binary
from tests.support.servers import free_port, stop_process, wait_until

COMPLETION = {"model": "tiny", "prompt": "hello", "max_tokens": 4}


class FrontDoorProcess:
    """`python -m app ops front-door` with a private nginx prefix, configured through the environment."""

    def __init__(self, prefix: Path, primary: str, backups: str, **env: str) -> None:
        need_binary("nginx")
        self.prefix, self.port = prefix, free_port()
        self.base_url = f"http://127.0.0.1:{self.port}"
        self.log_path = prefix.parent / f"{prefix.name}.log"
        self.env = {**os.environ, "NGINX_PRIMARY": primary, "NGINX_BACKUPS": backups, "NGINX_PORT": str(self.port),
                    "NGINX_STATUS_PORT": str(free_port()), "NGINX_WORKER_PROCESSES": "2",
                    "NGINX_EXPOSE_UPSTREAM": "true", **env}
        self._log = open(self.log_path, "wb")
        self.proc = subprocess.Popen([sys.executable, "-m", "app", "ops", "front-door", "--out", str(prefix)],
                                     cwd=ROOT, env=self.env, stdout=self._log, stderr=subprocess.STDOUT)

    def wait_up(self) -> FrontDoorProcess:
        def up() -> bool:
            assert self.proc.poll() is None, self.log()[-3000:]
            try:
                return httpx.get(self.base_url + "/nginx-health", timeout=2).status_code == 200
            except httpx.TransportError:
                return False

        wait_until(up, 60, 0.1, "front door's nginx")
        return self

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def stop(self) -> int | None:
        rc = stop_process(self.proc, signal.SIGTERM, 20)
        self._log.close()
        return rc


class Nginx:
    """A private nginx (own prefix, pid, temp and log paths) started from a rendered config."""

    def __init__(self, prefix: Path, **settings: object) -> None:
        need_binary("nginx")
        self.prefix = prefix
        self.port = free_port()
        self.status_port = free_port()
        self.settings = NginxSettings(nginx_port=self.port, nginx_status_port=self.status_port,
                                      nginx_worker_processes="2", **settings)  # type: ignore[arg-type]
        self.conf = render_nginx(prefix, self.settings)
        self.base_url = f"http://127.0.0.1:{self.port}"
        self.proc: subprocess.Popen[bytes] | None = None

    def cmd(self, *extra: str) -> list[str]:
        return ["nginx", "-p", str(self.prefix), "-e", str(self.prefix / "logs" / "error.log"),
                "-c", str(self.conf), *extra]

    def start(self) -> Nginx:
        self.proc = subprocess.Popen(self.cmd("-g", "daemon off;"), stdout=subprocess.DEVNULL,
                                     stderr=subprocess.STDOUT)

        def up() -> bool:
            if self.proc and self.proc.poll() is not None:
                raise RuntimeError(f"nginx exited {self.proc.returncode}: {self.error_log()[-2000:]}")
            return httpx.get(self.base_url + "/nginx-health", timeout=2).status_code == 200

        wait_until(up, 30, 0.1, "nginx /nginx-health")
        return self

    def error_log(self) -> str:
        path = self.prefix / "logs" / "error.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def access_log(self) -> str:
        return (self.prefix / "logs" / "access.log").read_text(errors="replace")

    def stop(self) -> None:
        if self.proc:
            stop_process(self.proc, signal.SIGQUIT, 15)  # graceful: lets the access log flush


def request_loop(url: str, n: int, threads: int, on_index: dict[int, object]) -> list[tuple[int, str]]:
    """n POSTs from `threads` workers; callable `on_index[i]` runs (once) just before request i is sent."""
    results: list[tuple[int, str]] = []
    lock = threading.Lock()
    counter = iter(range(n))

    def worker() -> None:
        with httpx.Client(timeout=60) as client:
            while True:
                with lock:
                    i = next(counter, None)
                if i is None:
                    return
                hook = on_index.get(i)
                if callable(hook):
                    hook()
                try:
                    r = client.post(url, json=COMPLETION)
                    item = (r.status_code, r.headers.get("x-upstream", ""))
                except httpx.HTTPError as exc:
                    item = (-1, type(exc).__name__)
                with lock:
                    results.append(item)

    pool = [threading.Thread(target=worker) for _ in range(threads)]
    for t in pool:
        t.start()
    for t in pool:
        t.join(300)
    return results
