"""Transport limits of the standalone server (app.http_guard), against a real process over raw sockets.

Half-sent headers, half-sent bodies and silent connections are answered 408 and closed within the
configured bound while the server keeps serving others; an oversized header is a 431, malformed HTTP a
400, a connection beyond the cap a 503 with Retry-After: all in the OpenAI error shape with X-Request-Id.
Idle keep-alive connections are closed after the keep-alive timeout.
"""

from __future__ import annotations

import json
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.support.servers import ServerProcess, spawn_server

HEADER_S, BODY_S, KEEPALIVE_S, MAX_CONN = 1.0, 1.0, 2.0, 40
SLACK_S = 3.0  # scheduling on a loaded 2-core box; the bound under test is the configured timeout


@pytest.fixture(scope="module")
def limited(tmp_path_factory: pytest.TempPathFactory, tiny_model: Path) -> Iterator[ServerProcess]:
    env = {"LLM_HEADER_TIMEOUT_S": str(HEADER_S), "LLM_BODY_TIMEOUT_S": str(BODY_S),
           "LLM_KEEPALIVE_TIMEOUT_S": str(KEEPALIVE_S), "LLM_MAX_CONNECTIONS": str(MAX_CONN),
           "LLM_MAX_HEADER_BYTES": "8192"}
    srv = spawn_server(tmp_path_factory.mktemp("limited"), tiny_model, env=env)
    yield srv
    srv.stop()


def _connect(srv: ServerProcess) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", srv.port), timeout=HEADER_S + BODY_S + SLACK_S + 5)
    return sock


def _read_all(sock: socket.socket) -> bytes:
    """Everything the server sends until it closes the connection."""
    data = b""
    while chunk := sock.recv(65536):
        data += chunk
    return data


def _parse(raw: bytes) -> tuple[int, dict[str, str], dict]:
    head, _, body = raw.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split()[1])
    headers = {k.lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:])}
    return status, headers, json.loads(body) if body else {}


def _assert_error(raw: bytes, status: int, code: str) -> dict[str, str]:
    got, headers, body = _parse(raw)
    assert got == status, raw[:300]
    assert headers["content-type"] == "application/json" and headers.get("x-request-id"), headers
    assert set(body["error"]) == {"message", "type", "param", "code"} and body["error"]["code"] == code, body
    return headers


def _ok(srv: ServerProcess) -> None:
    r = httpx.post(srv.base_url + "/v1/completions", json={"model": "tiny", "prompt": "hi", "max_tokens": 2},
                   timeout=30)
    assert r.status_code == 200, r.text


def test_half_sent_headers_and_bodies_are_closed_within_the_bound(limited: ServerProcess) -> None:
    socks: list[tuple[str, socket.socket]] = []
    for _ in range(10):
        s = _connect(limited)
        s.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n")
        socks.append(("header", s))
    for _ in range(10):
        s = _connect(limited)
        s.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                  b"Content-Length: 200\r\n\r\n{\"model\": \"tiny\",")
        socks.append(("body", s))
    silent = _connect(limited)  # opens and sends nothing at all
    socks.append(("silent", silent))
    t0 = time.monotonic()
    _ok(limited)  # the server keeps serving others meanwhile
    for kind, s in socks:
        raw = _read_all(s)
        elapsed = time.monotonic() - t0
        s.close()
        _assert_error(raw, 408, "request_timeout")
        bound = HEADER_S if kind != "body" else BODY_S
        assert elapsed < bound + SLACK_S, f"{kind}: closed only after {elapsed:.1f}s"
    _ok(limited)


def test_oversized_header_malformed_http(limited: ServerProcess) -> None:
    s = _connect(limited)
    s.sendall(b"GET /v1/models HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 20000 + b"\r\n\r\n")
    _assert_error(_read_all(s), 431, "request_header_fields_too_large")
    s.close()
    s = _connect(limited)
    s.sendall(b"NOT HTTP AT ALL\r\n\r\n")
    _assert_error(_read_all(s), 400, "bad_http_request")
    s.close()
    _ok(limited)


def test_idle_keepalive_connection_is_closed(limited: ServerProcess) -> None:
    s = _connect(limited)
    s.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
    first = b""
    while not first.endswith(b'{"status":"ok"}'):
        first += s.recv(65536)
    assert first.startswith(b"HTTP/1.1 200"), first
    t0 = time.monotonic()
    assert _read_all(s) == b""  # the server closes the idle connection
    elapsed = time.monotonic() - t0
    s.close()
    assert KEEPALIVE_S - 0.5 < elapsed < KEEPALIVE_S + SLACK_S, elapsed


def test_connection_cap_answers_503_with_retry_after(limited: ServerProcess) -> None:
    # hold the cap's worth of connections open (each with a half-sent head, so none is idle keep-alive)
    held = []
    for _ in range(MAX_CONN):
        s = _connect(limited)
        s.sendall(b"GET /healthz HTTP/1.1\r\n")
        held.append(s)
    extra = _connect(limited)
    extra.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
    headers = _assert_error(_read_all(extra), 503, "too_many_connections")
    assert int(headers["retry-after"]) >= 1
    extra.close()
    for s in held:  # the held ones time out (408) and free their places
        _read_all(s)
        s.close()
    _ok(limited)
