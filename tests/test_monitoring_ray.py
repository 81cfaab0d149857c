"""The Ray path, measured for real: metrics of Ray Serve replicas in Prometheus, and nginx with Ray Serve as primary.

A driver process starts one Ray node on 127.0.0.1 (own temp dir, own session) and
runs the kit's Serve app (`app.serving.ingress.build_app`) for the tiny model.
1. A private Prometheus scrapes the node's metrics export port with the shipped
   `ray-nodes` job: Ray 2.60 exports the app's metrics as `ray_llm_*`; the job's
   metric_relabel_configs must store them under the app's own names.
2. nginx (shipped config) in front of Ray Serve (primary) and a standalone
   fallback: every Ray process is SIGKILLed during a concurrent loop of 200
   requests, and no request fails.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import signal
import subprocess
import sys
import tempfile
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from conftest import ROOT, free_port, need, wait_until
from test_monitoring import Prometheus
from test_nginx import Nginx, _request_loop

from app.metrics import exported_series_names
from app.ops.prometheus import PrometheusSettings

DRIVER = r"""
import os, sys
os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"  # keep Ray on 127.0.0.1
os.environ["RAY_USAGE_STATS_ENABLED"] = "0"
cfg, temp_dir, metrics_port, http_port = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
import ray
from ray import serve
from app.models.config import load_model_configs
from app.serving.ingress import build_app
ray.init(_node_ip_address="127.0.0.1", include_dashboard=False, _metrics_export_port=metrics_port,
         object_store_memory=100 * 1024 * 1024, num_cpus=2, resources={"small-model-workers": 2}, _temp_dir=temp_dir)
serve.start(http_options={"host": "127.0.0.1", "port": http_port})
serve.run(build_app(load_model_configs([cfg])), name="llm", route_prefix="/")
print("READY", flush=True)
sys.stdin.read()  # run until the test closes stdin
serve.shutdown()
ray.shutdown()
"""


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
    """One Ray node on 127.0.0.1 serving the tiny model through the kit's Serve app; all processes in one session."""

    def __init__(self, workdir: Path, tiny_model: Path) -> None:
        cfg = workdir / "tiny.yaml"
        cfg.write_text((ROOT / "app" / "configs" / "tiny.yaml").read_text()
                       .replace("./.cache/tiny-model", str(tiny_model)))
        self.temp_dir = Path(tempfile.mkdtemp(prefix="rayt", dir="/tmp"))  # short: Ray's socket paths are limited
        self.metrics_port, self.http_port = free_port(), free_port()
        self.log_path = workdir / "ray-driver.log"
        self._log = open(self.log_path, "wb")
        self.proc = subprocess.Popen(
            [sys.executable, "-c", DRIVER, str(cfg), str(self.temp_dir), str(self.metrics_port), str(self.http_port)],
            stdin=subprocess.PIPE, stdout=self._log, stderr=subprocess.STDOUT, cwd=ROOT, start_new_session=True,
            env={**os.environ, "RAY_AUTH_MODE": "", "RAY_AUTH_TOKEN": ""})
        self.base_url = f"http://127.0.0.1:{self.http_port}"

    def wait_ready(self) -> RayServe:
        def ready() -> bool:
            if self.proc.poll() is not None:
                raise RuntimeError(f"ray driver exited {self.proc.returncode}: {self.log()[-3000:]}")
            return "READY" in self.log()

        wait_until(ready, 240, 0.5, "Ray Serve app READY")
        return self

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def kill_all(self) -> None:
        """SIGKILL the driver and every Ray process it started (they share its session id)."""
        for pid in _session_pids(self.proc.pid):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass

    def stop(self) -> None:
        if self.proc.poll() is None and self.proc.stdin:
            self.proc.stdin.close()
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                pass
        self.kill_all()
        wait_until(lambda: not _session_pids(self.proc.pid), 30, 0.2, "Ray processes gone")
        self._log.close()
        shutil.rmtree(self.temp_dir, ignore_errors=True)


@pytest.fixture(scope="module")
def ray_serve(tmp_path_factory: pytest.TempPathFactory, tiny_model: Path) -> Iterator[RayServe]:
    need(importlib.util.find_spec("ray") is not None, "needs ray[serve] (the `ray` extra)")
    rs = RayServe(tmp_path_factory.mktemp("ray"), tiny_model)
    try:
        yield rs.wait_ready()
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
        results = _request_loop(ngx.base_url + "/v1/completions", 200, 4, {40: ray_serve.kill_all})
    finally:
        ngx.stop()
    statuses = Counter(code for code, _ in results)
    assert statuses == {200: 200}, f"failed requests when the Ray node died: {statuses}"
    served = Counter(up for _, up in results)
    print(f"\nRay primary killed: {dict(served)}")
    assert served[f"127.0.0.1:{ray_serve.http_port}"] >= 30 and served[f"127.0.0.1:{backup.port}"] >= 100, served
