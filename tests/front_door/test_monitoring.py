"""Prometheus config, alert rules and a real Prometheus scraping a real standalone server.

`promtool check config|rules` and `promtool test rules` on the shipped files; every
alert has a unit test; every `llm_*` name in the rules exists in the app's metric
registry; a private Prometheus (own TSDB path, 127.0.0.1 listener) scrapes a
tiny-model server and its query API returns the request counter and a latency
quantile under exactly the names the app exports (no ':' rewriting).
"""

from __future__ import annotations

import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import httpx
import pytest
import yaml

from app.metrics import exported_series_names
from app.ops.prometheus import PrometheusSettings
from tests.support.dashboards import dashboard_exprs
from tests.support.env import ROOT, need_binary
from tests.support.prometheus import Prometheus
from tests.support.servers import free_port, wait_until

MONITORING = ROOT / "monitoring"
RULES = MONITORING / "rules" / "llm-alerts.yml"
RULE_TESTS = MONITORING / "tests" / "llm-alerts.test.yml"
LLM_NAME = re.compile(r"\b(llm_[a-z0-9_]+)\b")


def _promtool(*args: str | Path, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    need_binary("promtool")
    return subprocess.run(["promtool", *map(str, args)], capture_output=True, text=True, timeout=120, cwd=cwd)


def test_render_cli_and_promtool_check_config(tmp_path: Path) -> None:
    env = {**os.environ, "FALLBACK_PORT": "8001,8003", "HEAD_IP": "10.0.0.1",
           "RAY_NODE_TARGETS": "10.0.0.1:8090,10.0.0.2:8090,10.0.0.3:8090", "PROM_APP_TARGETS": "127.0.0.1:8002"}
    out = subprocess.run([sys.executable, "-m", "app", "ops", "render-prometheus", "--out", str(tmp_path)],
                         cwd=ROOT, env=env, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    res = _promtool("check", "config", tmp_path / "prometheus.yml")
    assert res.returncode == 0, res.stdout + res.stderr
    conf = yaml.safe_load((tmp_path / "prometheus.yml").read_text())
    jobs = {j["job_name"]: j for j in conf["scrape_configs"]}
    assert jobs["llm-fallback"]["static_configs"][0]["targets"] == ["127.0.0.1:8001", "127.0.0.1:8003"]
    assert jobs["llm-standalone"]["static_configs"][0]["targets"] == ["127.0.0.1:8002"]
    assert jobs["llm-batch"]["static_configs"][0]["targets"] == ["127.0.0.1:8005"]  # the batch service
    assert jobs["ray-nodes"]["static_configs"][0]["targets"] == ["10.0.0.1:8090", "10.0.0.2:8090", "10.0.0.3:8090"]
    assert jobs["ray-nodes"]["file_sd_configs"][0]["files"] == ["/tmp/ray/prom_metrics_service_discovery.json"]
    strip = jobs["ray-nodes"]["metric_relabel_configs"][0]
    assert strip["regex"] == "ray_(llm_.+)" and strip["replacement"] == "$1"
    assert jobs["dcgm"]["static_configs"][0]["targets"] == ["10.0.0.2:9400", "10.0.0.3:9400"]  # GPU workers
    assert jobs["nginx"]["static_configs"][0]["targets"] == ["127.0.0.1:9113"]
    assert (tmp_path / "rules" / "llm-alerts.yml").read_text() == RULES.read_text()

    bad = subprocess.run([sys.executable, "-m", "app", "ops", "render-prometheus", "--out", str(tmp_path)],
                         cwd=ROOT, env={**env, "DCGM_TARGETS": "gpu1"}, capture_output=True, text=True, timeout=60)
    assert bad.returncode == 2 and "DCGM_TARGETS" in bad.stderr


def test_promtool_check_and_test_rules() -> None:
    res = _promtool("check", "rules", RULES)
    assert res.returncode == 0, res.stdout + res.stderr
    res = _promtool("test", "rules", RULE_TESTS, cwd=RULE_TESTS.parent)
    assert res.returncode == 0, res.stdout + res.stderr
    assert "SUCCESS" in res.stdout


def test_every_alert_has_a_firing_unit_test() -> None:
    alerts = {r["alert"] for g in yaml.safe_load(RULES.read_text())["groups"] for r in g["rules"] if "alert" in r}
    assert {"LLMServerDown", "LLMReplicaDown", "LLMNoReadyReplicas", "LLMHighErrorRate", "LLMHighLatencyP95",
            "GPUMemoryNearFull", "LLMFallbackEngineInUse"} <= alerts
    fired = {case["alertname"] for t in yaml.safe_load(RULE_TESTS.read_text())["tests"]
             for case in t.get("alert_rule_test", []) if case.get("exp_alerts")}
    assert alerts == fired, f"alerts without a firing test: {alerts - fired}"


def test_rule_metric_names_exist_in_the_app_registry() -> None:
    used = set(LLM_NAME.findall(RULES.read_text()))
    assert used, "rules use no llm_* metric"
    assert used <= exported_series_names(), f"unknown metric names: {used - exported_series_names()}"


@pytest.fixture
def prometheus_factory(tmp_path: Path):  # type: ignore[no-untyped-def]
    started: list[Prometheus] = []

    def _start(**settings: object) -> Prometheus:
        dead = free_port()  # Ray/nginx/DCGM targets are down in this test: only the fallback job is up
        base: dict[str, object] = {"prometheus_scrape_interval": "1s", "prometheus_eval_interval": "1s",
                                   "ray_metrics_export_port": dead, "nginx_exporter_targets": f"127.0.0.1:{dead}",
                                   "ray_sd_file": str(tmp_path / "no-ray-sd.json")}
        p = Prometheus(tmp_path / f"prom{len(started)}", PrometheusSettings(**{**base, **settings}))
        started.append(p)
        return p

    yield _start
    for p in started:
        p.stop()


def test_prometheus_scrapes_standalone_server(start_server, prometheus_factory) -> None:  # type: ignore[no-untyped-def]
    srv = start_server()
    prom = prometheus_factory(fallback_port=str(srv.port))
    def counted() -> float:
        res = prom.query('sum(llm_requests_total{job="llm-fallback", model="tiny", status="200"})')
        return float(res[0]["value"][1]) if res else 0.0

    with httpx.Client(timeout=60) as client:
        # a first request, scraped before the rest: rate() needs an increase between two samples of a series
        assert client.post(srv.base_url + "/v1/completions", json={"model": "tiny", "prompt": "a", "max_tokens": 8}
                           ).status_code == 200
        wait_until(lambda: counted() >= 1, 60, 0.2, "the first request in Prometheus")
        for i in range(12):
            body = {"model": "tiny", "prompt": f"hello {i}", "max_tokens": 8}
            assert client.post(srv.base_url + "/v1/completions", json=body).status_code == 200
        body = {"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 8, "stream": True}
        with client.stream("POST", srv.base_url + "/v1/chat/completions", json=body) as resp:
            assert resp.status_code == 200
            resp.read()

    wait_until(lambda: counted() >= 14, 60, 0.5, "llm_requests_total >= 14 in Prometheus")

    def p95() -> float | None:
        res = prom.query('histogram_quantile(0.95, sum by (le) (rate(llm_request_latency_seconds_bucket'
                         '{job="llm-fallback"}[1m])))')
        value = float(res[0]["value"][1]) if res else math.nan
        return value if not math.isnan(value) else None

    q = wait_until(p95, 60, 0.5, "a latency quantile from Prometheus")
    assert 0 < q <= 120  # the largest finite bucket

    # what Prometheus stores is exactly what the app exports: no ':' or other rewriting
    stored = {r["metric"]["__name__"] for r in prom.query('{job="llm-fallback", __name__=~"llm_.*"}')}
    assert stored <= exported_series_names(), stored - exported_series_names()
    assert {"llm_requests_total", "llm_request_latency_seconds_bucket", "llm_time_to_first_token_seconds_bucket",
            "llm_output_tokens_total", "llm_model_ready", "llm_engine_info", "llm_queue_depth"} <= stored
    assert not prom.query('{__name__=~".*:.*"}')

    # the shipped rules loaded and evaluate without errors against real data
    groups = httpx.get(prom.url + "/api/v1/rules", timeout=10).json()["data"]["groups"]
    rules = [r for g in groups for r in g["rules"]]
    assert len(rules) == 11 and all(r["health"] in ("ok", "unknown") for r in rules), rules
    wait_until(lambda: all(r["health"] == "ok" for g in httpx.get(prom.url + "/api/v1/rules", timeout=10)
                           .json()["data"]["groups"] for r in g["rules"]), 30, 0.5, "rules evaluated")
    # every dashboard query over the app's metrics returns data from what Prometheus really stored
    dash = json.loads((MONITORING / "grafana" / "dashboards" / "llm-serving.json").read_text())
    checked = 0
    for key, expr in dashboard_exprs(dash):
        names = set(re.findall(r"\b([A-Za-z_][A-Za-z0-9_]*)\s*[{\[]", expr))
        if not names or not all(n.startswith("llm_") for n in names) or "5.." in expr or "errors" in expr \
                or any(n.startswith(("llm_batch", "llm_lora", "llm_key")) for n in names):
            # Ray/GPU/nginx panels (no such targets here), error panels (no errors here), the batch service's
            # row (tests/client/test_batch_service.py scrapes its metrics), the LoRA and keys rows (no adapters
            # or keys file here: tests/standalone/test_lora.py and test_tenants.py run them against a real
            # Prometheus)
            continue
        assert prom.query(expr), f"dashboard query {key} returned nothing: {expr}"
        checked += 1
    assert checked >= 8

    up = {r["metric"]["job"]: r["value"][1] for r in prom.query("up")}
    assert up["llm-fallback"] == "1" and up["ray-nodes"] == "0"


# What a Ray node's metrics export port serves for a vLLM replica: Ray prefixes `ray_`, and vLLM's
# RayPrometheusStatLogger sanitizes ':' to '_' (vllm/v1/metrics/ray_wrappers.py in vLLM 0.32).
RAY_NODE_EXPORT = """\
# TYPE ray_vllm_num_requests_running gauge
ray_vllm_num_requests_running{ReplicaId="r1",model_name="tiny"} 3
# TYPE ray_vllm_time_to_first_token_seconds histogram
ray_vllm_time_to_first_token_seconds_bucket{ReplicaId="r1",model_name="tiny",le="0.1"} 4
ray_vllm_time_to_first_token_seconds_bucket{ReplicaId="r1",model_name="tiny",le="+Inf"} 5
ray_vllm_time_to_first_token_seconds_sum{ReplicaId="r1",model_name="tiny"} 0.7
ray_vllm_time_to_first_token_seconds_count{ReplicaId="r1",model_name="tiny"} 5
# TYPE ray_llm_requests_total counter
ray_llm_requests_total{model="tiny",engine="vllm",endpoint="chat",status="200"} 5
# TYPE ray_node_cpu_utilization gauge
ray_node_cpu_utilization{ip="127.0.0.1"} 12
"""


def test_ray_node_names_stored_as_the_standalone_servers_export_them(prometheus_factory, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
    from threading import Thread

    class Export(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            body = RAY_NODE_EXPORT.encode()
            self.send_response(200)
            self.send_header("Content-Type", "text/plain; version=0.0.4")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: object) -> None:
            pass

    node = ThreadingHTTPServer(("127.0.0.1", 0), Export)
    Thread(target=node.serve_forever, daemon=True).start()
    try:
        prom = prometheus_factory(ray_node_targets=f"127.0.0.1:{node.server_address[1]}",
                                  fallback_port=str(free_port()))
        wait_until(lambda: prom.query('vllm:num_requests_running{job="ray-nodes"}'), 60, 0.5,
                   "vllm:num_requests_running from the Ray node")
        stored = {r["metric"]["__name__"] for r in prom.query('{job="ray-nodes"}')}
        assert {"vllm:num_requests_running", "vllm:time_to_first_token_seconds_bucket",
                "vllm:time_to_first_token_seconds_count", "llm_requests_total", "ray_node_cpu_utilization"} <= stored
        assert not {n for n in stored if n.startswith(("ray_vllm_", "ray_llm_"))}, stored
        ttft = prom.query('histogram_quantile(0.5, sum by (le) (vllm:time_to_first_token_seconds_bucket))')
        assert ttft and 0 < float(ttft[0]["value"][1]) <= 0.1
    finally:
        node.shutdown()
        node.server_close()
