"""Bad input against a real server: each case gets its documented status in OpenAI error shape.

No case may produce a 5xx or a stack trace, and the server keeps serving afterwards. The official
client maps the same statuses to its exception classes. The table keeps the cases that need the real
process (tokenizer, context length, uvicorn, routing); field validation is in tests/unit.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

import httpx
import openai
import pytest

from tests.support.openai_errors import assert_openai_error
from tests.support.servers import ServerProcess

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


# Body validation is API logic, unit-tested in process (tests/unit/api/test_routes.py). What stays here
# needs the real server: the model's tokenizer and context, uvicorn's own body handling, routing.
CASES = [
    Case("malformed-json", CHAT, b'{"model": "tiny", "messages": [', 400, says="not valid JSON"),
    Case("deeply-nested-json", COMP, b"[" * 100_000 + b"]" * 100_000, 400),
    Case("invalid-utf8", COMP, b'{"model": "tiny", "prompt": "\xff\xfe"}', 400),
    Case("empty-body", COMP, b"", 400),
    # a lone surrogate is valid JSON but no Unicode text: it used to crash tokenization (500)
    Case("lone-surrogate-chat", CHAT, b'{"model": "tiny", "messages": [{"role": "user", "content": "hi \\udc00 x"}]}',
         400, param="messages.0.content", says="surrogate", code="invalid_unicode"),
    Case("lone-surrogate-prompt", COMP, b'{"model": "tiny", "prompt": "hi \\ud800"}', 400, param="prompt",
         says="surrogate"),
    Case("lone-surrogate-stream", COMP, b'{"model": "tiny", "prompt": ["ok", "\\udfff"], "stream": true}', 400,
         says="surrogate"),
    Case("empty-prompt", COMP, comp(prompt=""), 400, param="prompt", says="empty"),
    # seeds span the signed 64-bit range, as vLLM accepts them
    Case("seed-beyond-int64", COMP, comp(seed=2**63), 400, param="seed", says="9223372036854775807"),
    Case("unknown-model", CHAT, {"model": "gpt-9", "messages": MSG}, 404, param="model", says="tiny",
         code="model_not_found"),
    Case("over-long-prompt", COMP, comp(prompt=LONG_PROMPT), 400, param="prompt", says="2048",
         code="context_length_exceeded"),
    Case("over-long-chat", CHAT, chat(messages=[{"role": "user", "content": LONG_PROMPT}]), 400, param="messages",
         says="2048", code="context_length_exceeded"),
    Case("max-tokens-beyond-context", COMP, comp(max_tokens=5000), 400, param="max_tokens", says="2048",
         code="context_length_exceeded"),
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
    {"seed": 2**63 - 1, "n": 2},  # the largest seed; the second choice gets seed + 1 (engines fold to 64 bits)
    {"seed": -(2**63)},
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
