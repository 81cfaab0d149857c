"""Optional bearer-token authentication (keys from `API_KEYS`), checked before the body is read.

Ray Serve's HTTP port has no auth of its own, so every server that mounts the
router enforces keys here. `APIKeyMiddleware` answers 401 for `/v1/*` without a
valid key before anything reads or parses the request body (no key plus a
malformed body is a 401, not a 400 that reveals parsing). Other paths pass; the
middleware records in the request's state whether a valid key came along, so
`/readyz` shows per-model details only to key holders. Comparison is constant-time.
"""

from __future__ import annotations

import hmac
from typing import Any

from starlette.types import ASGIApp, Receive, Scope, Send

from app.api.access import request_id_of
from app.api.errors import count_rejection, send_error
from app.metrics import MetricsSink

AUTHENTICATED = "api_key_ok"  # key in the request's state (scope["state"])


def _matches(token: str, keys: list[str]) -> bool:
    ok = False
    for key in keys:
        ok |= hmac.compare_digest(token.encode(), key.encode())
    return ok


def key_problem(authorization: str, keys: list[str]) -> str | None:
    """Why an `Authorization` header value does not authenticate (None when it does, or no keys are set)."""
    if not keys:
        return None
    scheme, _, token = authorization.partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        return "missing API key: send 'Authorization: Bearer <key>'"
    if not _matches(token.strip(), keys):
        return "invalid API key"
    return None


def is_authenticated(scope: Any) -> bool:
    """True when the request carried a valid key, or when no keys are configured."""
    return bool((scope.get("state") or {}).get(AUTHENTICATED, False))


class APIKeyMiddleware:
    """401 (OpenAI error shape, `WWW-Authenticate: Bearer`) for `/v1/*` without a valid key."""

    def __init__(self, app: ASGIApp, keys: list[str], metrics: MetricsSink):
        self.app = app
        self.keys = keys
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        header = dict(scope.get("headers") or []).get(b"authorization", b"").decode("latin-1")
        problem = key_problem(header, self.keys)
        scope.setdefault("state", {})[AUTHENTICATED] = problem is None
        path: str = scope.get("path", "")
        if problem is None or not (path == "/v1" or path.startswith("/v1/")):
            await self.app(scope, receive, send)
            return
        count_rejection(self.metrics, path, 401, "authentication_error", request_id_of(scope))
        await send_error(send, 401, problem, code="invalid_api_key", headers=[(b"www-authenticate", b"Bearer")])
