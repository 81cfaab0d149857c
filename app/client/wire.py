"""One OpenAI-compatible request over httpx, streamed (SSE) or not, timed.

`call` posts a chat (`messages`) or completions (`prompt`) body to one endpoint
and returns an `Outcome` (text, usage, latency, TTFT, per-chunk arrival times).
Failures are raised as exceptions that say whether retrying can help:
`RetryableError` (connection refused/reset/dropped, timeouts, 429, 502/503/504,
a stream cut off before `[DONE]`) or `RequestFailed` (every other status,
never retried). Both carry the HTTP status (0 when there was no response) and
the server's `Retry-After` seconds when it sent one.
"""

from __future__ import annotations

import email.utils
import json
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import httpx

RETRYABLE_STATUS = frozenset({429, 502, 503, 504})


class CallError(Exception):
    """A request that did not produce a completion."""

    def __init__(self, message: str, *, status: int = 0, retry_after: float | None = None,
                 error_type: str | None = None):
        super().__init__(message)
        self.message = message
        self.status = status
        self.retry_after = retry_after
        self.error_type = error_type

    @property
    def connection_level(self) -> bool:
        """True when the endpoint itself looks unreachable/broken (a reason to fail over)."""
        return self.status == 0 or self.status in (502, 503, 504)

    def as_dict(self) -> dict[str, Any]:
        return {"status": self.status, "type": self.error_type, "message": self.message}


class RetryableError(CallError):
    """Transient: connection errors, timeouts, 429, 502/503/504, incomplete streams."""


class RequestFailed(CallError):
    """Permanent for this request (4xx other than 429, other 5xx): never retried."""


@dataclass
class Outcome:
    text: str
    finish_reason: str | None
    usage: dict[str, Any] | None
    latency_s: float
    ttft_s: float | None = None
    chunk_times: list[float] = field(default_factory=list)  # seconds since send, per chunk carrying text

    @property
    def completion_tokens(self) -> int:
        if self.usage and isinstance(self.usage.get("completion_tokens"), int):
            return int(self.usage["completion_tokens"])
        return len(self.chunk_times)


def api_path(body: dict[str, Any]) -> str:
    return "/v1/chat/completions" if "messages" in body else "/v1/completions"


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


def _error_from_response(status: int, headers: httpx.Headers, raw: bytes) -> CallError:
    message, err_type = raw.decode(errors="replace")[:500] or f"HTTP {status}", None
    try:
        err = json.loads(raw).get("error")
        if isinstance(err, dict):
            message = str(err.get("message") or message)
            err_type = err.get("type")
    except (ValueError, AttributeError):
        pass
    cls = RetryableError if status in RETRYABLE_STATUS else RequestFailed
    retry_after = parse_retry_after(headers.get("retry-after"))
    return cls(f"HTTP {status}: {message}", status=status, retry_after=retry_after, error_type=err_type)


def _transport_error(exc: httpx.TransportError) -> RetryableError:
    detail = str(exc) or type(exc).__name__
    return RetryableError(f"{type(exc).__name__}: {detail}", error_type="connection_error")


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
    """Send `body` to `base_url` (chat if it has `messages`, else completions) and time it."""
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
                raise _error_from_response(resp.status_code, resp.headers, resp.content)
            data = resp.json()
            choice = (data.get("choices") or [{}])[0]
            return Outcome(text=_full_text(choice), finish_reason=choice.get("finish_reason"),
                           usage=data.get("usage"), latency_s=time.perf_counter() - start)
        async with client.stream("POST", url, json=payload, headers=_headers(api_key)) as resp:
            if resp.status_code != 200:
                raw = await resp.aread()
                raise _error_from_response(resp.status_code, resp.headers, raw)
            return await _read_sse(resp, start)
    except httpx.TransportError as exc:
        raise _transport_error(exc) from exc
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
                                 error_type=err.get("type") or "stream_error")
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
                   ttft_s=ttft, chunk_times=times)
