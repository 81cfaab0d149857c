"""The front door (`python -m app ops front-door`): nginx as a child, driven by active health checks.

nginx OSS only notices a failed upstream passively, from the requests that pay for it: a frozen primary
(it accepts TCP, never answers) costs every request that reaches it a full read timeout. This supervisor
renders nginx.conf (app.ops.nginx), starts nginx in the foreground as its child, polls every upstream
server's `NGINX_CHECK_PATH` each `NGINX_CHECK_INTERVAL_S` with a `NGINX_CHECK_TIMEOUT_S` bound, marks a
server down after `NGINX_CHECK_FALL` consecutive failures and up again after `NGINX_CHECK_RISE` successes,
and on every change re-renders the upstream block (`down` on the failed servers) and reloads nginx with
SIGHUP (requests in flight finish on the old workers). Detection of a frozen primary therefore takes about
fall x (interval + timeout) seconds, and no request that arrives after it goes near the frozen server.

SIGHUP to the supervisor re-renders from the environment and reloads; SIGTERM/SIGINT stop nginx gracefully
(SIGQUIT: in-flight requests finish) and the supervisor exits with nginx's status. If nginx dies the
supervisor exits too (the container's restart policy restarts both). nginx/README.md argues this design
against HAProxy/Envoy active checks and nginx Plus / njs.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO

import httpx

from app.ops.nginx import NginxSettings, render_nginx
from app.ops.render import RenderError

log = logging.getLogger(__name__)


@dataclass
class ServerHealth:
    """The checker's view of one upstream server: up/down with fall/rise hysteresis."""

    address: str
    fall: int
    rise: int
    up: bool = True  # a server is trusted until it fails `fall` checks in a row
    streak: int = 0  # consecutive results contradicting `up`
    last_error: str = ""

    def record(self, ok: bool, error: str = "") -> bool:
        """Count one check; True when the server's state flipped."""
        self.last_error = error
        if ok == self.up:
            self.streak = 0
            return False
        self.streak += 1
        if self.streak >= (self.fall if self.up else self.rise):
            self.up, self.streak = ok, 0
            return True
        return False


@dataclass
class FrontDoor:
    """Render, run and steer one nginx (prefix `out_dir`) from `settings`."""

    out_dir: Path
    settings: NginxSettings = field(default_factory=NginxSettings)
    nginx_bin: str = "nginx"
    servers: dict[str, ServerHealth] = field(init=False)
    reloads: int = field(default=0, init=False)

    def __post_init__(self) -> None:
        self.servers = {}
        self.adopt(self.settings)

    def adopt(self, settings: NginxSettings) -> None:
        """Use `settings` (servers already known keep their state)."""
        self.settings = settings
        self.servers = {hp: self.servers.get(hp) or ServerHealth(hp, settings.nginx_check_fall,
                                                                 settings.nginx_check_rise)
                        for hp in settings.upstreams()}

    @property
    def down(self) -> frozenset[str]:
        return frozenset(hp for hp, h in self.servers.items() if not h.up)

    def render(self) -> Path:
        return render_nginx(self.out_dir, self.settings, down=self.down)

    def nginx_cmd(self, conf: Path, *extra: str) -> list[str]:
        error_log = self.settings.nginx_error_log
        return [self.nginx_bin, "-p", str(self.out_dir), "-e", error_log, "-c", str(conf), *extra]

    def check_config(self, conf: Path) -> None:
        """`nginx -t` on the rendered file: a config nginx would refuse stops the front door with its reason."""
        res = subprocess.run(self.nginx_cmd(conf, "-t", "-q"), capture_output=True, text=True, timeout=30)
        if res.returncode != 0:
            raise RenderError(f"nginx -t refused {conf}: {res.stderr.strip()}")

    async def probe(self, client: httpx.AsyncClient, address: str) -> tuple[bool, str]:
        url = f"http://{address}{self.settings.nginx_check_path}"
        try:
            r = await client.get(url)
        except httpx.HTTPError as exc:
            return False, f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
        return r.status_code == 200, "" if r.status_code == 200 else f"HTTP {r.status_code}"

    async def check_round(self, client: httpx.AsyncClient) -> bool:
        """Probe every server at once; True when any changed state (the caller reloads nginx)."""
        results = await asyncio.gather(*(self.probe(client, hp) for hp in self.servers))
        changed = False
        for (hp, health), (ok, error) in zip(self.servers.items(), results, strict=True):
            if health.record(ok, error):
                changed = True
                log.warning("upstream %s is %s%s", hp, "UP" if health.up else "DOWN",
                            "" if health.up else f" ({error})")
        return changed

    async def run(self) -> int:
        """Run nginx and the checker until nginx exits; returns nginx's exit status."""
        conf = self.render()
        self.check_config(conf)
        # nginx's stdout/stderr are pipes of ours, copied to our own: a non-root nginx can open /dev/stdout and
        # /dev/stderr (NGINX_ACCESS_LOG / NGINX_ERROR_LOG) even where our own streams belong to another user
        nginx = await asyncio.create_subprocess_exec(*self.nginx_cmd(conf, "-g", "daemon off;"),
                                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        copies = [asyncio.create_task(_copy(nginx.stdout, sys.stdout.buffer)),
                  asyncio.create_task(_copy(nginx.stderr, sys.stderr.buffer))]
        loop = asyncio.get_running_loop()
        rerender = asyncio.Event()

        def stop() -> None:
            if nginx.returncode is None:
                nginx.send_signal(signal.SIGQUIT)  # graceful: in-flight requests finish

        loop.add_signal_handler(signal.SIGTERM, stop)
        loop.add_signal_handler(signal.SIGINT, stop)
        loop.add_signal_handler(signal.SIGHUP, rerender.set)
        log.info("front door: nginx pid %s on %s:%s, checking %s every %.1fs", nginx.pid, self.settings.nginx_bind,
                 self.settings.nginx_port, ", ".join(self.servers), self.settings.nginx_check_interval_s)
        checker = asyncio.create_task(self._check_loop(nginx, rerender))
        try:
            rc = await nginx.wait()
            await asyncio.gather(*copies)
            return rc
        finally:
            checker.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await checker

    async def _check_loop(self, nginx: asyncio.subprocess.Process, rerender: asyncio.Event) -> None:
        timeout = httpx.Timeout(self.settings.nginx_check_timeout_s)
        async with httpx.AsyncClient(timeout=timeout, trust_env=False) as client:
            while True:
                started = asyncio.get_running_loop().time()
                changed = await self.check_round(client)
                if rerender.is_set():
                    rerender.clear()
                    self.adopt(NginxSettings())  # an operator changed the environment / .env
                    changed = True
                if changed:
                    self.reload(nginx)
                elapsed = asyncio.get_running_loop().time() - started
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(rerender.wait(), max(0.0, self.settings.nginx_check_interval_s - elapsed))

    def reload(self, nginx: asyncio.subprocess.Process) -> None:
        """Re-render with the current down set and SIGHUP nginx (a refused config keeps the running one)."""
        conf = self.render()
        try:
            self.check_config(conf)
        except (RenderError, subprocess.TimeoutExpired) as exc:
            log.error("not reloading: %s", exc)
            return
        if nginx.returncode is None:
            nginx.send_signal(signal.SIGHUP)
            self.reloads += 1
            log.info("nginx reloaded (down: %s)", ", ".join(sorted(self.down)) or "none")


async def _copy(source: asyncio.StreamReader | None, sink: BinaryIO) -> None:
    while source is not None and (line := await source.readline()):
        sink.write(line)
        sink.flush()


def run_front_door(out_dir: Path, settings: NginxSettings | None = None, nginx_bin: str = "nginx") -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s front-door: %(message)s")
    return asyncio.run(FrontDoor(out_dir, settings or NginxSettings(), nginx_bin=nginx_bin).run())
