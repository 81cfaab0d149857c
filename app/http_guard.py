"""The HTTP transport guard of the kit's uvicorn servers: slow clients, oversized headers, connection cap.

uvicorn has knobs for the keep-alive timeout and (through h11) the header size, none for how long a
client may take to send its request. `GuardedH11Protocol` (uvicorn's h11 protocol, one per connection)
adds them, and answers every refusal in the OpenAI error shape with an `X-Request-Id`, where uvicorn
would send plain text:

- header read timeout: the request line and headers must be complete `header_timeout_s` after the
  connection opened or its first byte arrived (a connection that sends nothing counts): 408, closed;
- body read timeout: the body must be complete `body_timeout_s` after its headers: 408, closed (the
  application sees the client as gone);
- header size: more than `max_header_bytes` of request line plus headers: 431 (h11's limit);
- malformed HTTP: 400;
- connection cap: a connection beyond `max_connections` open ones gets 503 with Retry-After for its
  first request and is closed.

`HTTPServerKnobs` declares these limits, the body cap and the drain once, for every settings source that runs an
API server (`LLM_*` for the standalone server, `DS_*` for DeepSpeed rank 0); `serve(app, knobs, ...)` runs an app
on uvicorn with them: `server_config(app, ...)` builds the uvicorn config, `DrainingServer` flags the app as
draining on SIGTERM (`/readyz` 503, no new connections) and cuts the streams still running when the grace ends.
"""

from __future__ import annotations

import asyncio
import logging
import math
import signal
import uuid
from dataclasses import dataclass
from typing import Any

import h11
import uvicorn
from pydantic import BaseModel, Field
from uvicorn.protocols.http.h11_impl import H11Protocol

from app import compat
from app.api.errors import error_bytes

log = logging.getLogger(__name__)

CUT_WRITE_S = 1.0  # after the grace: time the cut requests get to write their last event


class HTTPServerKnobs(BaseModel):
    """What every API server of the kit takes from its settings: body cap, drain, transport limits, SSE."""

    max_body_bytes: int = Field(default=4 * 1024 * 1024, ge=1024)
    graceful_timeout_s: float = Field(
        default=30.0, ge=0, description="On SIGTERM, in-flight requests get this long; streams still running then "
        "end with an SSE error event `server_shutting_down` and `[DONE]`.")
    # transport limits (app.http_guard): slow or abusive clients cannot hold the server
    header_timeout_s: float = Field(default=10.0, gt=0, description="Request line + headers must arrive within it.")
    body_timeout_s: float = Field(default=30.0, gt=0, description="The body must arrive within it after the headers.")
    max_header_bytes: int = Field(default=32 * 1024, ge=1024, description="Request line + headers; above: 431.")
    keepalive_timeout_s: float = Field(
        default=75.0, gt=0, description="Idle keep-alive connections close after it (keep it above nginx's upstream "
        "keepalive_timeout, 60 s, so nginx never reuses a connection the server is closing).")
    max_connections: int = Field(default=1024, ge=1, description="Open connections; beyond: 503 + Retry-After.")
    sse_keepalive_s: float = Field(
        default=15.0, ge=0, description="A `: keep-alive` SSE comment when a stream is silent this long (0: never).")

    def limits(self) -> TransportLimits:
        return TransportLimits(header_timeout_s=self.header_timeout_s, body_timeout_s=self.body_timeout_s,
                               max_header_bytes=self.max_header_bytes, keepalive_timeout_s=self.keepalive_timeout_s,
                               max_connections=self.max_connections)


@dataclass(frozen=True)
class TransportLimits:
    """The limits one server applies to every connection (defaults as in Settings / .env.example)."""

    header_timeout_s: float = 10.0
    body_timeout_s: float = 30.0
    max_header_bytes: int = 32 * 1024
    keepalive_timeout_s: float = 75.0
    max_connections: int = 1024
    retry_after_s: int = 1


class _Connection(h11.Connection):
    """h11's connection, remembering the protocol error it raised (its status hint: 400 or 431). h11 limits
    only a head still incomplete in its buffer; a complete one arriving at once is measured here."""

    last_error: h11.RemoteProtocolError | None = None

    def __init__(self, our_role: Any, max_header_bytes: int) -> None:
        super().__init__(our_role, max_incomplete_event_size=max_header_bytes)
        self.max_header_bytes = max_header_bytes

    def next_event(self) -> Any:
        try:
            event = super().next_event()
            if isinstance(event, h11.Request):
                size = len(event.method) + len(event.target) + sum(len(k) + len(v) + 4 for k, v in event.headers)
                if size > self.max_header_bytes:
                    raise h11.RemoteProtocolError("request headers too large", error_status_hint=431)
            return event
        except h11.RemoteProtocolError as exc:
            self.last_error = exc
            raise


_MESSAGES = {
    400: ("malformed HTTP request", "bad_http_request"),
    408: ("the request was not received in time", "request_timeout"),
    431: ("request headers too large", "request_header_fields_too_large"),
    503: ("too many open connections; retry shortly", "too_many_connections"),
}


class GuardedH11Protocol(H11Protocol):
    """uvicorn's h11 protocol with read deadlines, a connection cap and JSON protocol errors."""

    limits = TransportLimits()  # replaced per server by `server_config` (a subclass per limits)

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.conn = _Connection(h11.SERVER, self.limits.max_header_bytes)
        self._deadline: asyncio.TimerHandle | None = None
        self._deadline_kind = ""
        self._refused = False

    # ----------------------------------------------------------------- connection events
    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        if len(self.connections) > self.limits.max_connections:
            self._refused = True  # answered when its request arrives (a reset would look like a crash)
        self._arm("header", self.limits.header_timeout_s)

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        if self._refused:
            self._refuse(data)
            return
        super().data_received(data)
        self._follow_state()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        self._follow_state()

    # ----------------------------------------------------------------- deadlines
    def _follow_state(self) -> None:
        """Arm the deadline that fits the request's state: head pending, body pending, or none."""
        if self.transport is None or self.transport.is_closing():
            self._disarm()
            return
        state = self.conn.their_state
        if state is h11.SEND_BODY:
            self._arm("body", self.limits.body_timeout_s)
        elif state is h11.IDLE and self.conn.trailing_data[0]:
            self._arm("header", self.limits.header_timeout_s)  # part of a request head is here
        else:
            self._disarm()  # request complete, or idle between requests (uvicorn's keep-alive timer runs)

    def _arm(self, kind: str, seconds: float) -> None:
        if self._deadline is not None and self._deadline_kind == kind:
            return
        self._disarm()
        self._deadline_kind = kind
        self._deadline = self.loop.call_later(seconds, self._expired)

    def _disarm(self) -> None:
        if self._deadline is not None:
            self._deadline.cancel()
        self._deadline, self._deadline_kind = None, ""

    def _expired(self) -> None:
        self._deadline = None
        if self.transport.is_closing():
            return
        if self.cycle is not None and not self.cycle.response_complete:
            # the application waits for the rest of the body: it sees a disconnect, its answer is dropped
            self.cycle.disconnected = True
            self.cycle.message_event.set()
            if self.cycle.response_started:
                self.transport.close()
                return
        self._answer(408)

    # ----------------------------------------------------------------- refusals
    def send_400_response(self, msg: str) -> None:  # uvicorn calls this for h11 protocol errors
        err = self.conn.last_error if isinstance(self.conn, _Connection) else None
        status = err.error_status_hint if err is not None and err.error_status_hint in _MESSAGES else 400
        self._answer(status)

    def _refuse(self, data: bytes) -> None:
        self.conn.receive_data(data)
        try:
            event = self.conn.next_event()
        except h11.RemoteProtocolError:
            self.send_400_response("")
            return
        if isinstance(event, h11.Request):
            self._answer(503, [(b"retry-after", str(self.limits.retry_after_s).encode())])

    def _answer(self, status: int, extra: list[tuple[bytes, bytes]] | None = None) -> None:
        """Write an OpenAI-shaped error straight to the socket and close the connection."""
        self._disarm()
        message, code = _MESSAGES[status]
        body = error_bytes(message, status, code=code)
        head = (f"HTTP/1.1 {status} {_REASONS[status]}\r\ncontent-type: application/json\r\n"
                f"content-length: {len(body)}\r\nx-request-id: {uuid.uuid4().hex}\r\nconnection: close\r\n")
        head += "".join(f"{k.decode()}: {v.decode()}\r\n" for k, v in extra or [])
        self.transport.write(head.encode() + b"\r\n" + body)
        self.transport.close()


_REASONS = {400: "Bad Request", 408: "Request Timeout", 431: "Request Header Fields Too Large",
            503: "Service Unavailable"}


def server_config(app: Any, *, host: str, port: int, limits: TransportLimits, log_level: str = "info",
                  graceful_timeout_s: float = 30.0) -> uvicorn.Config:
    """The uvicorn config of a kit server: the guarded h11 protocol with `limits`, no uvicorn access log."""
    protocol = type("LimitedH11Protocol", (GuardedH11Protocol,), {"limits": limits})
    return uvicorn.Config(
        app, host=host, port=port, log_level=log_level, http=protocol,
        h11_max_incomplete_event_size=limits.max_header_bytes,
        timeout_keep_alive=max(1, round(limits.keepalive_timeout_s)),
        timeout_graceful_shutdown=math.ceil(max(0.0, graceful_timeout_s)),
        access_log=False,
    )


class DrainingServer(uvicorn.Server):
    """uvicorn server that flags the app as draining as soon as a stop signal arrives, and cuts the requests
    still running when the grace ends (`app.state.stream_cut`) a moment before uvicorn cancels them."""

    def __init__(self, config: uvicorn.Config, app_state: Any, grace_s: float):
        super().__init__(config)
        self._app_state = app_state
        self._grace_s = grace_s

    async def shutdown(self, sockets: Any = None) -> None:
        cut = asyncio.get_running_loop().call_later(self._grace_s, self._app_state.stream_cut.set)
        try:
            await super().shutdown(sockets)
        finally:
            cut.cancel()

    def handle_exit(self, sig: int, frame: Any) -> None:
        self._app_state.draining = True
        log.info("signal %s: draining (in-flight requests get %ss)", sig, self._grace_s)
        super().handle_exit(sig, frame)
        if sig == signal.SIGTERM:  # a drained SIGTERM is a normal stop (exit 0), see compat
            compat.uvicorn_forget_signal(self, signal.SIGTERM)


def guarded_server(app: Any, knobs: HTTPServerKnobs, *, host: str, port: int, log_level: str = "info"
                   ) -> DrainingServer:
    """The kit's API server for `app`: guarded transport, graceful drain on SIGTERM (call `.run()`)."""
    config = server_config(app, host=host, port=port, limits=knobs.limits(), log_level=log_level,
                           graceful_timeout_s=knobs.graceful_timeout_s + CUT_WRITE_S)
    return DrainingServer(config, app.state, knobs.graceful_timeout_s)
