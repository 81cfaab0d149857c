"""Tools, tool_choice, response_format and logprobs request fields: bad input is a 400 naming the parameter.

Requests go in-process (httpx.ASGITransport) to a FastAPI app with the project's own error handlers and a
route whose body mixes in the new request-field models, as `ChatCompletionRequest` will at integration.
"""

from __future__ import annotations

import json
from typing import Any

import httpx
import pytest
from fastapi import FastAPI
from jinja2 import Environment

from app.api.errors import install_error_handlers
from app.api.logprobs import ChatLogprobsFields, CompletionLogprobsFields
from app.api.response_format import ResponseFormatFields
from app.api.tool_parsers import get_parser
from app.api.tools import (
    ToolDefinition,
    ToolFields,
    check_tool_messages,
    messages_for_template,
    plan_tools,
    tool_grammar,
    tools_for_template,
)
from app.metrics import PrometheusSink

pytestmark = pytest.mark.unit

WEATHER = {"type": "function", "function": {"name": "get_weather", "description": "Weather in a city",
                                            "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                                                           "required": ["city"]}}}
SEARCH = {"type": "function", "function": {"name": "search"}}


class ChatBody(ToolFields, ResponseFormatFields, ChatLogprobsFields):
    messages: list[dict[str, Any]] = []


class CompletionBody(CompletionLogprobsFields):
    prompt: str = ""


def make_app() -> FastAPI:
    app = FastAPI()
    app.state.metrics = PrometheusSink()  # the error handlers count rejections into it
    install_error_handlers(app)

    @app.post("/chat")
    async def chat(body: ChatBody) -> dict[str, Any]:
        plan = body.tool_plan()
        check_tool_messages(body.messages)
        tool_spec = tool_grammar(plan, get_parser("hermes")) if plan else None
        fmt_spec = body.response_grammar()
        return {"mode": plan.mode if plan else None, "tool_grammar": tool_spec.kind if tool_spec else None,
                "format_grammar": fmt_spec.kind if fmt_spec else None, "logprobs_k": body.logprobs_k}

    @app.post("/completions")
    async def completions(body: CompletionBody) -> dict[str, Any]:
        return {"logprobs_k": body.logprobs_k}

    return app


@pytest.fixture
async def client() -> Any:
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=make_app()), base_url="http://unit") as c:
        yield c


async def bad(client: httpx.AsyncClient, body: dict[str, Any], path: str = "/chat") -> dict[str, Any]:
    r = await client.post(path, json=body)
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["type"] == "invalid_request_error"
    return err


async def test_valid_requests_route_to_the_right_grammar(client: httpx.AsyncClient) -> None:
    r = await client.post("/chat", json={"tools": [WEATHER, SEARCH]})
    assert r.json() == {"mode": "auto", "tool_grammar": "tool_calls", "format_grammar": None, "logprobs_k": None}
    named = {"type": "function", "function": {"name": "search"}}
    r = await client.post("/chat", json={"tools": [WEATHER, SEARCH], "tool_choice": named})
    assert r.json()["mode"] == "named"
    r = await client.post("/chat", json={"tools": [WEATHER], "tool_choice": "none"})
    assert r.json()["mode"] == "none" and r.json()["tool_grammar"] is None
    r = await client.post("/chat", json={"tool_choice": "auto", "response_format": {"type": "json_object"}})
    assert r.json() == {"mode": None, "tool_grammar": None, "format_grammar": "json_object", "logprobs_k": None}
    schema_fmt = {"type": "json_schema", "json_schema": {"name": "person", "strict": True, "schema": {
        "type": "object", "properties": {"age": {"type": "integer"}}, "required": ["age"]}}}
    r = await client.post("/chat", json={"response_format": schema_fmt, "logprobs": True, "top_logprobs": 3})
    assert r.json()["format_grammar"] == "json_schema" and r.json()["logprobs_k"] == 3
    r = await client.post("/chat", json={"response_format": {"type": "text"}, "logprobs": True})
    assert r.json()["format_grammar"] is None and r.json()["logprobs_k"] == 0
    r = await client.post("/completions", json={"logprobs": 2})
    assert r.json() == {"logprobs_k": 2}


@pytest.mark.parametrize(("tools", "param", "words"), [
    ([{"type": "function", "function": {"name": "x", "parameters": {"type": "objekt"}}}],
     "tools.0.function.parameters", "not a valid JSON schema"),
    ([{"type": "function", "function": {"name": "x", "parameters": {"type": "array"}}}],
     "tools.0.function.parameters", "must be a JSON schema of type object"),
    ([WEATHER, {"type": "function", "function": {"name": "bad name!"}}], "tools.1.function.name", "1-64 characters"),
    ([{"type": "retrieval"}], "tools.0.type", "function"),
    ([{"type": "function"}], "tools.0.function", "field required"),
    ([{"type": "function", "function": {"name": "x", "parameters": {"type": "object", "properties": {
        "tags": {"type": "array", "uniqueItems": True}}}}}], "tools.0.function.parameters", "'uniqueItems'"),
    ([WEATHER, WEATHER], "tools.1.function.name", "already defined by tools.0"),
])
async def test_malformed_tools_name_the_parameter(client: httpx.AsyncClient, tools: list, param: str,
                                                  words: str) -> None:
    err = await bad(client, {"tools": tools})
    assert err["param"] == param and words in err["message"]


async def test_tool_choice_errors_name_the_parameter(client: httpx.AsyncClient) -> None:
    named = {"type": "function", "function": {"name": "nope"}}
    err = await bad(client, {"tools": [WEATHER], "tool_choice": named})
    assert err["param"] == "tool_choice.function.name"
    assert "'nope', which is not in tools (defined: get_weather)" in err["message"]
    err = await bad(client, {"tool_choice": "required"})
    assert err["param"] == "tool_choice" and "requires tools" in err["message"]
    err = await bad(client, {"tools": [WEATHER], "tool_choice": "sometimes"})
    assert err["param"] == "tool_choice"


async def test_tool_messages_must_answer_a_call(client: httpx.AsyncClient) -> None:
    call = {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Oslo"}'}}
    ok = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": None, "tool_calls": [call]},
          {"role": "tool", "tool_call_id": "call_1", "content": "sunny"}]
    assert (await client.post("/chat", json={"tools": [WEATHER], "messages": ok})).status_code == 200
    err = await bad(client, {"messages": [*ok, {"role": "tool", "tool_call_id": "call_9", "content": "?"}]})
    assert err["param"] == "messages.3.tool_call_id" and "'call_9' answers no tool call" in err["message"]
    late = [*ok, {"role": "user", "content": "and?"}, {"role": "tool", "tool_call_id": "call_1", "content": "x"}]
    assert (await bad(client, {"messages": late}))["param"] == "messages.4.tool_call_id"
    err = await bad(client, {"messages": [{"role": "user", "content": "x"}, {"role": "tool", "content": "y"}]})
    assert err["param"] == "messages.1.tool_call_id" and "needs the id" in err["message"]
    twice = [*ok, {"role": "assistant", "tool_calls": [call]}]
    assert (await bad(client, {"messages": twice}))["param"] == "messages.3.tool_calls.0.id"


@pytest.mark.parametrize(("fmt", "param", "words"), [
    ({"type": "yaml"}, "response_format.type", "'text', 'json_object' or 'json_schema'"),
    ({}, "response_format.type", "field required"),
    ({"type": "json_schema"}, "response_format.json_schema", "field required when type is json_schema"),
    ({"type": "json_schema", "json_schema": {"schema": {}}}, "response_format.json_schema.name", "field required"),
    ({"type": "json_schema", "json_schema": {"name": "a b", "schema": {}}}, "response_format.json_schema.name",
     "1-64 characters"),
    ({"type": "json_schema", "json_schema": {"name": "a", "schema": {"type": 5}}},
     "response_format.json_schema.schema", "not a valid JSON schema"),
    ({"type": "json_schema", "json_schema": {"name": "a", "strict": "yes", "schema": {}}},
     "response_format.json_schema.strict", "valid boolean"),
    ({"type": "json_schema", "json_schema": {"name": "a", "schema": {"type": "object", "properties": {
        "n": {"type": "number", "multipleOf": 0.1}}}}}, "response_format.json_schema.schema", "'multipleOf'"),
])
async def test_bad_response_formats_name_the_parameter(client: httpx.AsyncClient, fmt: dict, param: str,
                                                       words: str) -> None:
    err = await bad(client, {"response_format": fmt})
    assert err["param"] == param and words in err["message"], err


async def test_bad_logprobs_fields_name_the_parameter(client: httpx.AsyncClient) -> None:
    err = await bad(client, {"top_logprobs": 2})
    assert err["param"] == "top_logprobs" and "requires logprobs to be true" in err["message"]
    assert (await bad(client, {"logprobs": True, "top_logprobs": 21}))["param"] == "top_logprobs"
    assert (await bad(client, {"logprobs": 1}))["param"] == "logprobs"  # strict: chat logprobs is a boolean
    assert (await bad(client, {"logprobs": 21}, "/completions"))["param"] == "logprobs"
    assert (await bad(client, {"logprobs": True}, "/completions"))["param"] == "logprobs"


def test_plan_defaults_to_auto_and_keeps_the_allowed_tools() -> None:
    tools = [ToolDefinition.model_validate(t) for t in (WEATHER, SEARCH)]
    assert plan_tools(None, None) is None and plan_tools([], "none") is None
    plan = plan_tools(tools, None, parallel=False)
    assert plan is not None and plan.mode == "auto" and plan.allowed == (0, 1) and not plan.parallel
    assert plan.parses_calls
    assert plan_tools(tools, "none").parses_calls is False  # type: ignore[union-attr]


def test_template_helpers_turn_arguments_into_objects() -> None:
    call = {"id": "c", "type": "function", "function": {"name": "f", "arguments": '{"a": 1}'}}
    odd = {"id": "d", "type": "function", "function": {"name": "f", "arguments": "not json"}}
    msgs = [{"role": "assistant", "content": None, "tool_calls": [call, odd]}]
    out = messages_for_template(msgs)
    assert out[0]["tool_calls"][0]["function"]["arguments"] == {"a": 1}
    assert out[0]["tool_calls"][1]["function"]["arguments"] == "not json"
    assert msgs[0]["tool_calls"][0]["function"]["arguments"] == '{"a": 1}'  # the request is not changed
    rendered = tools_for_template([ToolDefinition.model_validate(SEARCH)])
    assert rendered == [{"type": "function", "function": {"name": "search"}}]
    # Qwen2.5's template renders arguments with `| tojson`: an object comes out as JSON, text would be quoted
    env = Environment()
    env.filters["tojson"] = lambda v: json.dumps(v)
    assert env.from_string("{{ a | tojson }}").render(a=out[0]["tool_calls"][0]["function"]["arguments"]) == '{"a": 1}'
