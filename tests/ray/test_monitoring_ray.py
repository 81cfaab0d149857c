"""The Ray path, measured for real: metrics of Ray Serve replicas in Prometheus, and nginx with Ray Serve as primary.

`python -m app cluster local-up` starts one Ray node on 127.0.0.1 (token auth on)
and deploys the kit's Serve app for the tiny model, in a private working folder.
1. A private Prometheus scrapes the node's metrics export port with the shipped
   `ray-nodes` job: Ray 2.60 exports the app's metrics as `ray_llm_*`; the job's
   metric_relabel_configs must store them under the app's own names.
2. nginx (shipped config) in front of Ray Serve (primary) and a standalone
   fallback: every Ray process is SIGKILLed during a concurrent loop of 200
   requests, and no request fails.
"""

from __future__ import annotations

import importlib.util
import json
import os
import secrets
import signal
import subprocess
import sys
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from app.metrics import exported_series_names
from app.ops.prometheus import PrometheusSettings
from tests.support.env import ROOT, need
from tests.support.front_door import Nginx, request_loop
from tests.support.prometheus import Prometheus
from tests.support.servers import free_port, wait_until


def _session_pids(sid: int) -> list[int]:
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        if int(fields[3]) == sid:
            pids.append(int(entry.name))
    return pids


class RayServe:
    """`python -m app cluster local-up` (one Ray node on 127.0.0.1, the kit's Serve app) run in a private folder.

    local-up records its state in ./.run/ of its working directory, so each test run gets its own; its head
    process starts a new session, so every Ray process of this cluster shares the head's session id.
    """

    def __init__(self, workdir: Path, tiny_model: Path) -> None:
        self.workdir = workdir
        cfg = workdir / "tiny.yaml"
        cfg.write_text((ROOT / "app" / "configs" / "tiny.yaml").read_text()
                       .replace("./.cache/tiny-model", str(tiny_model)))
        self.gcs_port, self.metrics_port, self.http_port = free_port(), free_port(), free_port()
        self.env = {**os.environ, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": secrets.token_hex(32),
                    "RAY_USAGE_STATS_ENABLED": "0"}
        self.base_url = f"http://127.0.0.1:{self.http_port}"
        self.head_pid: int | None = None
        self.up = self._cli("local-up", "--config", str(cfg), "--gcs-port", str(self.gcs_port),
                            "--serve-port", str(self.http_port), "--metrics-export-port", str(self.metrics_port),
                            "--object-store-mb", "128", "--wait", "240", timeout=300)
        state = workdir / ".run" / "local.json"
        if state.exists():
            self.head_pid = json.loads(state.read_text())["pid"]

    def _cli(self, *args: str, timeout: float) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "app", "cluster", *args], cwd=self.workdir, env=self.env,
                              capture_output=True, text=True, timeout=timeout)

    def kill_all(self) -> None:
        """SIGKILL every process of this Ray cluster (all share the head's session id)."""
        for pid in _session_pids(self.head_pid) if self.head_pid else []:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass

    def stop(self) -> None:
        try:
            self._cli("local-down", timeout=120)
        finally:
            self.kill_all()
            if self.head_pid:
                wait_until(lambda: not _session_pids(self.head_pid), 30, 0.2, "Ray processes gone")  # type: ignore[arg-type]


@pytest.fixture(scope="module")
def ray_serve(tmp_path_factory: pytest.TempPathFactory, tiny_model: Path) -> Iterator[RayServe]:
    need(importlib.util.find_spec("ray") is not None, "needs ray[serve] (the `ray` extra)")
    rs = RayServe(tmp_path_factory.mktemp("ray"), tiny_model)
    try:
        assert rs.up.returncode == 0, f"cluster local-up failed:\n{rs.up.stdout[-2000:]}\n{rs.up.stderr[-3000:]}"
        assert f"http://127.0.0.1:{rs.http_port}/v1" in rs.up.stdout  # it prints where to send requests
        yield rs
    finally:
        rs.stop()


def test_ray_replica_metrics_stored_under_app_names(ray_serve: RayServe, tmp_path: Path) -> None:
    with httpx.Client(timeout=60) as client:
        for i in range(6):
            r = client.post(ray_serve.base_url + "/v1/completions", json={"model": "tiny", "prompt": f"x{i}",
                                                                          "max_tokens": 4})
            assert r.status_code == 200, r.text
        # what Ray really exports on the node's port (prefixed), measured rather than assumed
        wait_until(lambda: "ray_llm_requests_total{" in
                   client.get(f"http://127.0.0.1:{ray_serve.metrics_port}/metrics").text,
                   120, 0.5, "ray_llm_requests_total on the Ray node's metrics export port")

    dead = free_port()
    prom = Prometheus(tmp_path, PrometheusSettings(
        prometheus_scrape_interval="1s", prometheus_eval_interval="1s", head_ip="127.0.0.1",
        ray_metrics_export_port=ray_serve.metrics_port, fallback_port=str(dead),
        nginx_exporter_targets=f"127.0.0.1:{dead}", ray_sd_file=str(tmp_path / "no-sd.json")))
    try:
        def counted() -> float:
            res = prom.query('sum(llm_requests_total{job="ray-nodes", model="tiny"})')
            return float(res[0]["value"][1]) if res else 0.0

        wait_until(lambda: counted() >= 6, 120, 0.5, "llm_requests_total from the Ray node in Prometheus")
        assert not prom.query('{__name__=~"ray_llm_.*"}'), "the ray_ prefix was not stripped"
        stored = {r["metric"]["__name__"] for r in prom.query('{job="ray-nodes", __name__=~"llm_.*"}')}
        assert {"llm_requests_total", "llm_request_latency_seconds_bucket", "llm_model_ready",
                "llm_engine_info"} <= stored <= exported_series_names()
        sample = prom.query('llm_requests_total{job="ray-nodes"}')[0]["metric"]
        assert sample["model"] == "tiny" and sample["status"] == "200" and "deployment" in sample
        assert not [k for k in sample if k.startswith("otel_scope")]
        # Ray Serve's own replica health metric (dashboard panel and no-ready-replicas alert)
        healthy = prom.query("sum by (application, deployment) (ray_serve_deployment_replica_healthy)")
        assert any(float(r["value"][1]) >= 1 for r in healthy), healthy
    finally:
        prom.stop()


def test_nginx_fails_over_from_ray_serve_primary(ray_serve: RayServe, start_server,  # type: ignore[no-untyped-def]
                                                 tmp_path: Path) -> None:
    backup = start_server()
    ngx = Nginx(tmp_path / "nginx", serve_port=ray_serve.http_port, fallback_port=str(backup.port),
                nginx_expose_upstream=True)
    ngx.start()
    try:
        results = request_loop(ngx.base_url + "/v1/completions", 200, 4, {40: ray_serve.kill_all})
    finally:
        ngx.stop()
    statuses = Counter(code for code, _ in results)
    assert statuses == {200: 200}, f"failed requests when the Ray node died: {statuses}"
    served = Counter(up.split(", ")[-1] for _, up in results)  # who answered (max_fails=0: the dead one is tried)
    print(f"\nRay primary killed: {dict(served)}")
    assert served[f"127.0.0.1:{ray_serve.http_port}"] >= 30 and served[f"127.0.0.1:{backup.port}"] >= 100, served
