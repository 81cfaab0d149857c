"""Authentication and per-key limits (keys file and `API_KEYS`), checked before the body is read.

Ray Serve's HTTP port has no auth of its own, so every server that mounts the router enforces keys here.
`APIKeyMiddleware` answers 401 for `/v1/*` without a valid (or with an expired) key before anything reads or
parses the request body (no key plus a malformed body is a 401, not a 400 that reveals parsing). Other paths
pass; the middleware records the request's tenant in its state, so `/readyz` shows per-model details only to
key holders. A generation request (`/v1/chat/completions`, `/v1/completions`) of a key with limits is then
admitted against its requests-per-minute, tokens-per-minute and concurrency budgets (`app.tenants.limiter`): over
one, a 429 with `Retry-After` and OpenAI's `x-ratelimit-*` headers; admitted, the same headers go on its response.
The concurrency slot is held until the response has been sent. Keys are compared by hash (keys file) or in
constant time (`API_KEYS`); neither a key nor a hash is ever logged or echoed.
"""

from __future__ import annotations

import math
from typing import Any

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from app.api.access import request_id_of
from app.api.errors import count_rejection, send_error
from app.metrics import MetricsSink
from app.tenants.gate import GENERATION_PATHS, TENANCY, TENANT, TenantGate, tenant_of
from app.tenants.limiter import Refusal

AUTHENTICATED = "api_key_ok"  # key in the request's state (scope["state"])


def is_authenticated(scope: Any) -> bool:
    """True when the request carried a valid key, or when no keys are configured."""
    return bool((scope.get("state") or {}).get(AUTHENTICATED, False))


class APIKeyMiddleware:
    """401 (OpenAI error shape, `WWW-Authenticate: Bearer`) for `/v1/*` without a valid key; 429 over a key's
    limits; `x-ratelimit-*` headers on the responses of limited keys."""

    def __init__(self, app: ASGIApp, gate: TenantGate, metrics: MetricsSink):
        self.app = app
        self.gate = gate
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        header = dict(scope.get("headers") or []).get(b"authorization", b"").decode("latin-1")
        who = self.gate.identify(header)
        state = scope.setdefault("state", {})
        state[AUTHENTICATED] = not isinstance(who, str)
        path: str = scope.get("path", "")
        if not (path == "/v1" or path.startswith("/v1/")):
            await self.app(scope, receive, send)
            return
        if isinstance(who, str):
            count_rejection(self.metrics, path, 401, "authentication_error", request_id_of(scope))
            await send_error(send, 401, who, code="invalid_api_key", headers=[(b"www-authenticate", b"Bearer")])
            return
        state[TENANT] = who
        if not self.gate.accounts or scope.get("method") != "POST" or path.rstrip("/") not in GENERATION_PATHS:
            await self.app(scope, receive, send)
            return
        admitted = self.gate.admit(who)
        if isinstance(admitted, Refusal):
            await self._refuse(scope, send, admitted)
            return
        state[TENANCY] = admitted
        status = 500

        async def with_limits(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                extra = admitted.headers()
                if extra:
                    message["headers"] = [*message.get("headers", []), *extra]
            await send(message)

        try:
            await self.app(scope, receive, with_limits)
        finally:
            admitted.release()
            admitted.record("-", "-", status)  # only when the serving layer did not (refused before a model)

    async def _refuse(self, scope: Scope, send: Send, refusal: Refusal) -> None:
        tenant = tenant_of(scope)
        headers = [(b"retry-after", str(max(1, math.ceil(refusal.retry_after_s))).encode()),
                   (b"retry-after-ms", str(max(1, math.ceil(refusal.retry_after_s * 1000))).encode())]
        if tenant is not None:
            headers += self.gate.headers(tenant)
        count_rejection(self.metrics, scope.get("path", ""), 429, "rate_limit_error", request_id_of(scope),
                        key=tenant.name if tenant else "-")
        await send_error(send, 429, refusal.message, code="rate_limit_exceeded", headers=headers)
