"""A private Prometheus server for tests: own config and TSDB folder, listening on 127.0.0.1."""

from __future__ import annotations

import signal
import subprocess
from pathlib import Path

import httpx

from app.ops.prometheus import PrometheusSettings, render_prometheus
from tests.support.env import need_binary
from tests.support.servers import free_port, stop_process, wait_until


class Prometheus:
    """A private Prometheus: own TSDB folder, listening on 127.0.0.1 only."""

    def __init__(self, workdir: Path, settings: PrometheusSettings) -> None:
        need_binary("prometheus")
        self.port = free_port()
        self.conf = render_prometheus(workdir / "conf", settings)
        self.log = open(workdir / "prometheus.log", "wb")
        self.proc = subprocess.Popen(
            ["prometheus", f"--config.file={self.conf}", f"--storage.tsdb.path={workdir / 'tsdb'}",
             f"--web.listen-address=127.0.0.1:{self.port}", "--log.level=warn"],
            stdout=self.log, stderr=subprocess.STDOUT)
        self.url = f"http://127.0.0.1:{self.port}"
        wait_until(self._ready, 60, 0.2, "prometheus /-/ready")

    def _ready(self) -> bool:
        if self.proc.poll() is not None:
            raise RuntimeError(f"prometheus exited {self.proc.returncode}")
        return httpx.get(self.url + "/-/ready", timeout=2).status_code == 200

    def query(self, expr: str) -> list[dict]:
        r = httpx.get(self.url + "/api/v1/query", params={"query": expr}, timeout=10)
        r.raise_for_status()
        return r.json()["data"]["result"]

    def stop(self) -> None:
        stop_process(self.proc, signal.SIGTERM, 20)
        self.log.close()


def scraping(server_port: int, workdir: Path) -> Prometheus:
    """A private Prometheus scraping one API server (as the fallback job, every second); the other jobs' targets
    are a port nobody listens on."""
    dead = free_port()
    return Prometheus(workdir, PrometheusSettings(
        prometheus_scrape_interval="1s", prometheus_eval_interval="1s", fallback_port=str(server_port),
        ray_metrics_export_port=dead, nginx_exporter_targets=f"127.0.0.1:{dead}",
        ray_sd_file=str(workdir / "no-ray-sd.json")))


def assert_dashboard_queries_return_data(prom: Prometheus, metric_prefix: str, count: int) -> None:
    """Every query of the shipped dashboard that reads `metric_prefix*` series returns data (within 30 s: rate()
    needs two scrapes of a series)."""
    import json

    from tests.support.dashboards import DASHBOARD, dashboard_exprs

    exprs = [(k, e) for k, e in dashboard_exprs(json.loads(DASHBOARD.read_text())) if metric_prefix in e]
    assert len(exprs) == count, exprs
    for key, expr in exprs:
        wait_until(lambda e=expr: prom.query(e), 30, 0.5, f"dashboard query {key}: {expr}")
