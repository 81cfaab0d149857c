"""The one set of metric names and the Prometheus sink that renders them (in process)."""

from __future__ import annotations

import re

from prometheus_client.parser import text_string_to_metric_families

from app import metrics
from app.metrics import SPECS, MetricsSink, PrometheusSink, exported_series_names


def test_names_are_prometheus_safe_and_follow_conventions() -> None:
    for spec in SPECS:
        assert re.fullmatch(r"llm_[a-z0-9_]+", spec.name), spec.name  # no ':' (client_python #1177)
        assert spec.name.endswith("_total") == (spec.kind == "counter"), spec.name
        assert spec.labels[:2] == ("model", "engine"), spec.name
        assert bool(spec.buckets) == (spec.kind == "histogram"), spec.name
    assert len({s.name for s in SPECS}) == len(SPECS)
    names = exported_series_names()
    assert "llm_request_latency_seconds_bucket" in names and "llm_requests_total" in names
    assert "llm_request_latency_seconds" not in names  # a histogram is stored as its three series


def test_prometheus_sink_renders_every_spec_with_clean_labels() -> None:
    sink: MetricsSink = PrometheusSink()
    assert sink.exports_through_ray is False
    sink.inc(metrics.REQUESTS, {"model": "m", "engine": "e", "endpoint": "chat", "status": "200", "extra": "x"})
    sink.observe(metrics.TTFT, {"model": "m", "engine": "e"}, 0.2)
    sink.set_gauge(metrics.RUNNING, {"model": "m"}, 3)  # a missing label becomes ""
    body, content_type = sink.render()
    assert content_type.startswith("text/plain")
    families = {f.name: f for f in text_string_to_metric_families(body.decode())}
    assert {s.name.removesuffix("_total") for s in SPECS} <= set(families)
    (req,) = [s for s in families["llm_requests"].samples if s.name == "llm_requests_total"]
    assert req.labels == {"model": "m", "engine": "e", "endpoint": "chat", "status": "200"} and req.value == 1
    (running,) = families["llm_running_requests"].samples
    assert running.labels == {"model": "m", "engine": ""} and running.value == 3
    assert "_created" not in body.decode()


def test_two_sinks_do_not_share_values() -> None:
    a, b = PrometheusSink(), PrometheusSink()
    a.inc(metrics.ABORTED, {"model": "m", "engine": "e"})
    assert "llm_requests_aborted_total{" in a.render()[0].decode()
    assert "llm_requests_aborted_total{" not in b.render()[0].decode()

