"""The ONE HTTP client of the cluster's OpenAI API: one error hierarchy, one retry policy, one request.

- Errors: `ClientError` (message, HTTP status or 0, the server's Retry-After, error type, code), either
  `RetryableError` (connection refused/reset/dropped, timeouts, 429/502/503/504, a stream that reports an
  error or ends before `[DONE]`) or `RequestFailed` (every other status, a body that is not what the API
  sends: never retried).
- `RetryPolicy`: which answers are retried (`RETRYABLE_STATUS`, transport errors), how long to wait
  (the server's Retry-After, capped, else full-jitter exponential backoff) and how often. Used by the
  batch client's attempt loop (which adds endpoint failover and a batch-wide budget), by
  `RetryTransport`/`AsyncRetryTransport` (httpx transports applying it to any client, e.g. the openai SDK
  inside LangGraph's ChatOpenAI) and so by `ClusterClient`.
- `call`: one completion request (chat if the body has `messages`), streamed or not, timed: batch, bench.
- `ClusterClient`: models and chat with retries and readable errors: the MCP server, the LangGraph node.
"""

from __future__ import annotations

import asyncio
import email.utils
import json
import random
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import httpx
from tenacity import RetryCallState

RETRYABLE_STATUS = frozenset({429, 502, 503, 504})
MODELS_TTL_S = 30.0


# ----------------------------------------------------------------------------- errors


class ClientError(Exception):
    """A request that did not produce the answer asked for; `message` is readable by a person or an agent."""

    def __init__(self, message: str, *, status: int = 0, retry_after: float | None = None,
                 error_type: str | None = None, code: str | None = None):
        super().__init__(message)
        self.message = message
        self.status = status
        self.retry_after = retry_after
        self.error_type = error_type
        self.code = code

    @property
    def connection_level(self) -> bool:
        """True when the endpoint itself looks unreachable/broken (a reason to fail over)."""
        return self.status == 0 or self.status in (502, 503, 504)

    def as_dict(self) -> dict[str, Any]:
        return {"status": self.status, "type": self.error_type, "message": self.message}


class RetryableError(ClientError):
    """Transient: connection errors, timeouts, 429, 502/503/504, streams cut off or failing mid-way."""


class RequestFailed(ClientError):
    """Permanent for this request (4xx other than 429, other 5xx, an unexpected body): never retried."""


def parse_retry_after(value: str | None, now: float | None = None) -> float | None:
    """Seconds to wait from a `Retry-After` header (delta-seconds or HTTP date); None if absent/invalid."""
    if not value:
        return None
    value = value.strip()
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    current = datetime.fromtimestamp(time.time() if now is None else now, UTC)
    return max(0.0, (when - current).total_seconds())


def error_from_response(status: int, headers: httpx.Headers, raw: bytes, where: str = "") -> ClientError:
    """The error for a non-200 answer: the server's OpenAI-shaped message, Retry-After, type and code."""
    message, err_type, code = raw.decode(errors="replace").strip()[:500] or f"HTTP {status}", None, None
    try:
        body = json.loads(raw)
        err = body.get("error") if isinstance(body, dict) else None
        if isinstance(err, dict):
            message, err_type, code = str(err.get("message") or message), err.get("type"), err.get("code")
        elif isinstance(body, dict) and "detail" in body:
            message = str(body["detail"])
    except (ValueError, AttributeError):
        pass
    cls = RetryableError if status in RETRYABLE_STATUS else RequestFailed
    return cls(f"HTTP {status}{' from ' + where if where else ''}: {message}", status=status,
               retry_after=parse_retry_after(headers.get("retry-after")), error_type=err_type, code=code)


def transport_error(exc: httpx.TransportError, url: str = "") -> RetryableError:
    detail = str(exc) or type(exc).__name__
    where = f" at {url}" if url else ""
    if isinstance(exc, httpx.TimeoutException):
        return RetryableError(f"no answer{where} in time ({type(exc).__name__}: {detail})", error_type="timeout")
    return RetryableError(f"unreachable{where}: {type(exc).__name__}: {detail}", error_type="connection_error")


# ----------------------------------------------------------------------------- the retry policy


@dataclass(frozen=True)
class RetryPolicy:
    """Which failures are retried and how long to wait: defined once for every client of the cluster."""

    max_attempts: int = 6
    backoff_s: float = 0.5  # exponential base of the full-jitter backoff
    max_backoff_s: float = 20.0
    max_retry_after_s: float = 60.0

    def delay_s(self, attempt: int, retry_after: float | None) -> float:
        """Wait after failed attempt `attempt`: Retry-After (capped, plus up to 10% jitter), else full jitter."""
        if retry_after is not None:
            return min(retry_after, self.max_retry_after_s) * (1 + 0.1 * random.random())
        return random.uniform(0, min(self.max_backoff_s, self.backoff_s * 2 ** (attempt - 1)))

    def wait(self, state: RetryCallState) -> float:
        """tenacity `wait=` callback (the batch client's attempt loop)."""
        exc = state.outcome.exception() if state.outcome else None
        return self.delay_s(state.attempt_number, exc.retry_after if isinstance(exc, ClientError) else None)

    def decide(self, attempt: int, response: httpx.Response | None) -> tuple[bool, float | None]:
        """(retry?, Retry-After) after attempt `attempt` got `response` (None: a transport error)."""
        if attempt >= self.max_attempts:
            return False, None
        if response is None:
            return True, None
        if response.status_code not in RETRYABLE_STATUS:
            return False, None
        return True, parse_retry_after(response.headers.get("retry-after"))


class RetryTransport(httpx.BaseTransport):
    """An httpx transport that applies `RetryPolicy` to every request (the body is re-sent whole)."""

    def __init__(self, policy: RetryPolicy, inner: httpx.BaseTransport | None = None,
                 sleep: Callable[[float], None] = time.sleep):
        self.policy, self.inner, self.sleep = policy, inner or httpx.HTTPTransport(), sleep

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        attempt = 0
        while True:
            attempt += 1
            try:
                response = self.inner.handle_request(request)
            except httpx.TransportError:
                if not self.policy.decide(attempt, None)[0]:
                    raise
                self.sleep(self.policy.delay_s(attempt, None))
                continue
            retry, retry_after = self.policy.decide(attempt, response)
            if not retry:
                return response
            response.read()
            response.close()
            self.sleep(self.policy.delay_s(attempt, retry_after))

    def close(self) -> None:
        self.inner.close()


class AsyncRetryTransport(httpx.AsyncBaseTransport):
    """The async twin of `RetryTransport`. `whole_body=True` reads each answer's body here, so an answer cut after
    its headers (the server killed mid-reply) is a transport error the policy retries (not for streams)."""

    def __init__(self, policy: RetryPolicy, inner: httpx.AsyncBaseTransport | None = None,
                 sleep: Callable[[float], Awaitable[None]] = asyncio.sleep, whole_body: bool = False):
        self.policy, self.inner, self.sleep = policy, inner or httpx.AsyncHTTPTransport(), sleep
        self.whole_body = whole_body

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        attempt = 0
        while True:
            attempt += 1
            try:
                response = await self.inner.handle_async_request(request)
                if self.whole_body:
                    await response.aread()
            except httpx.TransportError:
                if not self.policy.decide(attempt, None)[0]:
                    raise
                await self.sleep(self.policy.delay_s(attempt, None))
                continue
            retry, retry_after = self.policy.decide(attempt, response)
            if not retry:
                return response
            await response.aread()
            await response.aclose()
            await self.sleep(self.policy.delay_s(attempt, retry_after))

    async def aclose(self) -> None:
        await self.inner.aclose()


# ----------------------------------------------------------------------------- one completion request


@dataclass
class Outcome:
    text: str
    finish_reason: str | None
    usage: dict[str, Any] | None
    latency_s: float
    ttft_s: float | None = None
    chunk_times: list[float] = field(default_factory=list)  # seconds since send, per chunk carrying text
    served_by: str | None = None  # the server's X-Served-By header

    @property
    def completion_tokens(self) -> int:
        if self.usage and isinstance(self.usage.get("completion_tokens"), int):
            return int(self.usage["completion_tokens"])
        return len(self.chunk_times)


def api_path(body: dict[str, Any]) -> str:
    return "/v1/chat/completions" if "messages" in body else "/v1/completions"


def _headers(api_key: str | None) -> dict[str, str]:
    return {"Authorization": f"Bearer {api_key}"} if api_key else {}


def _delta_text(choice: dict[str, Any]) -> str:
    if "delta" in choice:
        return (choice.get("delta") or {}).get("content") or ""
    return choice.get("text") or ""


def _full_text(choice: dict[str, Any]) -> str:
    if "message" in choice:
        return (choice.get("message") or {}).get("content") or ""
    return choice.get("text") or ""


async def call(client: httpx.AsyncClient, base_url: str, body: dict[str, Any], *, stream: bool = False,
               api_key: str | None = None) -> Outcome:
    """Send `body` to `base_url` (chat if it has `messages`, else completions) once, and time it."""
    url = base_url.rstrip("/") + api_path(body)
    payload = dict(body)
    if stream:
        payload["stream"] = True
        payload["stream_options"] = {"include_usage": True}
    else:
        payload.pop("stream", None)
        payload.pop("stream_options", None)
    start = time.perf_counter()
    try:
        if not stream:
            resp = await client.post(url, json=payload, headers=_headers(api_key))
            if resp.status_code != 200:
                raise error_from_response(resp.status_code, resp.headers, resp.content)
            data = resp.json()
            choice = (data.get("choices") or [{}])[0]
            return Outcome(text=_full_text(choice), finish_reason=choice.get("finish_reason"),
                           usage=data.get("usage"), latency_s=time.perf_counter() - start,
                           served_by=resp.headers.get("x-served-by"))
        async with client.stream("POST", url, json=payload, headers=_headers(api_key)) as resp:
            if resp.status_code != 200:
                raw = await resp.aread()
                raise error_from_response(resp.status_code, resp.headers, raw)
            return await _read_sse(resp, start)
    except httpx.TransportError as exc:
        raise transport_error(exc) from exc
    except ValueError as exc:  # a 200 whose body is not the JSON we expect
        raise RequestFailed(f"bad response body: {exc}", status=200, error_type="bad_response") from exc


async def _read_sse(resp: httpx.Response, start: float) -> Outcome:
    parts: list[str] = []
    times: list[float] = []
    ttft: float | None = None
    finish: str | None = None
    usage: dict[str, Any] | None = None
    done = False
    async for line in resp.aiter_lines():
        if not line.startswith("data:"):
            continue
        data = line[5:].strip()
        if data == "[DONE]":
            done = True
            break
        event = json.loads(data)
        if "error" in event:  # the server reports a failure inside the stream
            err = event["error"] if isinstance(event["error"], dict) else {"message": str(event["error"])}
            raise RetryableError(f"error in stream: {err.get('message')}", status=503,
                                 error_type=err.get("type") or "stream_error", code=err.get("code"))
        if event.get("usage"):
            usage = event["usage"]
        for choice in event.get("choices") or []:
            text = _delta_text(choice)
            if text:
                now = time.perf_counter() - start
                ttft = now if ttft is None else ttft
                times.append(now)
                parts.append(text)
            finish = choice.get("finish_reason") or finish
    if not done:
        raise RetryableError("stream ended before [DONE]", error_type="incomplete_stream")
    return Outcome(text="".join(parts), finish_reason=finish, usage=usage, latency_s=time.perf_counter() - start,
                   ttft_s=ttft, chunk_times=times, served_by=resp.headers.get("x-served-by"))


# ----------------------------------------------------------------------------- the cluster client


class ClusterClient:
    """Async client of one cluster endpoint (`…/v1`) with the retry policy; `await aclose()` (or `async with`)."""

    def __init__(self, base_url: str, *, api_key: str = "", timeout_s: float = 120.0,
                 policy: RetryPolicy | None = None, transport: httpx.AsyncBaseTransport | None = None):
        self.base_url = base_url.rstrip("/")
        self.policy = policy or RetryPolicy()
        headers = {"Accept": "application/json", **_headers(api_key)}
        self.timeout_s = timeout_s
        self._http = httpx.AsyncClient(base_url=self.base_url + "/", headers=headers, timeout=timeout_s,
                                       transport=transport or AsyncRetryTransport(self.policy))
        self._models: list[dict[str, Any]] | None = None
        self._models_at = 0.0

    async def aclose(self) -> None:
        await self._http.aclose()

    async def __aenter__(self) -> ClusterClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    async def request(self, method: str, path: str, body: dict[str, Any] | None = None) -> Any:
        """One API call (retried per the policy by the transport); ClientError after the last try."""
        url = f"{self.base_url}/{path}"
        try:
            response = await self._http.request(method, path, json=body)
        except httpx.TransportError as exc:
            err = transport_error(exc, url)
            hint = "; check that the cluster is up and CLUSTER_BASE_URL is right" if "unreachable" in err.message \
                else f" (CLUSTER_TIMEOUT_S={self.timeout_s:g})"
            raise RetryableError(err.message + hint, error_type=err.error_type) from None
        if response.status_code >= 400:
            raise error_from_response(response.status_code, response.headers, response.content, f"{method} {url}")
        try:
            return response.json()
        except ValueError:
            raise RequestFailed(f"the answer to {method} {url} is not JSON", status=response.status_code) from None

    async def list_models(self, *, refresh: bool = False) -> list[dict[str, Any]]:
        """The cluster's model cards (`id`, `engine`, `ready`, `max_model_len`...), cached for 30 s."""
        if refresh or self._models is None or time.monotonic() - self._models_at > MODELS_TTL_S:
            data = await self.request("GET", "models")
            cards = data.get("data") if isinstance(data, dict) else None
            if not isinstance(cards, list):
                raise RequestFailed(f"unexpected answer from {self.base_url}/models: no 'data' list", status=200)
            self._models = [c for c in cards if isinstance(c, dict) and "id" in c]
            self._models_at = time.monotonic()
        return list(self._models)

    async def resolve_model(self, model: str | None, default: str = "") -> str:
        """The requested model, else `default`, else the first model the cluster lists."""
        if model or default:
            return model or default
        models = await self.list_models()
        if not models:
            raise RequestFailed(f"the cluster at {self.base_url} serves no models", status=200)
        return str(models[0]["id"])

    async def engine_of(self, model: str) -> str | None:
        """Engine name (`vllm`, `transformers`, ...) the cluster reports for `model`; None if unknown."""
        for refresh in (False, True):
            for card in await self.list_models(refresh=refresh):
                if card.get("id") == model:
                    return card.get("engine")
        return None

    async def chat(self, messages: list[dict[str, str]], *, model: str, max_tokens: int | None = None,
                   temperature: float | None = None, stop: list[str] | None = None,
                   extra: Mapping[str, Any] | None = None) -> dict[str, Any]:
        """POST /chat/completions (non-streaming); returns the OpenAI response body."""
        body: dict[str, Any] = {"model": model, "messages": messages, **(extra or {})}
        if max_tokens is not None:
            body["max_tokens"] = max_tokens
        if temperature is not None:
            body["temperature"] = temperature
        if stop:
            body["stop"] = stop
        data = await self.request("POST", "chat/completions", body)
        if not isinstance(data, dict) or not data.get("choices"):
            raise RequestFailed(f"unexpected answer from {self.base_url}/chat/completions: no choices", status=200)
        return data


def list_models_sync(base_url: str, *, api_key: str = "", timeout_s: float = 30.0,
                     policy: RetryPolicy | None = None) -> list[dict[str, Any]]:
    """GET {base_url}/models once (with the retry policy), for synchronous callers; ClientError on failure."""
    url = base_url.rstrip("/") + "/models"
    with httpx.Client(timeout=timeout_s, transport=RetryTransport(policy or RetryPolicy())) as http:
        try:
            response = http.get(url, headers=_headers(api_key))
        except httpx.TransportError as exc:
            raise transport_error(exc, url) from None
    if response.status_code != 200:
        raise error_from_response(response.status_code, response.headers, response.content, f"GET {url}")
    try:
        cards = response.json().get("data") or []
    except (ValueError, AttributeError):
        raise RequestFailed(f"the answer to GET {url} is not the model list", status=200) from None
    return [c for c in cards if isinstance(c, dict) and "id" in c]
