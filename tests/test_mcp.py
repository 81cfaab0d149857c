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
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any, TextIO

import httpx
import pytest
from conftest import ROOT, ServerProcess, free_port, need, spawn_server, stop_process, wait_until

try:
    from mcp import ClientSession, StdioServerParameters, stdio_client
    from mcp.client.streamable_http import streamable_http_client

    HAVE_MCP = True
except ImportError:  # pragma: no cover - the `mcp` extra is installed by tests/run.sh
    HAVE_MCP = False

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


def _mcp_env(base_url: str, **extra: str) -> dict[str, str]:
    env = {k: os.environ[k] for k in ("PATH", "HOME", "HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE") if k in os.environ}
    return {**env, "CLUSTER_BASE_URL": base_url, "PYTHONUNBUFFERED": "1", **extra}


@asynccontextmanager
async def stdio_session(env: dict[str, str], errlog: TextIO) -> AsyncIterator[ClientSession]:
    params = StdioServerParameters(command=sys.executable, args=["-m", "app", "mcp"], env=env, cwd=str(ROOT))
    async with stdio_client(params, errlog=errlog) as (read, write):
        async with ClientSession(read, write, read_timeout_seconds=TIMEOUT) as session:
            await session.initialize()
            yield session


@pytest.fixture
def mcp_log(tmp_path: Path) -> Iterator[TextIO]:
    """stderr of the stdio MCP server (kept in the test's tmp dir)."""
    with open(tmp_path / "mcp.log", "w") as f:
        yield f


def _payload(result: Any) -> dict[str, Any]:
    assert not result.is_error, result.content
    if result.structured_content is not None:
        return result.structured_content
    return json.loads(result.content[0].text)


def _error_text(result: Any) -> str:
    assert result.is_error, f"expected a tool error, got {result}"
    return " ".join(getattr(c, "text", "") for c in result.content)


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
    env = _mcp_env(cluster.base_url + "/v1", API_KEYS=API_KEYS)
    async with stdio_session(env, mcp_log) as session:
        tools = {t.name: t for t in (await session.list_tools()).tools}
        assert set(tools) >= {"generate", "list_models"}
        props = tools["generate"].input_schema["properties"]
        assert {"prompt", "messages", "context", "model", "max_tokens", "temperature", "stop"} <= set(props)

        models = _payload(await session.call_tool("list_models", {}))
        assert models["models"][0]["id"] == "tiny"
        assert models["models"][0]["engine"] == "transformers"
        assert models["models"][0]["ready"] is True

        plain = _payload(await session.call_tool("generate", {"prompt": "What is Ray Serve?", "max_tokens": 8}))
        _check_generation(plain, 8)

        docs = ["Ray Serve is a model serving library.", "nginx fails over to the fallback server."]
        grounded = _payload(await session.call_tool(
            "generate", {"prompt": "What is Ray Serve?", "context": docs, "model": "tiny", "max_tokens": 8,
                         "temperature": 0.0, "stop": ["\n\n"]}))
        _check_generation(grounded, 8)
        # the documents really reach the model: the prompt grows by (at least) their tokens
        assert grounded["usage"]["prompt_tokens"] > plain["usage"]["prompt_tokens"] + 10

        chat = _payload(await session.call_tool("generate", {"messages": [
            {"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello"}], "max_tokens": 4}))
        _check_generation(chat, 4)

        # errors an agent can read, and the server keeps serving afterwards
        unknown = _error_text(await session.call_tool("generate", {"prompt": "hi", "model": "no-such-model"}))
        assert "no-such-model" in unknown and "does not exist" in unknown and "tiny" in unknown
        both = _error_text(await session.call_tool("generate", {"prompt": "hi", "messages": [
            {"role": "user", "content": "hi"}]}))
        assert "exactly one" in both
        neither = _error_text(await session.call_tool("generate", {"max_tokens": 4}))
        assert "exactly one" in neither
        bad_tokens = _error_text(await session.call_tool("generate", {"prompt": "hi", "max_tokens": 0}))
        assert "max_tokens" in bad_tokens
        bad_type = _error_text(await session.call_tool("generate", {"prompt": "hi", "temperature": "hot"}))
        assert "temperature" in bad_type
        bad_role = _error_text(await session.call_tool("generate", {"messages": [{"role": "robot", "content": "x"}]}))
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
                answers.append(_payload(result))
        assert answers, "no structured answer finished within 300 tokens in 3 tries"
        for structured in answers:
            assert structured["finish_reason"] == "stop" and json.loads(structured["text"]) == structured["data"]
            assert set(structured["data"]) == {"answer", "sure"} and isinstance(structured["data"]["sure"], bool)
        cut = _error_text(await session.call_tool("generate", {"prompt": "x", "response_schema": schema,
                                                               "max_tokens": 2}))
        assert "max_tokens" in cut
        bad = _error_text(await session.call_tool("generate", {"prompt": "x", "response_schema": {
            "type": "object", "properties": {"n": {"type": "number", "multipleOf": 2}}}}))
        assert "multipleOf" in bad

        again = _payload(await session.call_tool("generate", {"prompt": "still alive?", "max_tokens": 2}))
        _check_generation(again, 2)


async def test_stdio_cluster_down_is_a_readable_tool_error(mcp_log: TextIO) -> None:
    dead = f"http://127.0.0.1:{free_port()}/v1"  # nothing listens there
    env = _mcp_env(dead, CLUSTER_MAX_ATTEMPTS="2", CLUSTER_MAX_RETRY_WAIT_S="0.2")
    async with stdio_session(env, mcp_log) as session:
        for name, args in (("generate", {"prompt": "hi"}), ("list_models", {})):
            text = _error_text(await session.call_tool(name, args))
            assert "unreachable" in text and dead in text
        assert {t.name for t in (await session.list_tools()).tools} >= {"generate", "list_models"}


async def test_stdio_wrong_api_key_is_a_readable_tool_error(cluster: ServerProcess, mcp_log: TextIO) -> None:
    env = _mcp_env(cluster.base_url + "/v1", CLUSTER_API_KEY="wrong")
    async with stdio_session(env, mcp_log) as session:
        text = _error_text(await session.call_tool("list_models", {}))
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
            models = _payload(await session.call_tool("list_models", {}))
            assert [m["id"] for m in models["models"]] == ["tiny"]
            out = _payload(await session.call_tool(
                "generate", {"prompt": "Which engine?", "context": ["The fallback uses transformers."],
                             "max_tokens": 6}))
            _check_generation(out, 6)
            err = _error_text(await session.call_tool("generate", {"prompt": "x", "model": "missing"}))
            assert "does not exist" in err
