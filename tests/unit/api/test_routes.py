"""The one API router in process: OpenAI shapes, streaming, fan-out, errors, metrics, served-by.

Driven through `httpx.ASGITransport` against `FakeEngine` (tests/support/fakes.py), so every case runs in
milliseconds with no process, socket or model. What is under test is the API layer: the router, the
serving logic (fan-out, priming, SSE framing, usage), error mapping and the metrics it records.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest

from app.engines.base import EngineDeadError, EngineError, InvalidRequestError, QueueFullError
from app.metrics import PrometheusSink
from tests.support.fakes import FakeEngine, client, make_app, sample

CHAT = "/v1/chat/completions"
COMP = "/v1/completions"
MSG = [{"role": "user", "content": "hi there"}]


@pytest.fixture
def sink() -> PrometheusSink:
    return PrometheusSink()


@pytest.fixture
async def engine(sink: PrometheusSink) -> FakeEngine:
    eng = FakeEngine("fake", metrics=sink)
    await eng.start()
    return eng


@pytest.fixture
async def http(engine: FakeEngine, sink: PrometheusSink) -> AsyncIterator[httpx.AsyncClient]:
    async with client(make_app(engine, metrics=sink)) as c:
        yield c


def events(resp: httpx.Response) -> list[Any]:
    """The SSE `data:` payloads, JSON-decoded ("[DONE]" kept as the string)."""
    out: list[Any] = []
    for block in resp.text.split("\n\n"):
        if block.startswith("data: "):
            data = block[len("data: "):]
            out.append(data if data == "[DONE]" else json.loads(data))
    return out


def openai_error(resp: httpx.Response, status: int) -> dict[str, Any]:
    assert resp.status_code == status, resp.text
    body = resp.json()
    assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}
    assert "Traceback" not in resp.text
    return body["error"]


# ----------------------------------------------------------------------------- success paths


async def test_chat_completion_shape_usage_and_served_by(http: httpx.AsyncClient) -> None:
    r = await http.post(CHAT, json={"model": "fake", "messages": MSG, "max_tokens": 3})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["object"] == "chat.completion" and body["id"].startswith("chatcmpl-") and body["model"] == "fake"
    (choice,) = body["choices"]
    assert choice["message"] == {"role": "assistant", "content": "w0 w1 w2 "}
    assert choice["finish_reason"] == "length"
    assert body["usage"] == {"prompt_tokens": 3, "completion_tokens": 3, "total_tokens": 6}
    assert r.headers["x-served-by"] == "fake@unit"
    assert r.headers["x-request-id"]  # made up when the client sent none
    echoed = await http.get("/v1/models", headers={"X-Request-Id": "abc-123"})
    assert echoed.headers.get_list("x-request-id") == ["abc-123"]


async def test_completion_fan_out_indexes_choices_and_counts_each_prompt_once(
        http: httpx.AsyncClient, engine: FakeEngine) -> None:
    r = await http.post(COMP, json={"model": "fake", "prompt": ["a b", "c"], "n": 2, "max_tokens": 2, "seed": 7})
    assert r.status_code == 200, r.text
    body = r.json()
    assert [c["index"] for c in body["choices"]] == [0, 1, 2, 3]
    assert body["usage"] == {"prompt_tokens": 3, "completion_tokens": 8, "total_tokens": 11}
    # each choice is its own engine request, seeds consecutive per prompt
    assert sorted((q.prompt, q.seed) for q in engine.requests) == [("a b", 7), ("a b", 8), ("c", 7), ("c", 8)]
    assert len({q.request_id for q in engine.requests}) == 4


async def test_sampling_fields_reach_the_engine(http: httpx.AsyncClient, engine: FakeEngine) -> None:
    body = {"model": "fake", "messages": MSG, "max_completion_tokens": 2, "max_tokens": 9, "temperature": 0.5,
            "top_p": 0.9, "stop": "x", "presence_penalty": 0.1, "frequency_penalty": -0.2, "min_tokens": 1,
            "ignore_eos": True}
    assert (await http.post(CHAT, json=body)).status_code == 200
    (q,) = engine.requests
    assert (q.max_tokens, q.temperature, q.top_p, q.stop) == (2, 0.5, 0.9, ["x"])
    assert (q.presence_penalty, q.frequency_penalty, q.min_tokens, q.ignore_eos) == (0.1, -0.2, 1, True)
    assert q.messages == MSG and q.prompt is None


@pytest.mark.parametrize("path", [CHAT, COMP])
async def test_stream_frames_chunks_and_ends_with_done(http: httpx.AsyncClient, path: str) -> None:
    body: dict[str, Any] = {"model": "fake", "max_tokens": 3, "stream": True,
                            "stream_options": {"include_usage": True}}
    body.update({"messages": MSG} if path == CHAT else {"prompt": "p q"})
    r = await http.post(path, json=body)
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
    assert r.headers["x-served-by"] == "fake@unit" and r.headers["cache-control"] == "no-cache"
    ev = events(r)
    assert ev[-1] == "[DONE]"
    *chunks, usage = ev[:-1]
    assert usage["choices"] == [] and usage["usage"]["completion_tokens"] == 3
    if path == CHAT:
        assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
        text = "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks)
    else:
        text = "".join(c["choices"][0]["text"] for c in chunks)
    assert text == "w0 w1 w2 "
    assert [c["choices"][0]["finish_reason"] for c in chunks if c["choices"][0].get("finish_reason")] == ["length"]


async def test_stream_without_include_usage_has_no_usage_chunk(http: httpx.AsyncClient) -> None:
    r = await http.post(COMP, json={"model": "fake", "prompt": "p", "max_tokens": 2, "stream": True})
    assert all("usage" not in e or e["usage"] is None for e in events(r)[:-1])


async def test_stream_fan_out_beyond_free_slots_completes(http: httpx.AsyncClient) -> None:
    # 2 slots + 2 queue places admit 4 generations at once: all 4 must stream without deadlocking the priming
    r = await http.post(COMP, json={"model": "fake", "prompt": ["a", "b"], "n": 2, "max_tokens": 3, "stream": True})
    finished = sorted(e["choices"][0]["index"] for e in events(r)[:-1] if e["choices"][0]["finish_reason"])
    assert finished == [0, 1, 2, 3]


async def test_models_readyz_and_health(http: httpx.AsyncClient) -> None:
    models = (await http.get("/v1/models")).json()
    (card,) = models["data"]
    assert card["id"] == "fake" and card["engine"] == "fake" and card["ready"] is True
    assert card["engine_info"]["max_parallel"] == 4 and card["max_model_len"] == 64
    assert (await http.get("/v1/models/fake")).json()["engine_reason"] == "unit-test engine"
    ready = await http.get("/readyz")
    assert ready.status_code == 200
    detail = ready.json()["models"]["fake"]
    assert detail["ready"] is True and detail["max_parallel"] == 4 and detail["running"] == 0
    assert (await http.get("/healthz")).json() == {"status": "ok"}
    for path in ("/healthz", "/health", "/readyz"):  # load balancers and vLLM tools probe with HEAD
        head = await http.head(path)
        assert head.status_code == 200 and head.content == b""


@pytest.mark.parametrize(("content", "words"), [
    ([{"type": "image_url", "image_url": {"url": "http://x"}}], "Invalid content part 0 type: 'image_url'. Supported "
                                                                 "values are: 'text'"),
    ([{"type": "text", "text": "ok"}, {"text": "no type"}], "Invalid content part 1 type: missing"),
    ([{"type": "text"}], "Invalid content part 0: a 'text' part needs a string 'text'"),
    (["just a string"], "Invalid content part 0: expected an object, got a string"),
    (5, "Invalid type: expected a string or an array of content parts, got a number"),
], ids=["image", "no-type", "no-text", "string-part", "number"])
async def test_content_part_errors_say_what_is_wrong_in_openai_words(http: httpx.AsyncClient, content: Any,
                                                                     words: str) -> None:
    r = await http.post(CHAT, json={"model": "fake", "messages": [{"role": "user", "content": content}]})
    err = openai_error(r, 400)
    assert err["param"] == "messages.0.content" and words in err["message"]
    assert "Input should be" not in err["message"]  # no pydantic wording


# ----------------------------------------------------------------------------- refused before the engine


@pytest.mark.parametrize(("body", "param"), [
    (b'{"model": "fake", "messages": [', None),
    ({"prompt": "hi"}, "model"),
    ({"model": "fake", "messages": []}, "messages"),
    ({"model": "fake", "messages": [{"role": "robot", "content": "x"}]}, "messages.0.role"),
    ({"model": "fake", "prompt": "hi", "max_tokens": "5"}, "max_tokens"),
    ({"model": "fake", "prompt": "hi", "max_tokens": True}, "max_tokens"),
    ({"model": "fake", "prompt": "hi", "stream": "yes"}, "stream"),
    ({"model": "fake", "prompt": "hi", "temperature": 2.5}, "temperature"),
    ({"model": "fake", "prompt": "hi", "top_p": 0}, "top_p"),
    ({"model": "fake", "prompt": "hi", "n": 0}, "n"),
    ({"model": "fake", "prompt": "hi", "stop": ""}, "stop"),
    ({"model": "fake", "prompt": "hi", "stop": [str(i) for i in range(9)]}, "stop"),
    ({"model": "fake", "prompt": []}, "prompt"),
    ({"model": "fake", "prompt": [1, 2]}, "prompt"),
    ({"model": "fake", "prompt": "hi", "echo": True}, None),
    ({"model": "fake", "prompt": "hi", "stream_options": {"include_usage": True}}, None),
    ({"model": "fake", "messages": MSG, "tools": [{"type": "function"}]}, "tools.0.function"),
    ({"model": "fake", "prompt": "hi", "logprobs": 21}, "logprobs"),
    ({"model": "fake", "messages": MSG, "top_logprobs": 2}, "top_logprobs"),
    (b"[1, 2]", None),
    ({"model": "fake", "messages": "hi"}, "messages"),
    ({"model": "fake", "prompt": "hi", "max_tokens": 5.5}, "max_tokens"),
    ({"model": "fake", "messages": MSG, "max_tokens": -1}, "max_tokens"),
    ({"model": "fake", "messages": MSG, "max_completion_tokens": 0}, "max_completion_tokens"),
    ({"model": "fake", "prompt": "hi", "temperature": -0.1}, "temperature"),
    ({"model": "fake", "prompt": "hi", "logit_bias": {"5": 10}}, None),
    ({"model": "fake", "messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}]},
     "messages.0.content"),
], ids=["bad-json", "no-model", "empty-messages", "bad-role", "string-int", "bool-int", "string-bool",
        "temperature", "top-p", "n-zero", "empty-stop", "nine-stops", "empty-prompts", "token-ids",
        "echo", "stream-options-alone", "tools", "logprobs-over-20", "top-logprobs-alone", "not-an-object",
        "messages-not-a-list", "float-int", "negative-max-tokens", "zero-max-completion-tokens",
        "negative-temperature", "logit-bias", "image-content"])
async def test_bad_bodies_are_400_naming_the_field(http: httpx.AsyncClient, engine: FakeEngine, sink: PrometheusSink,
                                                   body: Any, param: str | None) -> None:
    path = CHAT if isinstance(body, dict) and "messages" in body else COMP
    r = await (http.post(path, content=body) if isinstance(body, bytes) else http.post(path, json=body))
    err = openai_error(r, 400)
    assert err["type"] == "invalid_request_error" and err["param"] == param
    assert engine.requests == []  # refused before any engine saw it
    endpoint = "chat" if path == CHAT else "completions"
    assert sample(sink, "llm_requests_total", model="-", endpoint=endpoint, status="400") == 1


async def test_unknown_model_is_404_listing_the_ids(http: httpx.AsyncClient, sink: PrometheusSink) -> None:
    err = openai_error(await http.post(CHAT, json={"model": "nope-xyz", "messages": MSG}), 404)
    assert err["code"] == "model_not_found" and err["param"] == "model" and "fake" in err["message"]
    assert openai_error(await http.get("/v1/models/nope-xyz"), 404)["code"] == "model_not_found"
    assert "nope-xyz" not in sink.render()[0].decode()  # a name from a rejected body never becomes a label


async def test_api_keys_401_and_probes_stay_open(engine: FakeEngine, sink: PrometheusSink) -> None:
    async with client(make_app(engine, metrics=sink, api_keys=["k1", "k2"])) as http:
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "Basic azE="},
                        {"Authorization": "k1"}):
            r = await http.post(COMP, json={"model": "fake", "prompt": "x"}, headers=headers)
            assert openai_error(r, 401)["type"] == "authentication_error"
            assert r.headers["www-authenticate"] == "Bearer"
        for key in ("k1", "k2"):
            assert (await http.get("/v1/models", headers={"Authorization": f"Bearer {key}"})).status_code == 200
        for path in ("/healthz", "/readyz", "/metrics"):
            assert (await http.get(path)).status_code == 200
    assert engine.requests == []


@pytest.mark.parametrize("chunked", [False, True], ids=["content-length", "chunked"])
async def test_body_over_the_limit_is_413(engine: FakeEngine, sink: PrometheusSink, chunked: bool) -> None:
    data = json.dumps({"model": "fake", "prompt": "a" * 5000}).encode()

    async def pieces() -> AsyncIterator[bytes]:
        for i in range(0, len(data), 1000):
            yield data[i:i + 1000]

    async with client(make_app(engine, metrics=sink, max_body_bytes=2048)) as http:
        r = await http.post(COMP, content=pieces() if chunked else data)
    assert openai_error(r, 413)["code"] == "request_too_large"
    assert engine.requests == []
    assert sample(sink, "llm_requests_total", model="-", endpoint="completions", status="413") == 1


async def test_fan_out_beyond_what_the_engine_admits_is_400_naming_the_limit(http: httpx.AsyncClient,
                                                                            engine: FakeEngine) -> None:
    err = openai_error(await http.post(CHAT, json={"model": "fake", "messages": MSG, "n": 5}), 400)
    assert err["param"] == "n" and "needs 5" in err["message"] and "at most 4" in err["message"]
    err = openai_error(await http.post(COMP, json={"model": "fake", "prompt": ["a", "b", "c"], "n": 2}), 400)
    assert "needs 6" in err["message"]
    assert engine.requests == []
    assert (await http.post(CHAT, json={"model": "fake", "messages": MSG, "n": 4})).status_code == 200


# ----------------------------------------------------------------------------- engine errors


@pytest.mark.parametrize("stream", [False, True])
@pytest.mark.parametrize(("error", "status", "retry_after"), [
    (QueueFullError("server busy", retry_after=2.2), 429, "3"),
    (EngineDeadError("engine is dead", retry_after=10), 503, "10"),
    (InvalidRequestError("bad sampling", param="top_p"), 400, None),
    (EngineError("generation failed"), 500, None),
], ids=["429", "503", "400", "500"])
async def test_error_on_the_first_chunk_is_a_real_status(http: httpx.AsyncClient, engine: FakeEngine,
                                                         sink: PrometheusSink, error: EngineError, status: int,
                                                         retry_after: str | None, stream: bool) -> None:
    engine.fail_first = error
    r = await http.post(COMP, json={"model": "fake", "prompt": "x", "stream": stream})
    err = openai_error(r, status)
    assert err["message"] == error.message and err["type"] == error.error_type
    assert r.headers.get("retry-after") == retry_after
    assert sample(sink, "llm_requests_total", model="fake", engine="fake", status=str(status)) == 1


async def test_not_ready_engine_is_503_with_retry_after(sink: PrometheusSink) -> None:
    cold = FakeEngine("cold", metrics=sink)
    async with client(make_app(cold, metrics=sink)) as http:
        r = await http.post(COMP, json={"model": "cold", "prompt": "x"})
        assert openai_error(r, 503)["code"] == "engine_not_ready" and r.headers["retry-after"] == "5"
        ready = await http.get("/readyz")
        assert ready.status_code == 503 and ready.json()["models"]["cold"]["ready"] is False


async def test_full_queue_is_429_and_the_queue_drains(http: httpx.AsyncClient, engine: FakeEngine,
                                                      sink: PrometheusSink) -> None:
    engine.gate = asyncio.Event()
    body = {"model": "fake", "prompt": "x", "max_tokens": 2}
    held = [asyncio.create_task(http.post(COMP, json=body)) for _ in range(4)]  # 2 running + 2 waiting
    for _ in range(1000):
        if engine.stats().running == 2 and engine.stats().waiting == 2:
            break
        await asyncio.sleep(0)
    refused = await http.post(COMP, json=body)
    assert openai_error(refused, 429)["code"] == "queue_full" and refused.headers["retry-after"] == "2"
    engine.gate.set()
    assert [r.status_code for r in await asyncio.gather(*held)] == [200] * 4
    assert engine.stats().running == 0 and engine.stats().waiting == 0
    assert sample(sink, "llm_queue_depth", model="fake") == 0


async def test_engine_error_mid_stream_is_an_sse_error_event_then_done(http: httpx.AsyncClient, engine: FakeEngine,
                                                                       sink: PrometheusSink) -> None:
    engine.fail_after = (2, EngineDeadError("engine died mid-request"))
    r = await http.post(CHAT, json={"model": "fake", "messages": MSG, "max_tokens": 5, "stream": True})
    assert r.status_code == 200  # the status was sent with the first chunk
    ev = events(r)
    assert ev[-1] == "[DONE]"
    assert ev[-2]["error"]["message"] == "engine died mid-request" and ev[-2]["error"]["code"] == "engine_dead"
    text = "".join(e["choices"][0]["delta"].get("content") or "" for e in ev[:-2])
    assert text == "w0 w1 "
    assert sample(sink, "llm_request_errors_total", model="fake", error_type="service_unavailable") == 1
    assert sample(sink, "llm_requests_total", model="fake", status="503") == 1


async def test_engine_error_mid_generation_without_stream_is_an_error_response(http: httpx.AsyncClient,
                                                                               engine: FakeEngine) -> None:
    engine.fail_after = (1, EngineError("generation failed: RuntimeError"))
    err = openai_error(await http.post(COMP, json={"model": "fake", "prompt": "x", "n": 2}), 500)
    assert err["message"] == "generation failed: RuntimeError"
    assert engine.stats().running == 0  # the sibling generation was stopped too


async def test_unexpected_exception_mid_stream_is_a_500_event_without_details(http: httpx.AsyncClient,
                                                                              engine: FakeEngine) -> None:
    engine.fail_after = (1, RuntimeError("secret internals"))  # type: ignore[arg-type]
    ev = events(await http.post(COMP, json={"model": "fake", "prompt": "x", "stream": True}))
    assert ev[-1] == "[DONE]" and ev[-2]["error"]["code"] == "internal_error"
    assert "secret" not in json.dumps(ev)


# ----------------------------------------------------------------------------- client disconnects


async def _asgi_run(app: Any, path: str, body: dict[str, Any], leave: asyncio.Event, on_send: Any) -> list[Any]:
    """POST through the ASGI interface; the client disconnects once `leave` is set; `on_send(message)` sees
    each message the app sends. Returns the sent messages."""
    sent: list[Any] = []
    payload = json.dumps(body).encode()
    delivered = False

    async def receive() -> dict[str, Any]:
        nonlocal delivered
        if not delivered:
            delivered = True
            return {"type": "http.request", "body": payload, "more_body": False}
        await leave.wait()
        return {"type": "http.disconnect"}

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)
        on_send(message)

    scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "POST", "path": path,
             "raw_path": path.encode(), "query_string": b"", "root_path": "", "scheme": "http",
             "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(payload)).encode())],
             "client": ("127.0.0.1", 1), "server": ("unit", 80)}
    await asyncio.wait_for(app(scope, receive, send), 10)
    return sent


async def _asgi_post_then_disconnect(app: Any, path: str, body: dict[str, Any], leave: asyncio.Event,
                                     on_first_event: Any = None) -> list[Any]:
    """POST through the ASGI interface; the client disconnects at the first SSE event (or once `leave` is set)."""

    def on_send(message: dict[str, Any]) -> None:
        if message["type"] == "http.response.body" and message.get("body", b"").startswith(b"data: "):
            if on_first_event is not None and not leave.is_set():
                on_first_event()
            leave.set()  # the first event arrived: go away mid-stream

    return await _asgi_run(app, path, body, leave, on_send)


@pytest.mark.parametrize("stream", [True, False], ids=["stream", "non-stream"])
async def test_client_disconnect_stops_the_generation(engine: FakeEngine, sink: PrometheusSink, stream: bool) -> None:
    app = make_app(engine, metrics=sink)
    leave = asyncio.Event()
    gate = engine.gate = asyncio.Event()
    if stream:
        gate.set()  # the first token flows; the engine then holds until the client has gone
    else:
        asyncio.get_running_loop().call_later(0.05, leave.set)  # the client hangs up while the engine works
    body = {"model": "fake", "prompt": "x", "max_tokens": 50, "stream": stream}
    await _asgi_post_then_disconnect(app, COMP, body, leave, on_first_event=gate.clear)
    for _ in range(1000):
        if engine.finished:
            break
        await asyncio.sleep(0)
    assert engine.finished == ["closed"]  # the engine's stream was closed, not run to the end
    assert engine.stats().running == 0
    assert sample(sink, "llm_requests_total", model="fake", status="499") == 1


async def test_draining_server_reports_503_on_readyz(engine: FakeEngine, sink: PrometheusSink) -> None:
    app = make_app(engine, metrics=sink)
    app.state.draining = True
    async with client(app) as http:
        r = await http.get("/readyz")
    assert r.status_code == 503 and r.json()["status"] == "draining"


# ----------------------------------------------------------------------------- metrics and access log


async def test_metrics_follow_requests(http: httpx.AsyncClient, sink: PrometheusSink) -> None:
    await http.post(COMP, json={"model": "fake", "prompt": "a b", "max_tokens": 3})
    await http.post(CHAT, json={"model": "fake", "messages": MSG, "max_tokens": 2, "stream": True})
    labels = {"model": "fake", "engine": "fake"}
    assert sample(sink, "llm_requests_total", **labels, status="200") == 2
    assert sample(sink, "llm_output_tokens_total", **labels) == 5
    assert sample(sink, "llm_prompt_tokens_total", **labels) == 5
    assert sample(sink, "llm_time_to_first_token_seconds_count", **labels) == 2
    assert sample(sink, "llm_request_latency_seconds_count", **labels, endpoint="chat") == 1
    text = (await http.get("/metrics")).text
    assert 'llm_requests_total{endpoint="completions",engine="fake",model="fake",status="200"} 1.0' in text


async def test_access_log_line_per_request(http: httpx.AsyncClient, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level("INFO", logger="app.access")
    await http.post(COMP, json={"model": "fake", "prompt": "x", "max_tokens": 2}, headers={"X-Request-Id": "t-1"})
    await http.post(CHAT, json={"model": "nope", "messages": MSG}, headers={"X-Request-Id": "evil id <x>"})
    lines = [r.getMessage() for r in caplog.records if r.name == "app.access"]
    assert any(line.startswith("t-1 completions model=fake engine=fake status=200") and "output_tokens=2" in line
               for line in lines), lines
    assert any(line.startswith("evil_id__x_ chat model=- engine=- status=404") for line in lines), lines


def test_sse_events_survive_splitlines_readers() -> None:
    """Generated text may contain U+2028/U+0085, which httpx's iter_lines treats as line ends (seen as a flake)."""
    from httpx._decoders import LineDecoder

    from app.api.streaming import sse

    text = "a\u2028b\u0085c\u2029d 你好 \x1c"
    event = sse({"choices": [{"text": text}]})
    lines = LineDecoder().decode(event)
    assert lines[0].startswith("data: ") and lines[1:] == [""]
    assert json.loads(lines[0][len("data: "):])["choices"][0]["text"] == text


# ----------------------------------------------------------------------------- pacing and server-side cuts


async def _asgi_post(app: Any, body: dict[str, Any], on_body: Any) -> list[bytes]:
    """POST /v1/completions through the ASGI interface (the client stays); `on_body(chunk)` sees each body part."""

    def on_send(message: dict[str, Any]) -> None:
        if message["type"] == "http.response.body" and message.get("body"):
            on_body(message["body"])

    sent = await _asgi_run(app, COMP, body, asyncio.Event(), on_send)  # never set: the client stays connected
    return [m.get("body", b"") for m in sent if m["type"] == "http.response.body"]


async def test_silent_stream_gets_keepalive_comments_between_tokens(engine: FakeEngine, sink: PrometheusSink) -> None:
    gate = engine.gate = asyncio.Event()
    engine.hold_after = 1  # the first token flows (priming needs it), then the engine stalls
    app = make_app(engine, metrics=sink, sse_keepalive_s=0.02)

    def on_body(chunk: bytes) -> None:
        if chunk == b": keep-alive\n\n":
            gate.set()  # a comment reached the client while it was silent: let it finish

    parts = await _asgi_post(app, {"model": "fake", "prompt": "x", "max_tokens": 3, "stream": True}, on_body)
    assert b": keep-alive\n\n" in parts
    assert parts[-1] == b"data: [DONE]\n\n" or parts[-2] == b"data: [DONE]\n\n", parts
    assert sample(sink, "llm_output_tokens_total", model="fake") == 3  # comments are not tokens


@pytest.mark.parametrize("stream", [True, False], ids=["stream", "non-stream"])
async def test_server_cut_is_an_error_event_or_a_503_never_a_499(engine: FakeEngine, sink: PrometheusSink,
                                                                   stream: bool) -> None:
    engine.gate = asyncio.Event()  # never opens: the engine stalls (after its first token when streaming)
    engine.hold_after = 1 if stream else 0
    app = make_app(engine, metrics=sink)
    if not stream:
        asyncio.get_running_loop().call_later(0.05, app.state.stream_cut.set)

    def on_body(chunk: bytes) -> None:
        if chunk.startswith(b"data: {"):
            app.state.stream_cut.set()  # what the server does when its shutdown grace ends

    parts = await _asgi_post(app, {"model": "fake", "prompt": "x", "max_tokens": 50, "stream": stream}, on_body)
    text = b"".join(parts).decode()
    if stream:
        payloads = [b[6:] for b in text.split("\n\n") if b.startswith("data: ")]
        assert payloads[-1] == "[DONE]"
        assert json.loads(payloads[-2])["error"]["code"] == "server_shutting_down"
    else:
        assert json.loads(text)["error"]["code"] == "server_shutting_down"
    assert engine.finished == ["closed"]
    assert sample(sink, "llm_requests_total", status="503") == 1
    assert sample(sink, "llm_requests_total", status="499") == 0


# ----------------------------------------------------------------------------- auth order, readiness detail, OpenAPI


async def test_key_is_checked_before_the_body_is_parsed(engine: FakeEngine, sink: PrometheusSink) -> None:
    async with client(make_app(engine, metrics=sink, api_keys=["k1"])) as http:
        r = await http.post(COMP, content=b'{"model": "fake", "prompt": ', headers={"content-type": "application/json"})
        assert openai_error(r, 401)["code"] == "invalid_api_key"  # not a 400 that reveals parsing
        r = await http.post(COMP, content=b'{"model": "fake", "prompt": ',
                            headers={"content-type": "application/json", "Authorization": "Bearer k1"})
        assert openai_error(r, 400)["type"] == "invalid_request_error"


async def test_readyz_details_only_for_key_holders(engine: FakeEngine, sink: PrometheusSink) -> None:
    async with client(make_app(engine, metrics=sink, api_keys=["k1"])) as http:
        anonymous = (await http.get("/readyz")).json()["models"]
        assert anonymous == {"fake": {"ready": True}}  # no model paths, devices or engine reasons
        detail = (await http.get("/readyz", headers={"Authorization": "Bearer k1"})).json()["models"]["fake"]
        assert detail["ready"] is True and detail["model_source"] == "memory" and "max_parallel" in detail
        assert (await http.get("/health")).json() == {"status": "ok"}


@pytest.mark.parametrize("keys", [[], ["k1"]], ids=["open", "with-keys"])
async def test_openapi_documents_the_real_errors_and_no_422(engine: FakeEngine, sink: PrometheusSink,
                                                            keys: list[str]) -> None:
    async with client(make_app(engine, metrics=sink, api_keys=keys)) as http:
        doc = (await http.get("/openapi.json")).json()
    assert '"422"' not in json.dumps(doc) and "HTTPValidationError" not in json.dumps(doc)
    for path in (CHAT, COMP):
        responses = doc["paths"][path]["post"]["responses"]
        for status in ("400", "404", "413", "429", "503"):
            schema = responses[status]["content"]["application/json"]["schema"]
            assert schema == {"$ref": "#/components/schemas/ErrorResponse"}, (path, status)
        assert ("401" in responses) == bool(keys)
        assert ("security" in doc["paths"][path]["post"]) == bool(keys)
    body = doc["components"]["schemas"]["CompletionRequest"]["properties"]["model"]
    assert body["enum"] == ["fake"]


async def test_backup_server_answers_a_model_it_does_not_serve_with_a_retryable_503(sink: PrometheusSink) -> None:
    from app.api.app import create_app
    from app.api.backend import LocalBackend

    eng = FakeEngine("fake", metrics=sink)
    await eng.start()
    app = create_app(LocalBackend({"fake": eng}, location="unit", backup=True), metrics=sink, manage_backend=False)
    async with client(app) as http:
        r = await http.post(COMP, json={"model": "other", "prompt": "x"})
    err = openai_error(r, 503)
    assert err["code"] == "model_not_served_here" and "'other'" in err["message"] and err["param"] == "model"
    assert int(r.headers["retry-after"]) >= 1
