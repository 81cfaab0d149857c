"""Keys and their limits in the one router, in process (FakeEngine): who may call what, at which priority, and
what each key used. The same behaviour against a real server with the official client is
tests/standalone/test_tenants.py."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest

from app.metrics import PrometheusSink
from app.tenants.keyfile import KeyEntry, KeysFile, hash_key, save
from tests.support.fakes import FakeEngine, client, make_app, sample

COMP = "/v1/completions"


def auth(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


@pytest.fixture
async def setup(tmp_path: Path) -> AsyncIterator[tuple[httpx.AsyncClient, FakeEngine, PrometheusSink]]:
    keys = tmp_path / "keys.yaml"
    save(keys, KeysFile(keys=[
        KeyEntry(name="chat", hash=hash_key("k-chat"), models=("fake",), rpm=2),
        KeyEntry(name="bulk", hash=hash_key("k-bulk"), priority="batch", tpm=1000),
        KeyEntry(name="ops", hash=hash_key("k-ops"), admin=True, models=("other*",)),
    ]))
    sink = PrometheusSink()
    fake, other = FakeEngine("fake", metrics=sink), FakeEngine("other", metrics=sink)
    await fake.start()
    await other.start()
    app = make_app(fake, other, metrics=sink, api_keys=["plain"], keys_file=str(keys))
    async with client(app) as http:
        yield http, fake, sink


async def test_priority_comes_from_the_key_and_flex_only_lowers_it(
        setup: tuple[httpx.AsyncClient, FakeEngine, PrometheusSink]) -> None:
    http, fake, _ = setup
    for key, tier in (("k-bulk", None), ("k-bulk", "priority"), ("plain", "flex"), ("plain", None)):
        body = {"model": "fake", "prompt": "x", "max_tokens": 2, **({"service_tier": tier} if tier else {})}
        assert (await http.post(COMP, json=body, headers=auth(key))).status_code == 200
    assert [r.priority for r in fake.requests] == ["batch", "batch", "batch", "interactive"]


async def test_models_outside_the_allowance_do_not_exist_for_the_key(
        setup: tuple[httpx.AsyncClient, FakeEngine, PrometheusSink]) -> None:
    http, _, _ = setup
    listed = (await http.get("/v1/models", headers=auth("k-ops"))).json()["data"]
    assert [m["id"] for m in listed] == ["other"]
    r = await http.post(COMP, json={"model": "fake", "prompt": "x"}, headers=auth("k-ops"))
    assert r.status_code == 404 and r.json()["error"]["code"] == "model_not_found"
    assert "available models: other" in r.json()["error"]["message"]
    assert (await http.get("/v1/models/fake", headers=auth("k-ops"))).status_code == 404


async def test_rate_limit_headers_429_and_per_key_accounting(
        setup: tuple[httpx.AsyncClient, FakeEngine, PrometheusSink]) -> None:
    http, _, sink = setup
    body = {"model": "fake", "prompt": "x", "max_tokens": 3}
    ok = await http.post(COMP, json=body, headers=auth("k-chat"))
    assert ok.status_code == 200 and ok.headers["x-ratelimit-limit-requests"] == "2"
    assert ok.headers["x-ratelimit-remaining-requests"] == "1"
    assert (await http.post(COMP, json=body, headers=auth("k-chat"))).status_code == 200
    refused = await http.post(COMP, json=body, headers=auth("k-chat"))
    assert refused.status_code == 429 and refused.json()["error"]["code"] == "rate_limit_exceeded"
    assert int(refused.headers["retry-after"]) >= 1 and refused.headers["x-ratelimit-remaining-requests"] == "0"
    assert sample(sink, "llm_key_requests_total", key="chat", status="200") == 2
    assert sample(sink, "llm_key_rate_limited_total", key="chat", limit="requests") == 1
    assert sample(sink, "llm_key_tokens_total", key="chat", kind="completion") == 6

    mine = (await http.get("/v1/usage", headers=auth("k-chat"))).json()
    assert mine["key"] == "chat" and {r["key"] for r in mine["data"]} == {"chat"}
    assert sum(r["requests"] for r in mine["data"]) == 3 and sum(r["rate_limited"] for r in mine["data"]) == 1
    everyone = (await http.get("/v1/usage", headers=auth("k-ops"))).json()
    assert everyone["key"] == "*" and {r["key"] for r in everyone["data"]} >= {"chat"}
    bad = await http.get("/v1/usage?start=yesterday", headers=auth("k-chat"))
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "start"


async def test_tokens_are_charged_as_they_stream(setup: tuple[httpx.AsyncClient, FakeEngine, PrometheusSink]) -> None:
    http, _, _ = setup
    r = await http.post(COMP, json={"model": "fake", "prompt": "x", "max_tokens": 4, "stream": True},
                        headers=auth("k-bulk"))
    assert r.status_code == 200 and r.headers["x-ratelimit-limit-tokens"] == "1000"
    r2 = await http.post(COMP, json={"model": "fake", "prompt": "x", "max_tokens": 1}, headers=auth("k-bulk"))
    remaining = int(r2.headers["x-ratelimit-remaining-tokens"])
    used = 1000 - remaining
    assert 4 <= used < 1000  # the first stream's tokens (prompt + 4) are gone from the minute's budget
