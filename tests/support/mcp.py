"""The MCP server under test over stdio (the official SDK's client session), and readers of its tool results."""

from __future__ import annotations

import json
import os
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any, TextIO

from tests.support.env import ROOT

try:
    from mcp import ClientSession, StdioServerParameters, stdio_client

    HAVE_MCP = True
except ImportError:  # pragma: no cover - the `mcp` extra is installed by tests/run.sh
    HAVE_MCP = False

TIMEOUT = 120.0


def mcp_env(base_url: str, **extra: str) -> dict[str, str]:
    env = {k: os.environ[k] for k in ("PATH", "HOME", "HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE") if k in os.environ}
    return {**env, "CLUSTER_BASE_URL": base_url, "PYTHONUNBUFFERED": "1", **extra}


@asynccontextmanager
async def stdio_session(env: dict[str, str], errlog: TextIO) -> AsyncIterator[ClientSession]:
    params = StdioServerParameters(command=sys.executable, args=["-m", "app", "mcp"], env=env, cwd=str(ROOT))
    async with stdio_client(params, errlog=errlog) as (read, write):
        async with ClientSession(read, write, read_timeout_seconds=TIMEOUT) as session:
            await session.initialize()
            yield session


def payload(result: Any) -> dict[str, Any]:
    assert not result.is_error, result.content
    if result.structured_content is not None:
        return result.structured_content
    return json.loads(result.content[0].text)


def error_text(result: Any) -> str:
    assert result.is_error, f"expected a tool error, got {result}"
    return " ".join(getattr(c, "text", "") for c in result.content)
