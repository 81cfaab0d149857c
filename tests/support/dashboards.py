"""The Grafana dashboards' PromQL expressions, with Grafana's variables substituted (promtool can check them)."""

from __future__ import annotations

import json
import re
from collections.abc import Iterator

from tests.support.env import ROOT

DASHBOARD = ROOT / "monitoring" / "grafana" / "dashboards" / "llm-serving.json"


def dashboard_exprs(dash: dict) -> list[tuple[str, str]]:
    """(panel id/refId, expression with variables substituted) for every target."""
    variables = {v["name"] for v in dash.get("templating", {}).get("list", [])}
    return [(f"{p['id']}_{t['refId']}", substitute(t["expr"], variables))
            for p in all_panels(dash["panels"]) for t in p.get("targets", []) if t.get("expr")]


def vllm_row_exprs() -> list[tuple[str, str]]:
    """The Grafana vLLM row: every dashboard expression reading a vllm:* series (variables substituted)."""

    # the prefix-cache panel (940s) reads counters only a prefix-routed load moves: tests/vllm's prefix suite
    exprs = [(key, expr) for key, expr in dashboard_exprs(json.loads(DASHBOARD.read_text()))
             if "vllm:" in expr and "prefix_cache" not in expr]
    assert len(exprs) >= 4, exprs
    return exprs


GRAFANA_VARS = {"__rate_interval": "1m", "__interval": "1m", "__range": "1h", "__interval_ms": "60000"}


def all_panels(panels: list[dict]) -> Iterator[dict]:
    for p in panels:
        yield p
        yield from all_panels(p.get("panels", []))


def substitute(expr: str, variables: set[str]) -> str:
    """Replace Grafana's built-in and dashboard variables ($x, ${x}, [[x]]) with literal values."""
    def value(name: str) -> str:
        if name in GRAFANA_VARS:
            return GRAFANA_VARS[name]
        assert name in variables, f"unknown variable ${name} in {expr!r}"
        return ".*"

    expr = re.sub(r"\$\{(\w+)(?::\w+)?\}", lambda m: value(m.group(1)), expr)
    expr = re.sub(r"\[\[(\w+)\]\]", lambda m: value(m.group(1)), expr)
    return re.sub(r"\$(\w+)", lambda m: value(m.group(1)), expr)
