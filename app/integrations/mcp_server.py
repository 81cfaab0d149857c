"""MCP server (`python -m app mcp`): the cluster as a tool for any MCP client or agent.

Built on the official `mcp` SDK (2.x, `MCPServer`, formerly FastMCP), served over
stdio or streamable HTTP (127.0.0.1 by default). Tools:

- `generate`: a prompt or chat messages, optional retrieved `context` documents,
  model, max_tokens, temperature, stop -> text, finish_reason, usage, model, engine. With `response_schema`
  (a JSON schema) the answer is constrained to JSON matching it (`response_format: json_schema`) and comes back
  parsed as `data` too.
- `list_models`: the models the cluster serves, with the engine each one runs on.

Every failure (cluster unreachable, unknown model, bad arguments, cluster errors)
comes back as a tool result with `isError: true` and a message the agent can read;
the server process itself keeps running.
"""

from __future__ import annotations

import ipaddress
import json
import logging
from typing import Annotated, Any, Literal

import anyio
from mcp.server.mcpserver import MCPServer
from mcp.server.mcpserver.exceptions import ToolError
from mcp.types import ToolAnnotations
from pydantic import BaseModel, Field

from app.client.wire import ClientError, ClusterClient
from app.integrations.prompts import build_messages
from app.integrations.settings import ClusterSettings

log = logging.getLogger(__name__)

SERVER_NAME = "llm-cluster"
INSTRUCTIONS = (
    "Generates text with the self-hosted LLM cluster (OpenAI-compatible API). For retrieval-augmented "
    "answers pass the retrieved passages as `context` and the user's question as `prompt`. Call "
    "`list_models` to see which models (and engines) are available."
)


class Message(BaseModel):
    role: Literal["system", "user", "assistant"]
    content: str


class Usage(BaseModel):
    prompt_tokens: int = 0
    completion_tokens: int = 0
    total_tokens: int = 0


class GenerateResult(BaseModel):
    text: str = Field(description="The generated text.")
    finish_reason: str | None = Field(default=None, description="'stop' or 'length'.")
    model: str = Field(description="Model that answered.")
    engine: str | None = Field(default=None, description="Engine serving the model (vllm, transformers, ...).")
    usage: Usage
    data: Any = Field(default=None, description="The answer parsed as JSON, when `response_schema` was given.")


class ModelInfo(BaseModel):
    id: str
    engine: str | None = None
    ready: bool | None = None
    max_model_len: int | None = None


class ModelsResult(BaseModel):
    base_url: str = Field(description="Cluster API the models were listed from.")
    models: list[ModelInfo]


def create_server(settings: ClusterSettings | None = None, client: ClusterClient | None = None) -> MCPServer:
    """An MCP server whose tools call the cluster through `client` (one shared HTTP connection pool)."""
    settings = settings or ClusterSettings()
    cluster = client or settings.client()
    server = MCPServer(SERVER_NAME, instructions=INSTRUCTIONS, log_level="WARNING")

    @server.tool(
        title="Generate with the LLM cluster",
        annotations=ToolAnnotations(read_only_hint=True, open_world_hint=False, idempotent_hint=False),
    )
    async def generate(
        prompt: Annotated[str | None, Field(description="The user prompt or question. Give this or `messages`.")]
        = None,
        messages: Annotated[
            list[Message] | None, Field(description="A chat conversation instead of `prompt`.")
        ] = None,
        context: Annotated[
            list[str] | None,
            Field(description="Retrieved documents to ground the answer; they are put into a system message."),
        ] = None,
        model: Annotated[str | None, Field(description="Model id (see list_models); default: the first.")] = None,
        max_tokens: Annotated[int, Field(ge=1, le=32768, description="Most tokens to generate.")] = 256,
        temperature: Annotated[float, Field(ge=0.0, le=2.0, description="Sampling temperature.")] = 0.7,
        stop: Annotated[list[str] | None, Field(max_length=8, description="Stop sequences.")] = None,
        response_schema: Annotated[
            dict[str, Any] | None,
            Field(description="A JSON schema: the answer is JSON matching it (structured output), parsed into "
                              "`data`."),
        ] = None,
    ) -> GenerateResult:
        """Generate text with the cluster's LLM, optionally grounded in retrieved context documents."""
        try:
            chat_messages = build_messages(
                prompt=prompt,
                messages=[m.model_dump() for m in messages] if messages is not None else None,
                context=context,
            )
        except ValueError as exc:
            raise ToolError(f"invalid arguments: {exc}") from None
        if stop is not None and any(s == "" for s in stop):
            raise ToolError("invalid arguments: stop sequences must not be empty")
        try:
            model_id = await cluster.resolve_model(model, settings.model)
            extra = None
            if response_schema is not None:
                extra = {"response_format": {"type": "json_schema", "json_schema": {
                    "name": "response", "schema": response_schema, "strict": True}}}
            data = await cluster.chat(chat_messages, model=model_id, max_tokens=max_tokens,
                                      temperature=temperature, stop=stop, extra=extra)
        except ClientError as exc:
            raise ToolError(exc.message) from None
        choice = data["choices"][0]
        text = str((choice.get("message") or {}).get("content") or "")
        parsed = None
        if response_schema is not None:
            try:
                parsed = json.loads(text)
            except ValueError:
                raise ToolError(f"the structured answer is not complete JSON (finish_reason "
                                f"{choice.get('finish_reason')!r}): raise max_tokens") from None
        answered = str(data.get("model") or model_id)
        try:
            engine = await cluster.engine_of(answered)
        except ClientError:
            engine = None  # the answer is more useful than a missing label
        return GenerateResult(
            text=text,
            data=parsed,
            finish_reason=choice.get("finish_reason"),
            model=answered,
            engine=engine,
            usage=Usage(**{k: int(v) for k, v in (data.get("usage") or {}).items() if k in Usage.model_fields}),
        )

    @server.tool(
        title="List the cluster's models",
        annotations=ToolAnnotations(read_only_hint=True, open_world_hint=False, idempotent_hint=True),
    )
    async def list_models() -> ModelsResult:
        """List the models the cluster serves, with the engine each runs on and whether it is ready."""
        try:
            cards = await cluster.list_models(refresh=True)
        except ClientError as exc:
            raise ToolError(exc.message) from None
        return ModelsResult(
            base_url=cluster.base_url,
            models=[ModelInfo(**{k: v for k, v in c.items() if k in ModelInfo.model_fields}) for c in cards],
        )

    return server


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


async def serve(
    transport: Literal["stdio", "http"] = "stdio",
    *,
    host: str = "127.0.0.1",
    port: int = 8003,
    path: str = "/mcp",
    settings: ClusterSettings | None = None,
) -> None:
    """Run the MCP server until stdin closes (stdio) or the process is signalled (http)."""
    settings = settings or ClusterSettings()
    async with settings.client() as client:
        server = create_server(settings, client)
        if transport == "stdio":
            await server.run_stdio_async()
            return
        if not _is_loopback(host):
            log.warning("MCP over HTTP bound to %s: it has no authentication, keep it on a private network", host)
        log.info("MCP streamable HTTP on http://%s:%d%s -> cluster %s", host, port, path, settings.base_url)
        await server.run_streamable_http_async(host=host, port=port, streamable_http_path=path)


def run(transport: Literal["stdio", "http"] = "stdio", **kwargs: Any) -> None:
    anyio.run(lambda: serve(transport, **kwargs))
