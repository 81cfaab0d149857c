"""The unit layer's engine (`bench.fake_engine.FakeEngine`, no model) and helpers to drive the API app in process:
`make_app` mounts engines in the one API app, `client` talks to it through httpx.ASGITransport, `sample` reads a
metric from the sink."""

from __future__ import annotations

from typing import Any

import httpx

from app.api.app import create_app
from app.api.backend import LocalBackend
from app.metrics import PrometheusSink
from bench.fake_engine import FakeEngine


def make_app(*engines: FakeEngine, metrics: PrometheusSink, **kw: Any) -> Any:
    return create_app(LocalBackend({e.info.model_id: e for e in engines}, location="unit"), metrics=metrics,
                      manage_backend=False, **kw)


def client(app: Any) -> httpx.AsyncClient:
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://unit")


def sample(sink: PrometheusSink, name: str, **labels: str) -> float:
    """Sum of the samples named `name` in the sink's registry whose labels include `labels`."""
    from prometheus_client.parser import text_string_to_metric_families

    total = 0.0
    for family in text_string_to_metric_families(sink.render()[0].decode()):
        for s in family.samples:
            if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()):
                total += s.value
    return total
