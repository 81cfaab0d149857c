"""Optional bearer-token authentication for `/v1/*` (keys from `API_KEYS`).

Ray Serve's HTTP port has no auth of its own, so every server that mounts the
router enforces keys here. Comparison is constant-time.
"""

from __future__ import annotations

import hmac

from fastapi import Request
from starlette.exceptions import HTTPException


def _matches(token: str, keys: list[str]) -> bool:
    ok = False
    for key in keys:
        ok |= hmac.compare_digest(token.encode(), key.encode())
    return ok


async def require_api_key(request: Request) -> None:
    keys: list[str] = getattr(request.app.state, "api_keys", [])
    if not keys:
        return
    header = request.headers.get("authorization", "")
    scheme, _, token = header.partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        raise HTTPException(
            401, "missing API key: send 'Authorization: Bearer <key>'", headers={"WWW-Authenticate": "Bearer"}
        )
    if not _matches(token.strip(), keys):
        raise HTTPException(401, "invalid API key", headers={"WWW-Authenticate": "Bearer"})
