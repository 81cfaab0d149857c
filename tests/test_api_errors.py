"""Bad input against a real server: each case gets its documented status in OpenAI error shape.

No case may produce a 5xx or a stack trace, and the server keeps serving afterwards.
The official client maps the same statuses to its exception classes.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

import httpx
import openai
import pytest

from tests.conftest import ServerProcess

MSG = [{"role": "user", "content": "hi"}]
CHAT = "/v1/chat/completions"
COMP = "/v1/completions"
LONG_PROMPT = "hello world " * 3000  # ~6000 tokens of the tiny tokenizer; its context is 2048


@dataclass
class Case:
    id: str
    path: str
    body: Any  # dict/list -> JSON; bytes -> sent as is
    status: int
    param: str | None = None
    says: str = ""  # substring of the error message
    code: str | None = None
    headers: dict[str, str] | None = None


def chat(**kw: Any) -> dict[str, Any]:
    return {"model": "tiny", "messages": MSG, **kw}


def comp(**kw: Any) -> dict[str, Any]:
    return {"model": "tiny", "prompt": "hi", **kw}


CASES = [
    Case("malformed-json", CHAT, b'{"model": "tiny", "messages": [', 400, says="not valid JSON"),
    Case("not-an-object", COMP, b"[1, 2]", 400),
    Case("deeply-nested-json", COMP, b"[" * 100_000 + b"]" * 100_000, 400),
    Case("invalid-utf8", COMP, b'{"model": "tiny", "prompt": "\xff\xfe"}', 400),
    Case("empty-body", COMP, b"", 400),
    Case("missing-model", COMP, {"prompt": "hi"}, 400, param="model", says="required"),
    Case("messages-not-a-list", CHAT, {"model": "tiny", "messages": "hi"}, 400, param="messages"),
    Case("bad-role", CHAT, {"model": "tiny", "messages": [{"role": "robot", "content": "x"}]}, 400,
         param="messages.0.role"),
    Case("max-tokens-string", COMP, comp(max_tokens="5"), 400, param="max_tokens"),
    Case("max-tokens-bool", COMP, comp(max_tokens=True), 400, param="max_tokens"),
    Case("max-tokens-float", COMP, comp(max_tokens=5.5), 400, param="max_tokens"),
    Case("stream-not-bool", COMP, comp(stream="yes"), 400, param="stream"),
    Case("negative-max-tokens", CHAT, chat(max_tokens=-1), 400, param="max_tokens"),
    Case("zero-max-completion-tokens", CHAT, chat(max_completion_tokens=0), 400, param="max_completion_tokens"),
    Case("temperature-too-high", CHAT, chat(temperature=2.5), 400, param="temperature"),
    Case("temperature-negative", COMP, comp(temperature=-0.1), 400, param="temperature"),
    Case("top-p-zero", COMP, comp(top_p=0), 400, param="top_p"),
    Case("n-zero", COMP, comp(n=0), 400, param="n"),
    Case("empty-stop", COMP, comp(stop=""), 400, param="stop"),
    Case("too-many-stops", COMP, comp(stop=[str(i) for i in range(9)]), 400, param="stop"),
    Case("empty-messages", CHAT, {"model": "tiny", "messages": []}, 400, param="messages"),
    Case("empty-prompt-list", COMP, {"model": "tiny", "prompt": []}, 400, param="prompt"),
    Case("empty-prompt", COMP, comp(prompt=""), 400, param="prompt", says="empty"),
    Case("token-id-prompt", COMP, comp(prompt=[1, 2, 3]), 400, param="prompt"),
    Case("stream-options-without-stream", COMP, comp(stream_options={"include_usage": True}), 400),
    Case("unknown-model", CHAT, {"model": "gpt-9", "messages": MSG}, 404, param="model", says="tiny",
         code="model_not_found"),
    Case("over-long-prompt", COMP, comp(prompt=LONG_PROMPT), 400, param="prompt", says="2048",
         code="context_length_exceeded"),
    Case("over-long-chat", CHAT, chat(messages=[{"role": "user", "content": LONG_PROMPT}]), 400, param="messages",
         says="2048", code="context_length_exceeded"),
    Case("max-tokens-beyond-context", COMP, comp(max_tokens=5000), 400, param="max_tokens", says="2048",
         code="context_length_exceeded"),
    Case("logprobs", CHAT, chat(logprobs=True), 400, says="logprobs"),
    Case("completion-logprobs", COMP, comp(logprobs=3), 400, says="logprobs"),
    Case("tools", CHAT, chat(tools=[{"type": "function", "function": {"name": "f", "parameters": {}}}]), 400,
         says="tools"),
    Case("json-mode", CHAT, chat(response_format={"type": "json_object"}), 400, says="response_format"),
    Case("logit-bias", COMP, comp(logit_bias={"5": 10}), 400, says="logit_bias"),
    Case("echo", COMP, comp(echo=True), 400, says="echo"),
    Case("image-content", CHAT, {"model": "tiny", "messages": [
        {"role": "user", "content": [{"type": "image_url", "image_url": {"url": "http://x/y.png"}}]}]}, 400),
    Case("huge-body", COMP, b'{"model": "tiny", "prompt": "' + b"a" * (5 * 1024 * 1024) + b'"}', 413,
         code="request_too_large"),
    Case("huge-body-chunked", COMP, b'{"model": "tiny", "prompt": "' + b"a" * (5 * 1024 * 1024) + b'"}', 413,
         code="request_too_large", headers={"transfer-encoding": "chunked"}),
    Case("get-on-post-route", COMP, None, 405),
    Case("unknown-model-card", "/v1/models/gpt-9", None, 404, param="model", code="model_not_found"),
    Case("unknown-route", "/v1/embeddings", {"model": "tiny", "input": "x"}, 404),
]


def _send(base_url: str, case: Case) -> httpx.Response:
    with httpx.Client(base_url=base_url, timeout=60) as http:
        if case.body is None:
            return http.get(case.path)
        if isinstance(case.body, bytes):
            content: Any = case.body
            if case.headers and case.headers.get("transfer-encoding") == "chunked":
                data = case.body
                content = (data[i : i + 65536] for i in range(0, len(data), 65536))  # no Content-Length
            return http.post(case.path, content=content, headers={"content-type": "application/json"})
        return http.post(case.path, json=case.body)


def assert_openai_error(resp: httpx.Response, status: int) -> dict[str, Any]:
    assert resp.status_code == status, resp.text[:500]
    assert "Traceback" not in resp.text and 'File "' not in resp.text
    assert "errors.pydantic.dev" not in resp.text and "/site-packages/" not in resp.text
    body = resp.json()
    assert set(body) == {"error"}
    err = body["error"]
    assert set(err) == {"message", "type", "param", "code"}
    assert isinstance(err["message"], str) and err["message"]
    assert isinstance(err["type"], str) and err["type"]
    return err


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_bad_input(core_server: ServerProcess, case: Case) -> None:
    resp = _send(core_server.base_url, case)
    err = assert_openai_error(resp, case.status)
    if case.param is not None:
        assert err["param"] == case.param, err
    if case.says:
        assert case.says in err["message"], err
    if case.code is not None:
        assert err["code"] == case.code, err
    if case.status == 400:
        assert err["type"] == "invalid_request_error"
    # the server still serves
    assert httpx.get(core_server.base_url + "/healthz", timeout=10).status_code == 200


def test_server_keeps_serving_after_the_table(core_server: ServerProcess) -> None:
    r = httpx.post(core_server.base_url + COMP, json=comp(max_tokens=3, ignore_eos=True), timeout=60)
    assert r.status_code == 200
    assert r.json()["usage"]["completion_tokens"] == 3
    assert httpx.get(core_server.base_url + "/readyz", timeout=10).status_code == 200
    # no bad input was counted as a server error
    metrics = httpx.get(core_server.base_url + "/metrics", timeout=10).text
    assert 'status="500"' not in metrics


def test_openai_client_maps_errors_to_its_exceptions(core_server: ServerProcess) -> None:
    client = openai.OpenAI(base_url=core_server.base_url + "/v1", api_key="x", max_retries=0, timeout=60)
    with pytest.raises(openai.NotFoundError) as nf:
        client.chat.completions.create(model="nope", messages=MSG)  # type: ignore[arg-type]
    assert nf.value.code == "model_not_found"
    assert "tiny" in nf.value.message
    with pytest.raises(openai.BadRequestError) as br:
        client.completions.create(model="tiny", prompt=LONG_PROMPT)
    assert br.value.code == "context_length_exceeded"
    assert br.value.param == "prompt"
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model="tiny", messages=MSG, temperature=3)  # type: ignore[arg-type]


def test_unknown_fields_are_ignored(core_server: ServerProcess) -> None:
    body = comp(max_tokens=2, some_future_field={"x": 1}, metadata={"k": "v"})
    r = httpx.post(core_server.base_url + COMP, content=json.dumps(body), timeout=60)
    assert r.status_code == 200, r.text


@pytest.mark.parametrize("extra", [
    {"temperature": 1e-40},
    {"temperature": 2.0, "top_p": 1e-40},
    {"frequency_penalty": 2.0, "presence_penalty": -2.0, "temperature": 1.0},
    {"seed": 2**70},
    {"seed": -5},
    {"stop": ["\n"] * 8},
    {"logprobs": False},
    {"n": 16, "max_tokens": 1},
], ids=["denormal-temperature", "tiny-top-p", "penalty-bounds", "huge-seed", "negative-seed", "eight-stops",
        "logprobs-false", "n-16"])
def test_edge_values_are_served(core_server: ServerProcess, extra: dict[str, Any]) -> None:
    r = httpx.post(core_server.base_url + COMP, json=comp(**{"max_tokens": 3, **extra}), timeout=60)
    assert r.status_code == 200, r.text[:500]
    assert r.json()["choices"][0]["finish_reason"] in ("stop", "length")


def test_max_tokens_filling_the_context_exactly_is_served(core_server: ServerProcess) -> None:
    prompt_tokens = httpx.post(core_server.base_url + COMP, json=comp(max_tokens=1), timeout=60).json()["usage"][
        "prompt_tokens"]
    r = httpx.post(core_server.base_url + COMP, json=comp(max_tokens=2048 - prompt_tokens), timeout=60)
    assert r.status_code == 200, r.text[:300]
    r = httpx.post(core_server.base_url + COMP, json=comp(max_tokens=2049 - prompt_tokens), timeout=60)
    assert_openai_error(r, 400)
