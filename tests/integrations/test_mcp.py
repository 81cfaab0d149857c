"""The MCP server (`python -m app mcp`) driven by the MCP SDK's own client against a real tiny-model server.

Covers stdio and streamable HTTP, `generate` with and without context, chat messages,
`list_models`, and the failures an agent must be able to read: cluster down, unknown
model, bad arguments. The tiny model emits random text, so assertions are on structure.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any, TextIO

import httpx
import pytest

from tests.support.env import ROOT, need
from tests.support.mcp import HAVE_MCP, error_text, mcp_env, payload, stdio_session
from tests.support.servers import ServerProcess, free_port, spawn_server, stop_process, wait_until

if HAVE_MCP:
    from mcp import ClientSession
    from mcp.client.streamable_http import streamable_http_client

API_KEYS = "key-one,key-two"
TIMEOUT = 120.0


@pytest.fixture(autouse=True)
def _need_mcp() -> None:
    need(HAVE_MCP, "needs the `mcp` extra (pip install -e .[mcp])")


@pytest.fixture(scope="module")
def cluster(tiny_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    """One real standalone server for the module, with API keys on."""
    srv = spawn_server(tmp_path_factory.mktemp("mcp-cluster"), tiny_model, env={"API_KEYS": API_KEYS})
    try:
        yield srv
    finally:
        srv.stop(signal.SIGKILL)






@pytest.fixture
def mcp_log(tmp_path: Path) -> Iterator[TextIO]:
    """stderr of the stdio MCP server (kept in the test's tmp dir)."""
    with open(tmp_path / "mcp.log", "w") as f:
        yield f






def _check_generation(data: dict[str, Any], max_tokens: int) -> None:
    assert isinstance(data["text"], str)
    assert data["model"] == "tiny"
    assert data["engine"] == "transformers"
    assert data["finish_reason"] in ("stop", "length")
    usage = data["usage"]
    assert usage["prompt_tokens"] > 0
    assert 1 <= usage["completion_tokens"] <= max_tokens
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]
    if data["finish_reason"] == "length":
        assert data["text"], "a generation cut at max_tokens has text"


async def test_stdio_tools_generate_and_errors(cluster: ServerProcess, mcp_log: TextIO) -> None:
    # the API key comes from API_KEYS (first entry): the fallback for CLUSTER_API_KEY
    env = mcp_env(cluster.base_url + "/v1", API_KEYS=API_KEYS)
    async with stdio_session(env, mcp_log) as session:
        tools = {t.name: t for t in (await session.list_tools()).tools}
        assert set(tools) >= {"generate", "list_models"}
        props = tools["generate"].input_schema["properties"]
        assert {"prompt", "messages", "context", "model", "max_tokens", "temperature", "stop"} <= set(props)

        models = payload(await session.call_tool("list_models", {}))
        assert models["models"][0]["id"] == "tiny"
        assert models["models"][0]["engine"] == "transformers"
        assert models["models"][0]["ready"] is True

        plain = payload(await session.call_tool("generate", {"prompt": "What is Ray Serve?", "max_tokens": 8}))
        _check_generation(plain, 8)

        docs = ["Ray Serve is a model serving library.", "nginx fails over to the fallback server."]
        grounded = payload(await session.call_tool(
            "generate", {"prompt": "What is Ray Serve?", "context": docs, "model": "tiny", "max_tokens": 8,
                         "temperature": 0.0, "stop": ["\n\n"]}))
        _check_generation(grounded, 8)
        # the documents really reach the model: the prompt grows by (at least) their tokens
        assert grounded["usage"]["prompt_tokens"] > plain["usage"]["prompt_tokens"] + 10

        chat = payload(await session.call_tool("generate", {"messages": [
            {"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello"}], "max_tokens": 4}))
        _check_generation(chat, 4)

        # errors an agent can read, and the server keeps serving afterwards
        unknown = error_text(await session.call_tool("generate", {"prompt": "hi", "model": "no-such-model"}))
        assert "no-such-model" in unknown and "does not exist" in unknown and "tiny" in unknown
        both = error_text(await session.call_tool("generate", {"prompt": "hi", "messages": [
            {"role": "user", "content": "hi"}]}))
        assert "exactly one" in both
        neither = error_text(await session.call_tool("generate", {"max_tokens": 4}))
        assert "exactly one" in neither
        bad_tokens = error_text(await session.call_tool("generate", {"prompt": "hi", "max_tokens": 0}))
        assert "max_tokens" in bad_tokens
        bad_type = error_text(await session.call_tool("generate", {"prompt": "hi", "temperature": "hot"}))
        assert "temperature" in bad_type
        bad_role = error_text(await session.call_tool("generate", {"messages": [{"role": "robot", "content": "x"}]}))
        assert "role" in bad_role

        # structured output: JSON matching the schema, parsed into `data` (constrained decoding)
        schema = {"type": "object", "properties": {"answer": {"type": "string", "maxLength": 12},
                                                   "sure": {"type": "boolean"}}, "required": ["answer", "sure"]}
        assert "response_schema" in props
        answers = []
        for _ in range(3):  # greedy random weights may spend max_tokens on blanks: sample, a few tries
            result = await session.call_tool("generate", {
                "prompt": "Is Ray Serve a library?", "response_schema": schema, "max_tokens": 300,
                "temperature": 0.8})
            if not result.is_error:
                answers.append(payload(result))
        assert answers, "no structured answer finished within 300 tokens in 3 tries"
        for structured in answers:
            assert structured["finish_reason"] == "stop" and json.loads(structured["text"]) == structured["data"]
            assert set(structured["data"]) == {"answer", "sure"} and isinstance(structured["data"]["sure"], bool)
        cut = error_text(await session.call_tool("generate", {"prompt": "x", "response_schema": schema,
                                                               "max_tokens": 2}))
        assert "max_tokens" in cut
        bad = error_text(await session.call_tool("generate", {"prompt": "x", "response_schema": {
            "type": "object", "properties": {"n": {"type": "number", "multipleOf": 2}}}}))
        assert "multipleOf" in bad

        again = payload(await session.call_tool("generate", {"prompt": "still alive?", "max_tokens": 2}))
        _check_generation(again, 2)


async def test_stdio_cluster_down_is_a_readable_tool_error(mcp_log: TextIO) -> None:
    dead = f"http://127.0.0.1:{free_port()}/v1"  # nothing listens there
    env = mcp_env(dead, CLUSTER_MAX_ATTEMPTS="2", CLUSTER_MAX_RETRY_WAIT_S="0.2")
    async with stdio_session(env, mcp_log) as session:
        for name, args in (("generate", {"prompt": "hi"}), ("list_models", {})):
            text = error_text(await session.call_tool(name, args))
            assert "unreachable" in text and dead in text
        assert {t.name for t in (await session.list_tools()).tools} >= {"generate", "list_models"}


async def test_stdio_wrong_api_key_is_a_readable_tool_error(cluster: ServerProcess, mcp_log: TextIO) -> None:
    env = mcp_env(cluster.base_url + "/v1", CLUSTER_API_KEY="wrong")
    async with stdio_session(env, mcp_log) as session:
        text = error_text(await session.call_tool("list_models", {}))
        assert "401" in text and "invalid API key" in text


@pytest.fixture
def http_mcp(cluster: ServerProcess, tmp_path: Path) -> Iterator[str]:
    port = free_port()
    log = open(tmp_path / "mcp-http.log", "wb")
    proc = subprocess.Popen(
        [sys.executable, "-m", "app", "mcp", "--transport", "http", "--port", str(port), "--log-level", "info"],
        cwd=ROOT, stdout=log, stderr=subprocess.STDOUT,
        env={**os.environ, "CLUSTER_BASE_URL": cluster.base_url + "/v1", "CLUSTER_API_KEY": "key-two",
             "API_KEYS": ""},
    )
    url = f"http://127.0.0.1:{port}/mcp"

    def up() -> bool:
        if proc.poll() is not None:
            raise RuntimeError(f"mcp server exited {proc.returncode}: {(tmp_path / 'mcp-http.log').read_text()}")
        httpx.get(url, timeout=2)  # any HTTP answer means it listens
        return True

    try:
        wait_until(up, TIMEOUT, 0.2, "MCP streamable HTTP endpoint")
        yield url
    finally:
        stop_process(proc, signal.SIGTERM, 20)
        log.close()


async def test_streamable_http(http_mcp: str) -> None:
    async with streamable_http_client(http_mcp) as (read, write):
        async with ClientSession(read, write, read_timeout_seconds=TIMEOUT) as session:
            await session.initialize()
            assert {t.name for t in (await session.list_tools()).tools} >= {"generate", "list_models"}
            models = payload(await session.call_tool("list_models", {}))
            assert [m["id"] for m in models["models"]] == ["tiny"]
            out = payload(await session.call_tool(
                "generate", {"prompt": "Which engine?", "context": ["The fallback uses transformers."],
                             "max_tokens": 6}))
            _check_generation(out, 6)
            err = error_text(await session.call_tool("generate", {"prompt": "x", "model": "missing"}))
            assert "does not exist" in err
