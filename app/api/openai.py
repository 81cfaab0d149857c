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
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field, replace
from typing import Any, Literal, TypeVar

import anyio
from fastapi import Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

from app import metrics
from app.api.access import log_request, request_id_of
from app.api.backend import ModelBackend
from app.api.errors import engine_error_response, error_payload
from app.api.logprobs import ChatChoiceLogprobs, CompletionLogprobs, CompletionLogprobsBuilder, chat_logprobs
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
    EngineNotReadyError,
    GenerationChunk,
    GenerationRequest,
    InvalidRequestError,
    TokenLogprob,
)
from app.jsonline import dumps_line
from app.metrics import MetricsSink

log = logging.getLogger(__name__)

T = TypeVar("T")

SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no", "Connection": "keep-alive"}


@dataclass
class _Observation:
    """Per-request metrics bookkeeping."""

    sink: MetricsSink
    model: str
    engine: str
    endpoint: str
    request_id: str = "-"
    start: float = field(default_factory=time.monotonic)
    first_token_at: float | None = None
    output_tokens: int = 0
    prompt_tokens: int = 0
    served_by: list[str] = field(default_factory=list)

    def note_served_by(self, chunk: GenerationChunk) -> None:
        if chunk.served_by and chunk.served_by not in self.served_by:
            self.served_by.append(chunk.served_by)

    @property
    def headers(self) -> dict[str, str]:
        return {"X-Served-By": ", ".join(self.served_by)} if self.served_by else {}

    @property
    def labels(self) -> dict[str, str]:
        return {"model": self.model, "engine": self.engine, "endpoint": self.endpoint}

    def token(self) -> None:
        if self.first_token_at is None:
            self.first_token_at = time.monotonic()
            self.sink.observe(metrics.TTFT, self.labels, self.first_token_at - self.start)

    def finish(self, status: int, error_type: str | None = None) -> None:
        labels = self.labels
        latency = time.monotonic() - self.start
        self.sink.inc(metrics.REQUESTS, {**labels, "status": str(status)})
        self.sink.observe(metrics.REQUEST_LATENCY, labels, latency)
        log_request(
            self.request_id, self.endpoint, status, model=self.model, engine=self.engine, error_type=error_type,
            prompt_tokens=self.prompt_tokens, output_tokens=self.output_tokens, latency_s=latency,
            ttft_s=None if self.first_token_at is None else self.first_token_at - self.start,
        )
        if self.output_tokens:
            self.sink.inc(metrics.OUTPUT_TOKENS, labels, self.output_tokens)
        if self.prompt_tokens:
            self.sink.inc(metrics.PROMPT_TOKENS, labels, self.prompt_tokens)
        if error_type:
            self.sink.inc(metrics.REQUEST_ERRORS, {**labels, "error_type": error_type})


# a nucleus this small holds only the most likely token: that is greedy decoding, said exactly (engines
# compare top_p in float32, where 5e-324 is 0 and the nucleus would be empty)
_NUCLEUS_EPS = 1e-6


def _sampling(req: ChatCompletionRequest | CompletionRequest) -> GenerationRequest:
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
        priority="batch" if req.service_tier == "flex" else "interactive",
    )


def _fan_out(base: GenerationRequest, n: int, offset: int = 0) -> list[tuple[int, GenerationRequest]]:
    out = []
    for i in range(n):
        seed = None if base.seed is None else base.seed + i
        out.append((offset + i, replace(base, seed=seed, request_id=new_id("gen"))))
    return out


_KEEPALIVE, _CUT = -1, -2  # pseudo choice indexes the pacing puts into the fan-in queue


async def _primed_fan_in(
    streams: dict[int, AsyncGenerator[GenerationChunk, None]],
    on_first: Callable[[GenerationChunk], None],
    cut: asyncio.Event | None = None,
    keepalive_s: float = 0.0,
) -> AsyncGenerator[tuple[int, GenerationChunk] | None, None]:
    """Start every stream at once and return when each has produced its first chunk (passed to `on_first`).

    Errors before that (429, 400, 503) are raised here, before any header is sent. The
    streams are pumped concurrently and independently of the consumer: a stream that
    waited for the others while holding its engine slot would deadlock `n` (or several
    prompts) beyond the engine's free slots. The returned iterator tags chunks with
    their choice index; closing it cancels the pumps, which closes (aborts) the streams.
    Pacing rides on the same queue, so a token costs one wake-up of the consumer: None is yielded after
    each `keepalive_s` without a chunk (0: never), and ServerShuttingDown is raised once `cut` is set.
    """
    queue: asyncio.Queue[tuple[int, GenerationChunk | BaseException | None]] = asyncio.Queue()

    async def pump(idx: int, stream: AsyncGenerator[GenerationChunk, None]) -> None:
        try:
            async for chunk in stream:
                queue.put_nowait((idx, chunk))
            queue.put_nowait((idx, None))
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # forwarded to the consumer
            queue.put_nowait((idx, exc))
        finally:
            with contextlib.suppress(Exception):
                await stream.aclose()

    tasks = [asyncio.create_task(pump(idx, stream)) for idx, stream in streams.items()]

    async def stop_all() -> None:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    buffered: list[tuple[int, GenerationChunk | None]] = []
    unstarted = set(streams)
    try:
        while unstarted:
            idx, item = await queue.get()
            if isinstance(item, BaseException):
                raise item
            if idx in unstarted and item is not None:
                on_first(item)
            unstarted.discard(idx)
            buffered.append((idx, item))
    except BaseException:
        await stop_all()
        raise

    async def rest() -> AsyncGenerator[tuple[int, GenerationChunk] | None, None]:
        loop = asyncio.get_running_loop()
        remaining = len(tasks)
        last = loop.time()
        timer: asyncio.TimerHandle | None = None

        def tick() -> None:  # one timer per keep-alive period, not one per chunk
            nonlocal timer
            silent = loop.time() - last
            if silent >= keepalive_s:
                queue.put_nowait((_KEEPALIVE, None))
            timer = loop.call_later(keepalive_s - silent % keepalive_s, tick)

        if keepalive_s > 0:
            timer = loop.call_later(keepalive_s, tick)

        def on_cut(waiter: asyncio.Future[Any]) -> None:
            if not waiter.cancelled():
                queue.put_nowait((_CUT, None))

        cut_waiter: asyncio.Future[Any] | None = None
        if cut is not None:
            cut_waiter = asyncio.ensure_future(cut.wait())
            cut_waiter.add_done_callback(on_cut)
        try:
            for idx, first in buffered:
                if first is None:
                    remaining -= 1
                else:
                    yield idx, first
            while remaining:
                idx, item = await queue.get()
                if idx == _KEEPALIVE:
                    yield None
                    continue
                if idx == _CUT:
                    raise ServerShuttingDown()
                last = loop.time()
                if item is None:
                    remaining -= 1
                elif isinstance(item, BaseException):
                    raise item
                else:
                    yield idx, item
        finally:
            if timer is not None:
                timer.cancel()
            if cut_waiter is not None:
                cut_waiter.cancel()
            await stop_all()

    return rest()


class ServerShuttingDown(EngineNotReadyError):
    """The shutdown grace ended while this request ran: a server-side cut, retryable elsewhere."""

    code = "server_shutting_down"
    error_type = "server_shutting_down"

    def __init__(self) -> None:
        super().__init__("the server is shutting down; retry the request", retry_after=1)


def _cut_event(request: Request) -> asyncio.Event:
    event: asyncio.Event = request.app.state.stream_cut
    return event


async def _until_disconnect(request: Request, work: Awaitable[T]) -> T | None:
    """Run `work`, cancelling it if the client disconnects first (returns None then) or the shutdown grace
    ends first (raises ServerShuttingDown)."""
    task = asyncio.ensure_future(work)
    cut = asyncio.ensure_future(_cut_event(request).wait())

    async def listen() -> None:
        while True:
            message = await request.receive()
            if message["type"] == "http.disconnect":
                return

    listener = asyncio.create_task(listen())
    try:
        done, _ = await asyncio.wait({task, listener, cut}, return_when=asyncio.FIRST_COMPLETED)
        if task in done:
            return task.result()
        task.cancel()
        with contextlib.suppress(BaseException):
            await task
        if cut in done:
            raise ServerShuttingDown()
        return None
    finally:
        listener.cancel()
        cut.cancel()
        if not task.done():
            task.cancel()


def _sse(obj: dict[str, Any]) -> str:
    return f"data: {dumps_line(obj, compact=True)}\n\n"


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
        obs = _Observation(self.sink, model=model, engine=info.engine, endpoint=endpoint,
                           request_id=request_id_of(request.scope))
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
                paced = await _until_disconnect(request, _primed_fan_in(
                    streams, obs.note_served_by, _cut_event(request), request.app.state.sse_keepalive_s))
                if paced is None:
                    obs.finish(499, "client_disconnected")
                    return Response(status_code=499)
                return StreamingResponse(
                    self._stream_body(paced, obs, stream_chunks, usage_chunk if req.include_usage else None, n),
                    media_type="text/event-stream", headers={**SSE_HEADERS, **obs.headers}
                )
            result = await _until_disconnect(request, self._collect(model, items, obs, n))
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
        self, model: str, items: list[tuple[int, GenerationRequest]], obs: _Observation, n: int
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
        obs: _Observation,
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
                first = idx not in started
                started.add(idx)
                for obj in stream_chunks(idx, chunk, first):
                    yield _sse(obj)
            usage = _usage(prompt, completion, n)
            obs.prompt_tokens, obs.output_tokens = usage.prompt_tokens, usage.completion_tokens
            if usage_chunk is not None:
                yield _sse(usage_chunk(usage))
            yield "data: [DONE]\n\n"
        except EngineError as exc:
            status, err_type = exc.status_code, exc.error_type
            yield _sse(error_payload(exc.message, exc.status_code, err_type=exc.error_type, code=exc.code))
            yield "data: [DONE]\n\n"
        except (asyncio.CancelledError, GeneratorExit):
            status, err_type = 499, "client_disconnected"
            raise
        except Exception:
            log.exception("stream failed")
            status, err_type = 500, "server_error"
            yield _sse(error_payload("internal server error", 500, code="internal_error"))
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
    async def chat(self, req: ChatCompletionRequest, request: Request) -> Response:
        info = await self.backend.engine_info(req.model)  # 404 for unknown models
        messages = [m.for_template() for m in req.messages]
        check_tool_messages(messages)
        plan = req.tool_plan()
        parser = get_parser(info.tool_call_parser) if plan is not None and plan.parses_calls else None
        base = _sampling(req)
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

        def stream_chunks(idx: int, chunk: GenerationChunk, first: bool) -> list[dict[str, Any]]:
            state = choices.setdefault(idx, _ChatChoiceStream(parser, top_k))
            out = []
            for delta, logprobs in state.deltas(chunk, first):
                out.append(_chat_chunk(rid, created, req.model, ChatChunkChoice(index=idx, delta=delta,
                                                                                 logprobs=logprobs)))
            if chunk.finish_reason:
                out.append(_chat_chunk(rid, created, req.model, ChatChunkChoice(
                    index=idx, delta=ChatDelta(), finish_reason=finish_reason(chunk.finish_reason, state.called))))
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
        info = await self.backend.engine_info(req.model)  # 404 for unknown models
        items: list[tuple[int, GenerationRequest]] = []
        for p_idx, prompt in enumerate(req.prompts):
            base = _sampling(req)
            base.prompt = prompt
            items += _fan_out(base, req.n, offset=p_idx * req.n)
        rid, created = new_id("cmpl"), int(time.time())
        top_k = req.logprobs_k
        builders: dict[int, CompletionLogprobsBuilder] = {}

        def logprobs_of(idx: int, entries: list[TokenLogprob]) -> CompletionLogprobs | None:
            if top_k is None:
                return None
            return builders.setdefault(idx, CompletionLogprobsBuilder(top_k)).build(entries)

        def stream_chunks(idx: int, chunk: GenerationChunk, first: bool) -> list[dict[str, Any]]:
            out = []
            if chunk.text or first or chunk.logprobs:
                out.append(CompletionResponse(
                    id=rid, created=created, model=req.model,
                    choices=[CompletionChoice(index=idx, text=chunk.text, finish_reason=None,
                                              logprobs=logprobs_of(idx, chunk.logprobs or []))],
                ).model_dump(exclude={"usage"}))
            if chunk.finish_reason:
                out.append(CompletionResponse(
                    id=rid, created=created, model=req.model,
                    choices=[CompletionChoice(index=idx, text="", finish_reason=chunk.finish_reason)],
                ).model_dump(exclude={"usage"}))
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


def _chat_chunk(rid: str, created: int, model: str, choice: ChatChunkChoice) -> dict[str, Any]:
    return ChatCompletionChunk(id=rid, created=created, model=model, choices=[choice]).model_dump(exclude_none=True)


def _usage(prompt: dict[int, int], completion: dict[int, int], n: int) -> Usage:
    # the n choices fanned out from one prompt share it: count each distinct prompt once
    p = sum(v for i, v in prompt.items() if i % n == 0)
    c = sum(completion.values())
    return Usage(prompt_tokens=p, completion_tokens=c, total_tokens=p + c)
