"""Lint of the Grafana dashboards and provisioning (no Grafana binary here).

Every dashboard JSON parses, has unique panel ids and integer grid positions,
points at the provisioned datasource uid, covers the panels the issue asks for;
every panel expression is valid PromQL (written out as recording rules after
substituting Grafana's variables, checked by `promtool check rules`), and every
`llm_*` name it uses exists in the app's metric registry.
"""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path

import pytest
import yaml

from app.metrics import exported_series_names, vllm_series_names
from tests.support.dashboards import all_panels, dashboard_exprs
from tests.support.env import ROOT, need_binary

GRAFANA = ROOT / "monitoring" / "grafana"
DASHBOARDS = sorted((GRAFANA / "dashboards").glob("*.json"))
LLM_NAME = re.compile(r"\b(llm_[a-z0-9_]+)\b")
VLLM_NAME = re.compile(r"\b(vllm:[a-z0-9_]+)")


def provisioned_uid() -> str:
    doc = yaml.safe_load((GRAFANA / "provisioning" / "datasources" / "prometheus.yml").read_text())
    (ds,) = doc["datasources"]
    assert ds["type"] == "prometheus" and ds["uid"]
    return ds["uid"]








@pytest.fixture(params=DASHBOARDS, ids=lambda p: p.name)
def dashboard(request: pytest.FixtureRequest) -> dict:
    return json.loads(request.param.read_text())


def test_dashboards_exist_and_provider_points_at_them() -> None:
    assert DASHBOARDS, "no dashboard JSON"
    prov = yaml.safe_load((GRAFANA / "provisioning" / "dashboards" / "llm-serving.yml").read_text())
    (provider,) = prov["providers"]
    assert provider["type"] == "file" and provider["folder"] and provider["options"]["path"]
    titles = {json.loads(p.read_text())["title"] for p in DASHBOARDS}
    assert "LLM serving" in titles


def test_structure_ids_grid_and_datasource(dashboard: dict) -> None:
    uid = provisioned_uid()
    panels = list(all_panels(dashboard["panels"]))
    ids = [p["id"] for p in panels]
    assert len(ids) == len(set(ids)), f"duplicate panel ids in {dashboard['title']}"
    for p in panels:
        grid = p["gridPos"]
        assert all(isinstance(grid[k], int) and not isinstance(grid[k], bool) for k in ("x", "y", "w", "h")), p
        assert 0 <= grid["x"] and grid["x"] + grid["w"] <= 24 and grid["h"] > 0, p
        sources = [p.get("datasource")] + [t.get("datasource") for t in p.get("targets", [])]
        for ds in filter(None, sources):
            assert ds == {"type": "prometheus", "uid": uid}, f"panel {p['id']} datasource {ds}"
        if p["type"] != "row":
            assert p.get("targets"), f"panel {p['id']} has no query"
    for var in dashboard.get("templating", {}).get("list", []):
        if var.get("type") == "query":
            assert var["datasource"]["uid"] == uid
    assert len({dashboard["uid"]}) == 1 and dashboard["uid"]


def test_llm_serving_dashboard_covers_the_issue() -> None:
    dash = json.loads((GRAFANA / "dashboards" / "llm-serving.json").read_text())
    text = json.dumps(dash)
    for needle in ("llm_requests_total", 'status=~\\"5..\\"', "histogram_quantile(0.5", "histogram_quantile(0.95",
                   "llm_request_latency_seconds_bucket", "llm_time_to_first_token_seconds_bucket",
                   "llm_output_tokens_total", "llm_queue_depth", "ray_serve_deployment_replica_healthy",
                   "llm_engine_info", "DCGM_FI_DEV_GPU_UTIL", "DCGM_FI_DEV_FB_USED", "DCGM_FI_DEV_FB_FREE"):
        assert needle in text, needle


def test_every_expression_is_valid_promql(dashboard: dict, tmp_path: Path) -> None:
    need_binary("promtool")
    exprs = dashboard_exprs(dashboard)
    assert exprs
    rules = {"groups": [{"name": "dashboard-lint", "rules": [
        {"record": f"dashboard:panel_{key}", "expr": expr} for key, expr in exprs]}]}
    path = tmp_path / "dashboard-rules.yml"
    path.write_text(yaml.safe_dump(rules, sort_keys=False))
    res = subprocess.run(["promtool", "check", "rules", str(path)], capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stdout + res.stderr
    assert f"SUCCESS: {len(exprs)} rules found" in res.stdout


def test_every_llm_metric_name_exists_in_the_app(dashboard: dict) -> None:
    used = set(LLM_NAME.findall(json.dumps(dashboard)))
    assert used <= exported_series_names(), f"unknown llm_* names: {used - exported_series_names()}"


def test_every_vllm_metric_name_is_one_vllm_exports(dashboard: dict) -> None:
    used = set(VLLM_NAME.findall(json.dumps(dashboard)))
    assert used <= vllm_series_names(), f"vllm:* names not in app.metrics.VLLM_FAMILIES: {used - vllm_series_names()}"
