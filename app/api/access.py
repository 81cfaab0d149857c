"""The access log: one line per generation request, on the `app.access` logger.

    <request id> <endpoint> model=<id> engine=<name> status=<code> [error=<type>] prompt_tokens=<n>
    output_tokens=<n> ttft_s=<s> latency_s=<s> key=<key name>

The request id is the client's `X-Request-Id` (sanitised) or one made by `RequestIdMiddleware`, and is
echoed on the response, so a client's report can be matched to this line. Requests refused before they
reach a model carry model=- (a name from a rejected body is never logged verbatim). `key` is the key's name in
the keys file (`anonymous` for an `API_KEYS` key beside one; `-` on a server without a keys file or when no valid
key came): never the key itself. `LLM_ACCESS_LOG=false`
silences the logger.
"""

from __future__ import annotations

import logging
import re
from typing import Any

access = logging.getLogger("app.access")

_UNSAFE = re.compile(r"[^A-Za-z0-9._:/+=@-]")


def clean_request_id(raw: bytes) -> str:
    """A client-supplied id made safe for logs and headers: printable id characters only, at most 128."""
    return _UNSAFE.sub("_", raw[:128].decode("latin-1")) or "-"


def request_id_of(scope: Any) -> str:
    """The id `RequestIdMiddleware` stored for this request (`-` outside it)."""
    state = scope.get("state") if isinstance(scope, dict) else None
    return str((state or {}).get("request_id", "-"))


def log_request(
    request_id: str,
    endpoint: str,
    status: int,
    *,
    model: str = "-",
    engine: str = "-",
    error_type: str | None = None,
    prompt_tokens: int = 0,
    output_tokens: int = 0,
    ttft_s: float | None = None,
    latency_s: float | None = None,
    key: str = "-",
) -> None:
    if not access.isEnabledFor(logging.INFO):
        return
    error = f" error={error_type}" if error_type else ""
    ttft = "-" if ttft_s is None else f"{ttft_s:.3f}"
    latency = "-" if latency_s is None else f"{latency_s:.3f}"
    access.info(
        "%s %s model=%s engine=%s status=%d%s prompt_tokens=%d output_tokens=%d ttft_s=%s latency_s=%s key=%s",
        request_id, endpoint, model, engine, status, error, prompt_tokens, output_tokens, ttft, latency, key,
    )
