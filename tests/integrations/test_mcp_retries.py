"""Retries of the MCP `generate` tool on 429/502/503, honouring Retry-After.

A scripted stand-in for the cluster (stdlib HTTP server on 127.0.0.1) answers with
the statuses an overloaded or failing-over cluster sends; the MCP server under test
runs for real (`python -m app mcp` over stdio, driven by the SDK's ClientSession).
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, TextIO

import pytest

from tests.support.env import need
from tests.support.mcp import HAVE_MCP, error_text, mcp_env, payload, stdio_session


class ScriptedCluster:
    """Answers GET /v1/models with one `vllm` model and POST /v1/chat/completions from a script."""

    def __init__(self) -> None:
        self.script: list[tuple[int, dict[str, str]]] = []  # (status, headers) per chat request, then 200s
        self.chat_times: list[float] = []
        self._lock = threading.Lock()
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: Any) -> None:
                pass

            def _send(self, status: int, body: dict[str, Any], headers: dict[str, str] | None = None) -> None:
                data = json.dumps(body).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                for k, v in (headers or {}).items():
                    self.send_header(k, v)
                self.end_headers()
                self.wfile.write(data)

            def do_GET(self) -> None:
                self._send(200, {"object": "list", "data": [{"id": "big", "engine": "vllm", "ready": True}]})

            def do_POST(self) -> None:
                request = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                with outer._lock:
                    outer.chat_times.append(time.monotonic())
                    status, headers = outer.script.pop(0) if outer.script else (200, {})
                if status != 200:
                    self._send(status, {"error": {"message": f"scripted {status}", "type": "x", "code": None}},
                               headers)
                    return
                self._send(200, {
                    "id": "c1", "object": "chat.completion", "model": request["model"],
                    "choices": [{"index": 0, "message": {"role": "assistant", "content": "ok"},
                                 "finish_reason": "stop"}],
                    "usage": {"prompt_tokens": 5, "completion_tokens": 1, "total_tokens": 6},
                })

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.base_url = f"http://127.0.0.1:{self.server.server_address[1]}/v1"

    def reset(self, *script: tuple[int, dict[str, str]]) -> None:
        with self._lock:
            self.script = list(script)
            self.chat_times = []


@pytest.fixture(scope="module")
def scripted() -> Iterator[ScriptedCluster]:
    cluster = ScriptedCluster()
    thread = threading.Thread(target=cluster.server.serve_forever, daemon=True)
    thread.start()
    try:
        yield cluster
    finally:
        cluster.server.shutdown()
        cluster.server.server_close()
        thread.join(10)


@pytest.fixture
def mcp_log(tmp_path: Path) -> Iterator[TextIO]:
    with open(tmp_path / "mcp.log", "w") as f:
        yield f


async def test_retries_honour_retry_after(scripted: ScriptedCluster, mcp_log: TextIO) -> None:
    need(HAVE_MCP, "needs the `mcp` extra")
    env = mcp_env(scripted.base_url, CLUSTER_MAX_ATTEMPTS="3", CLUSTER_MAX_RETRY_WAIT_S="5")
    async with stdio_session(env, mcp_log) as session:
        # 429 with Retry-After: 1 -> the retry waits at least that long, then succeeds
        scripted.reset((429, {"Retry-After": "1"}))
        out = payload(await session.call_tool("generate", {"prompt": "hi"}))
        assert out["text"] == "ok" and out["model"] == "big" and out["engine"] == "vllm"
        assert len(scripted.chat_times) == 2
        assert scripted.chat_times[1] - scripted.chat_times[0] >= 0.95

        # 502 then 503 (nginx/Ray failing over) -> third try succeeds
        scripted.reset((502, {}), (503, {"Retry-After": "0"}))
        assert payload(await session.call_tool("generate", {"prompt": "hi"}))["text"] == "ok"
        assert len(scripted.chat_times) == 3

        # still 503 after the last try -> a readable tool error, after exactly max_attempts requests
        scripted.reset(*[(503, {"Retry-After": "0"})] * 5)
        text = error_text(await session.call_tool("generate", {"prompt": "hi"}))
        assert "503" in text and "scripted 503" in text
        assert len(scripted.chat_times) == 3

        # other errors are not retried
        scripted.reset((400, {}))
        assert "400" in error_text(await session.call_tool("generate", {"prompt": "hi"}))
        assert len(scripted.chat_times) == 1
