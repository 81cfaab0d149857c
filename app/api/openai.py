"""OpenAI serving logic: protocol requests in, engine chunks through, JSON or SSE out.

This is the only place that knows the wire format of completions. It fans out
`n` choices (and multi-prompt completions) as parallel engine requests, primes
streams so that admission errors (429, 400, 503) become real HTTP statuses,
records metrics, and cancels generation when the client goes away. A stream silent for
`sse_keepalive_s` gets a `: keep-alive` comment (proxies' read timeouts see bytes while a token is slow).
When the server's shutdown grace ends (`app.state.stream_cut`), requests still running end as
server-side cuts: a stream with an SSE error event `server_shutting_down` and `[DONE]`, a request not yet
answered with a 503 and Retry-After (counted as 503, never as a 499 client disconnect). The engines' `served_by` (first
chunk of each stream) goes back to the client as the `X-Served-By` response header, JSON and SSE alike
(several distinct values, from a fan-out over replicas, are joined with ", ").
The async plumbing (fan-in, pacing, disconnects, cuts) is `app.api.streaming`; what a request records (metrics,
access log, `X-Served-By`) is `app.api.observation`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncGenerator, AsyncIterator, Callable
from dataclasses import dataclass, field, replace
from typing import Any, Literal, TypeVar

import anyio
from fastapi import Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

from app.api.access import request_id_of
from app.api.backend import ModelBackend
from app.api.errors import engine_error_response, error_payload
from app.api.logprobs import ChatChoiceLogprobs, CompletionLogprobs, CompletionLogprobsBuilder, chat_logprobs
from app.api.observation import RequestObservation
from app.api.protocol import (
    ChatChoice,
    ChatChunkChoice,
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChatCompletionResponse,
    ChatDelta,
    ChatResponseMessage,
    CompletionChoice,
    CompletionRequest,
    CompletionResponse,
    Usage,
    new_id,
)
from app.api.streaming import SSE_HEADERS, cut_event, primed_fan_in, sse, until_disconnect
from app.api.tool_parsers import ToolCallParser, get_parser
from app.api.tools import (
    check_tool_messages,
    finish_reason,
    messages_for_template,
    tool_grammar,
    tools_for_template,
)
from app.engines.base import (
    EngineError,
    EngineInfo,
    GenerationChunk,
    GenerationRequest,
    InvalidRequestError,
    ModelNotFoundError,
    Priority,
    TokenLogprob,
)
from app.metrics import MetricsSink
from app.tenants.gate import tenancy_of, tenant_of

log = logging.getLogger(__name__)

T = TypeVar("T")

# a nucleus this small holds only the most likely token: that is greedy decoding, said exactly (engines
# compare top_p in float32, where 5e-324 is 0 and the nucleus would be empty)
_NUCLEUS_EPS = 1e-6


def priority_of(service_tier: str | None, key_priority: str) -> Priority:
    """The engines' admission class: a batch-priority key is always `batch` (a request cannot promote itself
    with `service_tier`); an interactive key's request is `batch` when it asks for `service_tier: "flex"`."""
    return "batch" if key_priority == "batch" or service_tier == "flex" else "interactive"


def _sampling(req: ChatCompletionRequest | CompletionRequest, key_priority: str = "interactive") -> GenerationRequest:
    top_p = 1.0 if req.top_p is None else req.top_p
    temperature = 1.0 if req.temperature is None else req.temperature
    if top_p < _NUCLEUS_EPS:
        top_p, temperature = 1.0, 0.0
    return GenerationRequest(
        max_tokens=req.token_limit,
        temperature=temperature,
        top_p=top_p,
        stop=req.stop_list,
        seed=req.seed,
        presence_penalty=req.presence_penalty,
        frequency_penalty=req.frequency_penalty,
        min_tokens=req.min_tokens,
        ignore_eos=req.ignore_eos,
        logprobs=req.logprobs_k,
        priority=priority_of(req.service_tier, key_priority),
    )


def not_allowed(backend: ModelBackend, allows: Callable[[str], bool], model: str) -> ModelNotFoundError:
    """The 404 of a model outside a key's allowance: worded as for an unknown model, listing only allowed ones."""
    available = ", ".join(m for m in backend.model_ids() if allows(m)) or "none"
    return ModelNotFoundError(f"model {model!r} does not exist; available models: {available}")


def _fan_out(base: GenerationRequest, n: int, offset: int = 0) -> list[tuple[int, GenerationRequest]]:
    out = []
    for i in range(n):
        seed = None if base.seed is None else base.seed + i
        out.append((offset + i, replace(base, seed=seed, request_id=new_id("gen"))))
    return out


class OpenAIServing:
    def __init__(self, backend: ModelBackend, sink: MetricsSink):
        self.backend = backend
        self.sink = sink

    # --------------------------------------------------------------------- shared
    async def _run(
        self,
        request: Request,
        endpoint: str,
        model: str,
        items: list[tuple[int, GenerationRequest]],
        req: ChatCompletionRequest | CompletionRequest,
        info: EngineInfo,
        stream_chunks: Callable[[int, GenerationChunk, bool], list[dict[str, Any]]],
        usage_chunk: Callable[[Usage], dict[str, Any]],
        render_full: Callable[[dict[int, _Collected], Usage], dict[str, Any]],
    ) -> Response:
        n = req.n
        obs = RequestObservation(self.sink, model=model, engine=info.engine, endpoint=endpoint,
                                 request_id=request_id_of(request.scope), tenancy=tenancy_of(request.scope))
        try:
            if info.max_parallel and len(items) > info.max_parallel:
                # a 429 here would never clear: the request alone overflows the engine's slots and queue
                raise InvalidRequestError(
                    f"this request needs {len(items)} parallel generations (n times the number of prompts) but "
                    f"model {model!r} admits at most {info.max_parallel} at once; lower n or split the prompts "
                    "over several requests",
                    param="n",
                )
            if req.stream:
                # (a request waiting for a slot leaves the queue when its client goes away)
                streams = {idx: self.backend.generate(model, greq) for idx, greq in items}
                paced = await until_disconnect(request, primed_fan_in(
                    streams, obs.note_served_by, cut_event(request), request.app.state.sse_keepalive_s))
                if paced is None:
                    obs.finish(499, "client_disconnected")
                    return Response(status_code=499)
                return StreamingResponse(
                    self._stream_body(paced, obs, stream_chunks, usage_chunk if req.include_usage else None, n),
                    media_type="text/event-stream", headers={**SSE_HEADERS, **obs.headers}
                )
            result = await until_disconnect(request, self._collect(model, items, obs, n))
            if result is None:
                obs.finish(499, "client_disconnected")
                return Response(status_code=499)
            collected, usage = result
            obs.finish(200)
            return JSONResponse(render_full(collected, usage), headers=obs.headers)
        except EngineError as exc:
            obs.finish(exc.status_code, exc.error_type)
            return engine_error_response(exc)

    async def _collect(
        self, model: str, items: list[tuple[int, GenerationRequest]], obs: RequestObservation, n: int
    ) -> tuple[dict[int, _Collected], Usage]:
        collected = {i: _Collected() for i, _ in items}
        prompt: dict[int, int] = {}
        completion: dict[int, int] = {}

        async def one(idx: int, greq: GenerationRequest) -> None:
            async with contextlib.aclosing(self.backend.generate(model, greq)) as chunks:
                async for chunk in chunks:
                    obs.token()
                    obs.note_served_by(chunk)
                    collected[idx].add(chunk)
                    prompt[idx] = chunk.prompt_tokens
                    completion[idx] = chunk.completion_tokens
                    if obs.tenancy is not None and obs.tenancy.meters_tokens:
                        obs.progress(*_totals(prompt, completion, n))

        try:
            async with asyncio.TaskGroup() as tg:
                for idx, greq in items:
                    tg.create_task(one(idx, greq))
        except BaseExceptionGroup as group:  # surface the engine's error (429/400/503), not the group
            errors: list[BaseException] = [e for e in group.exceptions if isinstance(e, EngineError)]
            raise (errors or list(group.exceptions))[0] from None
        usage = _usage(prompt, completion, n)
        obs.prompt_tokens, obs.output_tokens = usage.prompt_tokens, usage.completion_tokens
        return collected, usage

    async def _stream_body(
        self,
        paced: AsyncGenerator[tuple[int, GenerationChunk] | None, None],
        obs: RequestObservation,
        stream_chunks: Callable[[int, GenerationChunk, bool], list[dict[str, Any]]],
        usage_chunk: Callable[[Usage], dict[str, Any]] | None,
        n: int,
    ) -> AsyncIterator[str]:
        prompt: dict[int, int] = {}
        completion: dict[int, int] = {}
        started: set[int] = set()
        status, err_type = 200, None
        try:
            async for item in paced:
                if item is None:
                    yield ": keep-alive\n\n"
                    continue
                idx, chunk = item
                obs.token()
                prompt[idx], completion[idx] = chunk.prompt_tokens, chunk.completion_tokens
                if obs.tenancy is not None and obs.tenancy.meters_tokens:
                    obs.progress(*_totals(prompt, completion, n))
                first = idx not in started
                started.add(idx)
                for obj in stream_chunks(idx, chunk, first):
                    yield sse(obj)
            usage = _usage(prompt, completion, n)
            obs.prompt_tokens, obs.output_tokens = usage.prompt_tokens, usage.completion_tokens
            if usage_chunk is not None:
                yield sse(usage_chunk(usage))
            yield "data: [DONE]\n\n"
        except EngineError as exc:
            status, err_type = exc.status_code, exc.error_type
            yield sse(error_payload(exc.message, exc.status_code, err_type=exc.error_type, code=exc.code))
            yield "data: [DONE]\n\n"
        except (asyncio.CancelledError, GeneratorExit):
            status, err_type = 499, "client_disconnected"
            raise
        except Exception:
            log.exception("stream failed")
            status, err_type = 500, "server_error"
            yield sse(error_payload("internal server error", 500, code="internal_error"))
            yield "data: [DONE]\n\n"
        finally:
            # starlette cancels this body's task scope when the client goes: the closing awaits run shielded,
            # or the scope's repeated cancellation would skip them (and the request's metrics below)
            with anyio.CancelScope(shield=True):
                await paced.aclose()
            if not obs.output_tokens:
                partial = _usage(prompt, completion, n)
                obs.prompt_tokens, obs.output_tokens = partial.prompt_tokens, partial.completion_tokens
            obs.finish(status, err_type)

    # --------------------------------------------------------------------- chat
    def _allowed(self, request: Request, model: str) -> str:
        """The key's priority; a model outside the key's allowance is a 404, as if it did not exist."""
        tenant = tenant_of(request.scope)
        if tenant is None:
            return "interactive"
        if not tenant.allows(model):
            raise not_allowed(self.backend, tenant.allows, model)
        return tenant.entry.priority

    async def chat(self, req: ChatCompletionRequest, request: Request) -> Response:
        key_priority = self._allowed(request, req.model)
        info = await self.backend.engine_info(req.model)  # 404 for unknown models
        messages = [m.for_template() for m in req.messages]
        check_tool_messages(messages)
        plan = req.tool_plan()
        parser = get_parser(info.tool_call_parser) if plan is not None and plan.parses_calls else None
        base = _sampling(req, key_priority)
        base.messages = messages_for_template(messages)
        if plan is not None:
            base.tools = tools_for_template(plan.tools)
        if plan is not None and parser is not None:
            if req.response_format is not None and req.response_format.type != "text":
                raise InvalidRequestError("response_format: a JSON response format cannot be combined with tool "
                                          "calls; set tool_choice to none or drop response_format",
                                          param="response_format")
            base.grammar = await asyncio.to_thread(tool_grammar, plan, parser)  # xgrammar: off the loop
        elif req.response_format is not None and req.response_format.type != "text":
            # xgrammar builds it (the first one imports the library): off the event loop, like tokenization
            base.grammar = await asyncio.to_thread(req.response_grammar)
        items = _fan_out(base, req.n)
        rid, created = new_id("chatcmpl"), int(time.time())
        top_k = req.logprobs_k
        choices: dict[int, _ChatChoiceStream] = {}

        head = ChatCompletionChunk(id=rid, created=created, model=req.model, choices=[]).model_dump(exclude_none=True)

        def stream_chunks(idx: int, chunk: GenerationChunk, first: bool) -> list[dict[str, Any]]:
            state = choices.setdefault(idx, _ChatChoiceStream(parser, top_k))
            out = []
            if parser is None and top_k is None:  # plain text deltas: no model per token
                if chunk.text or first or chunk.logprobs:
                    out.append(chat_frame(head, idx, chunk.text, first))
            else:
                for delta, logprobs in state.deltas(chunk, first):
                    out.append(_chat_chunk(rid, created, req.model, ChatChunkChoice(index=idx, delta=delta,
                                                                                     logprobs=logprobs)))
            if chunk.finish_reason:
                out.append(chat_finish_frame(head, idx, finish_reason(chunk.finish_reason, state.called)))
            return out

        def usage_chunk(usage: Usage) -> dict[str, Any]:
            return ChatCompletionChunk(
                id=rid, created=created, model=req.model, choices=[], usage=usage
            ).model_dump(exclude_none=True)

        def full(collected: dict[int, _Collected], usage: Usage) -> dict[str, Any]:
            out = []
            for i in sorted(collected):
                c = collected[i]
                message = ChatResponseMessage(content=c.text)
                reason = c.reason
                if parser is not None:
                    parsed = parser.parse(c.text)
                    message = ChatResponseMessage(content=parsed.content, tool_calls=parsed.tool_calls or None)
                    reason = finish_reason(c.reason, bool(parsed.tool_calls))
                logprobs = chat_logprobs(c.logprobs, top_k) if top_k is not None else None
                out.append(ChatChoice(index=i, message=message, finish_reason=reason, logprobs=logprobs))
            return ChatCompletionResponse(
                id=rid, created=created, model=req.model, choices=out, usage=usage
            ).model_dump()

        return await self._run(request, "chat", req.model, items, req, info, stream_chunks, usage_chunk, full)

    # --------------------------------------------------------------------- completions
    async def completion(self, req: CompletionRequest, request: Request) -> Response:
        key_priority = self._allowed(request, req.model)
        info = await self.backend.engine_info(req.model)  # 404 for unknown models
        items: list[tuple[int, GenerationRequest]] = []
        for p_idx, prompt in enumerate(req.prompts):
            base = _sampling(req, key_priority)
            base.prompt = prompt
            items += _fan_out(base, req.n, offset=p_idx * req.n)
        rid, created = new_id("cmpl"), int(time.time())
        top_k = req.logprobs_k
        builders: dict[int, CompletionLogprobsBuilder] = {}

        def logprobs_of(idx: int, entries: list[TokenLogprob]) -> CompletionLogprobs | None:
            if top_k is None:
                return None
            return builders.setdefault(idx, CompletionLogprobsBuilder(top_k)).build(entries)

        head = CompletionResponse(id=rid, created=created, model=req.model, choices=[]).model_dump(exclude={"usage"})

        def stream_chunks(idx: int, chunk: GenerationChunk, first: bool) -> list[dict[str, Any]]:
            out = []
            if (chunk.text or first or chunk.logprobs) and top_k is not None:  # logprobs: through the models
                out.append(CompletionResponse(
                    id=rid, created=created, model=req.model,
                    choices=[CompletionChoice(index=idx, text=chunk.text, finish_reason=None,
                                              logprobs=logprobs_of(idx, chunk.logprobs or []))],
                ).model_dump(exclude={"usage"}))
            elif chunk.text or first or chunk.logprobs:
                out.append(completion_frame(head, idx, chunk.text, None))
            if chunk.finish_reason:
                out.append(completion_frame(head, idx, "", chunk.finish_reason))
            return out

        def usage_chunk(usage: Usage) -> dict[str, Any]:
            return CompletionResponse(id=rid, created=created, model=req.model, choices=[], usage=usage).model_dump()

        def full(collected: dict[int, _Collected], usage: Usage) -> dict[str, Any]:
            choices = [CompletionChoice(index=i, text=c.text, finish_reason=c.reason,
                                        logprobs=logprobs_of(i, c.logprobs)) for i, c in sorted(collected.items())]
            return CompletionResponse(
                id=rid, created=created, model=req.model, choices=choices, usage=usage
            ).model_dump()

        return await self._run(request, "completions", req.model, items, req, info, stream_chunks, usage_chunk,
                               full)


@dataclass
class _Collected:
    """One choice of a non-streaming answer: its text, finish reason and logprob entries."""

    parts: list[str] = field(default_factory=list)
    reason: str | None = None
    logprobs: list[TokenLogprob] = field(default_factory=list)

    @property
    def text(self) -> str:
        return "".join(self.parts)

    def add(self, chunk: GenerationChunk) -> None:
        self.parts.append(chunk.text)
        self.logprobs.extend(chunk.logprobs or [])
        if chunk.finish_reason:
            self.reason = chunk.finish_reason


class _ChatChoiceStream:
    """One streamed chat choice: engine chunks in, (delta, logprobs) pairs out; tool calls parsed on the fly."""

    def __init__(self, parser: ToolCallParser | None, top_k: int | None):
        self.stream = parser.stream() if parser is not None else None
        self.top_k = top_k

    @property
    def called(self) -> bool:
        return self.stream is not None and self.stream.called_tools

    def deltas(self, chunk: GenerationChunk, first: bool) -> list[tuple[ChatDelta, ChatChoiceLogprobs | None]]:
        logprobs = chat_logprobs(chunk.logprobs or [], self.top_k) if self.top_k is not None else None
        role: Literal["assistant"] | None = "assistant" if first else None
        if self.stream is None:
            if chunk.text or first or chunk.logprobs:
                return [(ChatDelta(role=role, content=chunk.text), logprobs)]
            return []
        parsed = self.stream.feed(chunk.text)
        if chunk.finish_reason:
            parsed.extend(self.stream.finish())
        if parsed or first or chunk.logprobs:
            # content "" only on the role chunk, as OpenAI sends it; tool-call chunks carry content null
            content = parsed.content if parsed.content else ("" if first and not parsed.tool_calls else None)
            return [(ChatDelta(role=role, content=content, tool_calls=parsed.tool_calls or None), logprobs)]
        return []


# Per-token stream payloads as plain dicts on a head the models dumped once per response (`head`: the chunk with
# no choices). Building and dumping the pydantic models per token cost 20-30 µs of the API process's CPU per
# token; these give the same dicts, key order included (tests/unit/api/test_stream_frames.py holds them to it).
def completion_frame(head: dict[str, Any], idx: int, text: str, finish: str | None) -> dict[str, Any]:
    """`CompletionResponse(choices=[CompletionChoice(index, text, finish_reason)]).model_dump(exclude={"usage"})`."""
    return {**head, "choices": [{"index": idx, "text": text, "finish_reason": finish, "logprobs": None}]}


def chat_frame(head: dict[str, Any], idx: int, text: str, first: bool) -> dict[str, Any]:
    """A plain content delta (the role on the first): `_chat_chunk` of `ChatDelta(role, content)`."""
    delta = {"role": "assistant", "content": text} if first else {"content": text}
    return {**head, "choices": [{"index": idx, "delta": delta}]}


def chat_finish_frame(head: dict[str, Any], idx: int, reason: str | None) -> dict[str, Any]:
    """`_chat_chunk` of `ChatChunkChoice(index, delta=ChatDelta(), finish_reason=reason)`."""
    choice: dict[str, Any] = {"index": idx, "delta": {}}
    if reason is not None:
        choice["finish_reason"] = reason
    return {**head, "choices": [choice]}


def _chat_chunk(rid: str, created: int, model: str, choice: ChatChunkChoice) -> dict[str, Any]:
    return ChatCompletionChunk(id=rid, created=created, model=model, choices=[choice]).model_dump(exclude_none=True)


def _totals(prompt: dict[int, int], completion: dict[int, int], n: int) -> tuple[int, int]:
    # the n choices fanned out from one prompt share it: count each distinct prompt once
    return sum(v for i, v in prompt.items() if i % n == 0), sum(completion.values())


def _usage(prompt: dict[int, int], completion: dict[int, int], n: int) -> Usage:
    p, c = _totals(prompt, completion, n)
    return Usage(prompt_tokens=p, completion_tokens=c, total_tokens=p + c)
