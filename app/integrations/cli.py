"""`python -m app mcp`: the cluster as an MCP tool server (stdio or streamable HTTP).

Registered into the main CLI by `register(cli)`; the `mcp` SDK is imported only
when the command runs, so `python -m app --help` works without it.
"""

from __future__ import annotations

from enum import StrEnum
from typing import Annotated

import typer


class Transport(StrEnum):
    stdio = "stdio"
    http = "http"


def mcp_command(
    transport: Annotated[Transport, typer.Option(help="stdio (spawned by the client) or http (streamable HTTP).")]
    = Transport.stdio,
    host: Annotated[str, typer.Option(envvar="MCP_HOST", help="HTTP bind address.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(envvar="MCP_PORT", min=1, max=65535, help="HTTP port.")] = 8003,
    path: Annotated[str, typer.Option(help="HTTP endpoint path.")] = "/mcp",
    base_url: Annotated[
        str | None, typer.Option(help="Cluster OpenAI base URL (default: CLUSTER_BASE_URL or nginx on :8080).")
    ] = None,
    log_level: Annotated[str, typer.Option(help="Log level (logs go to stderr).")] = "warning",
) -> None:
    """Serve the cluster as MCP tools `generate` and `list_models` (stdio or streamable HTTP)."""
    from pydantic import ValidationError

    from app.console import fail, setup_logging

    try:
        from app.integrations import mcp_server
    except ImportError as exc:
        raise fail(f"the MCP server needs the 'mcp' extra ({exc}); pip install 'llm-serving-kit[mcp]'") from None
    from app.integrations.settings import ClusterSettings

    setup_logging(log_level)
    try:
        settings = ClusterSettings(base_url=base_url) if base_url else ClusterSettings()
    except ValidationError as exc:
        err = exc.errors()[0]
        raise fail(f"CLUSTER_{'.'.join(str(p) for p in err['loc']).upper()}: {err['msg']}") from None
    try:
        mcp_server.run(transport.value, host=host, port=port, path=path, settings=settings)
    except KeyboardInterrupt:
        pass


def register(cli: typer.Typer) -> None:
    cli.command("mcp")(mcp_command)
