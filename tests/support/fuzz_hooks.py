"""Schemathesis check of tests/standalone/test_fuzz.py: "a valid request is accepted", minus the rules a schema
cannot state.

The OpenAPI document states every field's shape and range and the cross-field rules JSON Schema can say
(stream_options only with stream, top_logprobs only with logprobs), so the built-in `positive_data_acceptance`
holds the server to them. Some rules depend on the request as a whole or on the server, and a schema-valid
body can break them: a token budget beyond the served model's context, a fan-out (`n`) beyond the engine's
slots, a `tool` message that answers no call of the assistant message before it, a named `tool_choice`
that is not among `tools`, a tool name or call id used twice, a JSON response_format together with a forced
tool call, a JSON schema using a feature constrained decoding does not support, a `seed` just beyond the signed
64-bit range that a generator working in doubles rounds onto a bound (2**63 + 100 "is" 2**63 - 1 there), a
`/v1/usage` window whose `end` is not after its `start` (an order between two query parameters). Each is a
400 naming that
parameter (tests/standalone/test_api_features.py and tests/unit/api/test_tools.py prove each one). This check is
the built-in one with exactly those answers allowed; the fuzz runs it in its place. Everything else a valid
request gets must be 2xx (or 401/403/404/409/429/5xx, which other checks judge).
"""

from __future__ import annotations

import json
import re
from typing import Any

import schemathesis

# (error code, or None for any) and the `param` pattern of each server-side rule's 400
SERVER_RULES: tuple[tuple[str | None, re.Pattern[str]], ...] = (
    ("context_length_exceeded", re.compile(r"^(max_tokens|max_completion_tokens|messages|prompt)$")),
    (None, re.compile(r"^n$")),  # fan-out beyond the engine's running + waiting slots
    (None, re.compile(r"^tool_choice(\.function\.name)?$")),
    (None, re.compile(r"^messages\.\d+\.(tool_call_id|tool_calls\.\d+\.id)$")),
    (None, re.compile(r"^tools\.\d+\.function\.(name|parameters)(\..*)?$")),
    (None, re.compile(r"^response_format(\..*)?$")),
    ("invalid_value", re.compile(r"^seed$")),  # beyond the exact int64 range (see _seed_beyond_int64)
    ("invalid_value", re.compile(r"^end$")),  # /v1/usage: end not after start
)
ACCEPTED = {401, 403, 404, 409, 429}


def _error(content: bytes) -> dict[str, Any]:
    try:
        body = json.loads(content)
    except ValueError:
        return {}
    err = body.get("error") if isinstance(body, dict) else None
    return err if isinstance(err, dict) else {}


def _seed_beyond_int64(body: Any) -> bool:
    """The body's seed is outside [-2**63, 2**63 - 1] in exact integer arithmetic."""
    seed = body.get("seed") if isinstance(body, dict) else None
    return isinstance(seed, int | float) and not isinstance(seed, bool) and not -(2**63) <= seed <= 2**63 - 1


@schemathesis.check
def valid_requests_accepted_within_server_rules(ctx: Any, response: Any, case: Any) -> bool | None:
    meta = case.meta
    if meta is None or not meta.generation.mode.is_positive:
        return None
    status = response.status_code
    if status < 400 or status in ACCEPTED or status >= 500:
        return None
    err = _error(response.content)
    param, code = str(err.get("param") or ""), err.get("code")
    if status == 400 and any((want is None or code == want) and rx.match(param) for want, rx in SERVER_RULES):
        if param != "seed" or _seed_beyond_int64(case.body):
            return None
    raise AssertionError(f"Valid data should have been accepted: {status} {err or response.content[:300]!r}")
