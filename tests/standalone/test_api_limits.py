"""API keys and overload against one real server started with API_KEYS and small admission limits.

API keys: the official client with each listed key (the 401 matrix and open probes are unit-tested in
tests/unit/api/test_routes.py). Overload on the real engine: more concurrent requests than
max_num_seqs + max_waiting -> some 429 with Retry-After, no 5xx, all others complete; a client that
leaves while queued frees its place. The fan-out 400 is unit-tested and checked on the Ray path.
"""

from __future__ import annotations

import asyncio
import collections
import json
import socket
from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import pytest

from tests.support.servers import ServerProcess, scrape, spawn_server, wait_until

KEYS = ("key-one", "key-two")
MAX_RUNNING, MAX_WAITING = 1, 2
OVERLOAD_TOKENS = 200


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory, tiny_model: Path) -> Iterator[ServerProcess]:
    srv = spawn_server(tmp_path_factory.mktemp("limits"), tiny_model,
                       "--max-num-seqs", str(MAX_RUNNING), "--max-waiting", str(MAX_WAITING),
                       env={"API_KEYS": ",".join(KEYS), "LLM_RETRY_AFTER_S": "2"})
    yield srv
    srv.stop()


def _auth(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


# --------------------------------------------------------------------------- API keys


def test_every_listed_key_works_with_the_openai_client(server: ServerProcess) -> None:
    for key in KEYS:
        client = openai.OpenAI(base_url=server.base_url + "/v1", api_key=key, max_retries=0, timeout=60)
        assert [m.id for m in client.models.list().data] == ["tiny"]
        out = client.completions.create(model="tiny", prompt="hi", max_tokens=3, extra_body={"ignore_eos": True})
        assert out.usage.completion_tokens == 3
    bad = openai.OpenAI(base_url=server.base_url + "/v1", api_key="nope", max_retries=0, timeout=60)
    with pytest.raises(openai.AuthenticationError):
        bad.models.list()


# --------------------------------------------------------------------------- overload


async def _one(http: httpx.AsyncClient, stream: bool) -> tuple[int, str | None, str]:
    body = {"model": "tiny", "prompt": "load", "max_tokens": OVERLOAD_TOKENS, "ignore_eos": True, "stream": stream}
    async with http.stream("POST", "/v1/completions", json=body) as r:
        text = (await r.aread()).decode()
        return r.status_code, r.headers.get("retry-after"), text


async def _burst(base_url: str, n: int) -> list[tuple[int, str | None, str]]:
    limits = httpx.Limits(max_connections=n, max_keepalive_connections=n)
    async with httpx.AsyncClient(base_url=base_url, headers=_auth(KEYS[0]), timeout=120, limits=limits) as http:
        return await asyncio.gather(*[_one(http, stream=i % 2 == 0) for i in range(n)])


def test_overload_gives_429_with_retry_after_and_no_5xx(server: ServerProcess) -> None:
    n = 4 * (MAX_RUNNING + MAX_WAITING)
    results = asyncio.run(_burst(server.base_url, n))
    statuses = collections.Counter(status for status, _, _ in results)
    assert set(statuses) <= {200, 429}, statuses
    assert statuses[429] >= 1, statuses
    assert statuses[200] >= MAX_RUNNING + MAX_WAITING, statuses
    for status, retry_after, text in results:
        if status == 429:
            assert retry_after == "2"
            err = json.loads(text)["error"]
            assert err["type"] == "rate_limit_error" and err["code"] == "queue_full"
        elif text.startswith("data: "):
            events = [e for e in text.split("\n\n") if e.startswith("data: ")]
            assert events[-1] == "data: [DONE]"
            reasons = [json.loads(e[6:])["choices"][0]["finish_reason"] for e in events[:-1]]
            assert reasons[-1] == "length"
        else:
            body = json.loads(text)
            assert body["usage"]["completion_tokens"] == OVERLOAD_TOKENS
    # everything drained: nothing left running or queued, and the server takes work again
    wait_until(lambda: scrape(server.base_url, "llm_running_requests") == 0
               and scrape(server.base_url, "llm_queue_depth") == 0, 30, 0.1, "engine idle after the burst")
    r = httpx.post(server.base_url + "/v1/completions", headers=_auth(KEYS[1]), timeout=60,
                   json={"model": "tiny", "prompt": "after", "max_tokens": 2})
    assert r.status_code == 200
    assert scrape(server.base_url, "llm_requests_total", endpoint="completions", status="429") == statuses[429]



def _raw_request(port: int, body: dict) -> socket.socket:
    data = json.dumps(body).encode()
    head = (f"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nAuthorization: Bearer {KEYS[0]}\r\n"
            f"Content-Type: application/json\r\nContent-Length: {len(data)}\r\n\r\n").encode()
    sock = socket.create_connection(("127.0.0.1", port), timeout=30)
    sock.sendall(head + data)
    return sock


@pytest.mark.parametrize("stream", [True, False], ids=["stream", "non-stream"])
def test_client_leaving_while_queued_frees_its_queue_place(server: ServerProcess, stream: bool) -> None:
    url = server.base_url
    wait_until(lambda: scrape(url, "llm_running_requests") == 0, 30, 0.05, "idle")
    left = scrape(url, "llm_requests_total", endpoint="completions", status="499")
    long = {"model": "tiny", "prompt": "hold the slot", "max_tokens": 2000, "ignore_eos": True, "stream": True}
    with httpx.Client(base_url=url, headers=_auth(KEYS[0]), timeout=60) as http, \
            http.stream("POST", "/v1/completions", json=long) as running:
        lines = running.iter_lines()
        assert next(lines).startswith("data: ")
        # a second request queues behind the running one; its client gives up before it gets a slot
        sock = _raw_request(server.port, {**long, "max_tokens": 5, "stream": stream})
        try:
            wait_until(lambda: scrape(url, "llm_queue_depth") == 1, 30, 0.02, "request queued")
        finally:
            sock.close()
        wait_until(lambda: scrape(url, "llm_queue_depth") == 0, 2, 0.02, "queue place freed")
        assert scrape(url, "llm_running_requests") == 1  # freed while the slot was still taken
        wait_until(lambda: scrape(url, "llm_requests_total", endpoint="completions", status="499") == left + 1,
                   5, 0.05, "the abandoned request counted as 499")
