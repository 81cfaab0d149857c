"""The one cluster HTTP client (`app.client.wire`) in process, against httpx.MockTransport scripts.

One retry policy: 429/502/503/504 and connection errors are retried, Retry-After is honoured (capped),
otherwise full-jitter exponential backoff; other statuses are final at once. One error hierarchy:
`ClientError` > `RetryableError` | `RequestFailed`.
"""

from __future__ import annotations

import json
import re
import time
from collections.abc import Callable
from email.utils import formatdate
from typing import Any

import httpx
import pytest

from app.client import wire
from app.client.wire import ClientError, ClusterClient, RequestFailed, RetryableError, RetryPolicy

POLICY = RetryPolicy(max_attempts=3, backoff_s=0.01, max_backoff_s=0.05, max_retry_after_s=5.0)


def scripted(script: list[Any], seen: list[httpx.Request]) -> httpx.MockTransport:
    """Answers each request with the next item: an int status, (status, headers), or an exception to raise."""

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        item = script.pop(0) if script else 200
        if isinstance(item, Exception):
            raise item
        status, headers = item if isinstance(item, tuple) else (item, {})
        body = ({"object": "list", "data": [{"id": "m", "engine": "vllm"}]} if status == 200 else
                {"error": {"message": f"scripted {status}", "type": "x", "code": "c"}})
        return httpx.Response(status, json=body, headers=headers)

    return httpx.MockTransport(handler)


def test_parse_retry_after() -> None:
    now = time.time()
    assert wire.parse_retry_after("3") == 3.0 and wire.parse_retry_after("0.5") == 0.5
    assert wire.parse_retry_after(None) is None and wire.parse_retry_after("soon") is None
    assert 9 <= wire.parse_retry_after(formatdate(now + 10, usegmt=True), now=now) <= 10  # type: ignore[operator]
    assert wire.parse_retry_after(formatdate(now - 10, usegmt=True), now=now) == 0.0  # an HTTP date, in UTC


def test_retryable_statuses_are_one_set() -> None:
    assert wire.RETRYABLE_STATUS == {429, 502, 503, 504}


def test_delay_honours_retry_after_capped_else_backs_off() -> None:
    p = RetryPolicy(backoff_s=1.0, max_backoff_s=4.0, max_retry_after_s=10.0)
    assert 2.0 <= p.delay_s(1, 2.0) <= 2.2  # Retry-After plus a little jitter
    assert 10.0 <= p.delay_s(1, 99.0) <= 11.0  # capped
    for attempt in range(1, 8):
        assert 0 <= p.delay_s(attempt, None) <= min(4.0, 2 ** attempt)


def test_sync_transport_retries_the_policy_and_passes_the_rest(monkeypatch: pytest.MonkeyPatch) -> None:
    sleeps: list[float] = []
    seen: list[httpx.Request] = []

    def run(*script: Any) -> httpx.Response:
        seen.clear()
        sleeps.clear()
        transport = wire.RetryTransport(POLICY, scripted(list(script), seen), sleep=sleeps.append)
        with httpx.Client(transport=transport, base_url="http://c") as http:
            return http.post("/v1/chat/completions", json={"model": "m"})

    assert run(503, (429, {"Retry-After": "1"}), 200).status_code == 200
    assert len(seen) == 3 and 1.0 <= sleeps[1] <= 1.1
    assert all(json.loads(r.content) == {"model": "m"} for r in seen)  # the body is re-sent whole
    assert run(400).status_code == 400 and len(seen) == 1  # final at once
    assert run(504, 504, 504, 504).status_code == 504 and len(seen) == 3  # max_attempts, then the last answer
    assert run(httpx.ConnectError("refused"), 200).status_code == 200 and len(seen) == 2
    with pytest.raises(httpx.ConnectError):
        run(*[httpx.ConnectError("refused")] * 3)


async def test_async_transport_uses_the_same_policy() -> None:
    seen: list[httpx.Request] = []
    sleeps: list[float] = []

    async def sleep(s: float) -> None:
        sleeps.append(s)

    transport = wire.AsyncRetryTransport(POLICY, scripted([502, (503, {"Retry-After": "0"}), 200], seen), sleep=sleep)
    async with httpx.AsyncClient(transport=transport, base_url="http://c") as http:
        assert (await http.get("/v1/models")).status_code == 200
    assert len(seen) == 3 and len(sleeps) == 2 and sleeps[1] <= 0.01


def client_for(script: list[Any], seen: list[httpx.Request], **kw: Any) -> ClusterClient:
    async def no_sleep(_: float) -> None:
        return None

    return ClusterClient("http://cluster/v1", policy=POLICY, api_key="k",
                         transport=wire.AsyncRetryTransport(POLICY, scripted(script, seen), sleep=no_sleep), **kw)


async def test_cluster_client_maps_answers_to_one_error_hierarchy() -> None:
    seen: list[httpx.Request] = []
    async with client_for([404], seen) as c:
        with pytest.raises(RequestFailed) as exc:
            await c.chat([{"role": "user", "content": "hi"}], model="m")
    err = exc.value
    assert isinstance(err, ClientError) and not isinstance(err, RetryableError)
    assert err.status == 404 and err.code == "c"
    assert "scripted 404" in err.message and "/v1/chat/completions" in err.message
    assert seen[0].headers["authorization"] == "Bearer k"
    async with client_for([503, 503, 503], seen := []) as c:
        with pytest.raises(RetryableError) as exc2:
            await c.list_models()
    assert exc2.value.status == 503 and len(seen) == 3
    async with client_for([httpx.ConnectError("refused")] * 3, seen := []) as c:
        with pytest.raises(RetryableError, match=r"unreachable at http://cluster/v1/models") as exc3:
            await c.list_models()
    assert exc3.value.status == 0 and exc3.value.connection_level


async def test_cluster_client_models_are_cached_and_resolved() -> None:
    seen: list[httpx.Request] = []
    async with client_for([], seen) as c:
        assert await c.resolve_model(None) == "m" and await c.engine_of("m") == "vllm"
        assert await c.resolve_model("other") == "other"
        assert len(seen) == 1  # one GET /models, then the cache


def sse(*events: Any, done: bool = True) -> Callable[[httpx.Request], httpx.Response]:
    lines = "".join(f"data: {json.dumps(e) if not isinstance(e, str) else e}\n\n" for e in events)
    return lambda request: httpx.Response(200, text=lines + ("data: [DONE]\n\n" if done else ""),
                                          headers={"content-type": "text/event-stream", "x-served-by": "vllm@a/b"})


@pytest.mark.parametrize(("handler", "error"), [
    (sse({"choices": [{"index": 0, "text": "a"}]}, done=False), "stream ended before [DONE]"),
    (sse({"error": {"message": "engine died", "type": "service_unavailable"}}), "error in stream: engine died"),
])
async def test_call_streams_raise_retryable_errors(handler: Any, error: str) -> None:
    async with httpx.AsyncClient(transport=httpx.MockTransport(handler)) as http:
        with pytest.raises(RetryableError, match=re.escape(error)):
            await wire.call(http, "http://c", {"model": "m", "prompt": "x"}, stream=True)


async def test_call_returns_the_outcome_with_served_by() -> None:
    handler = sse({"choices": [{"index": 0, "text": "a", "finish_reason": None}]},
                  {"choices": [{"index": 0, "text": "b", "finish_reason": "length"}]},
                  {"choices": [], "usage": {"prompt_tokens": 1, "completion_tokens": 2, "total_tokens": 3}})
    async with httpx.AsyncClient(transport=httpx.MockTransport(handler)) as http:
        out = await wire.call(http, "http://c", {"model": "m", "prompt": "x"}, stream=True)
    assert (out.text, out.finish_reason, out.completion_tokens, out.served_by) == ("ab", "length", 2, "vllm@a/b")
    assert out.ttft_s is not None and len(out.chunk_times) == 2
