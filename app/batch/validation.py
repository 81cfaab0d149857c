"""Up-front validation of a batch input file, line by line, with the router's own request models.

A line is `{"custom_id": str, "method": "POST", "url": <the batch's endpoint>, "body": {...}}`. The body is
checked by `ChatCompletionRequest`/`CompletionRequest` (app.api.protocol) and, for chat, by the same message
and tool checks the serving layer runs before it takes a request; the message and parameter name are the ones
a 400 from the router would carry (`app.api.errors.validation_message`), prefixed with `body.`. Anything wrong
becomes a `BatchError` naming the 1-based line and the parameter, as OpenAI reports them; a batch with any
error fails as a whole before a request is sent.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fastapi.exceptions import RequestValidationError
from pydantic import ValidationError

from app.api.errors import validation_message
from app.api.protocol import ChatCompletionRequest, CompletionRequest
from app.api.tools import check_tool_messages
from app.batch.shapes import BatchError
from app.engines.base import EngineError

MAX_REPORTED_ERRORS = 1000  # the Batch object lists at most this many (the count of the rest is in the last)


@dataclass
class Checked:
    """A validated input file: (line_no, custom_id, body JSON) rows, or the errors that fail the batch."""

    rows: list[tuple[int, str, str]] = field(default_factory=list)
    errors: list[BatchError] = field(default_factory=list)
    model: str | None = None

    def error(self, line: int | None, code: str, message: str, param: str | None = None) -> None:
        if len(self.errors) < MAX_REPORTED_ERRORS:
            self.errors.append(BatchError(code=code, line=line, message=message, param=param))


def count_lines(path: Path) -> int:
    """Non-blank lines of a file (the upload limit counts these)."""
    n = 0
    with open(path, "rb") as f:
        for raw in f:
            n += bool(raw.strip())
    return n


def _check_body(endpoint: str, body: dict[str, Any]) -> tuple[str, str | None, str] | None:
    """(message, param, code) when the router would refuse `body` at `endpoint`, else None."""
    model_cls = ChatCompletionRequest if endpoint == "/v1/chat/completions" else CompletionRequest
    try:
        req = model_cls.model_validate(body)
    except ValidationError as exc:
        message, param = validation_message(RequestValidationError(exc.errors()))
        return message, param, "invalid_request"
    if req.stream:
        return "stream is not supported in a batch (each line gets one complete response)", "stream", \
            "invalid_request"
    if isinstance(req, ChatCompletionRequest):
        try:
            check_tool_messages([m.for_template() for m in req.messages])
            req.tool_plan()
        except EngineError as exc:
            return exc.message, exc.param, "invalid_request"
    return None


def check_file(path: Path, endpoint: str, *, models: set[str] | None, max_lines: int) -> Checked:
    """Validate the input file at `path` for a batch on `endpoint`; `models`: the ids the target serves
    (None: not known, not checked)."""
    out = Checked()
    seen: dict[str, int] = {}
    with open(path, "rb") as f:
        for n, raw in enumerate(f, start=1):
            if n == 1 and raw.startswith(b"\xef\xbb\xbf"):
                out.error(n, "invalid_json_line", "the file starts with a UTF-8 byte-order mark (BOM); save it as "
                          "UTF-8 without a BOM")
                continue
            if not raw.strip():
                continue
            if len(out.rows) + len(out.errors) >= max_lines:
                out.error(None, "too_many_lines", f"the file has more than {max_lines} lines (the limit)")
                break
            try:
                obj = json.loads(raw.decode("utf-8"))
            except UnicodeDecodeError as exc:
                out.error(n, "invalid_json_line", f"line {n} is not valid UTF-8 (byte {exc.start})")
                continue
            except ValueError as exc:
                out.error(n, "invalid_json_line", f"line {n} is not valid JSON: {exc}")
                continue
            _check_line(out, n, obj, endpoint, models, seen)
    if not out.rows and not out.errors:
        out.error(None, "empty_file", "the input file has no request lines")
    return out


def _check_line(out: Checked, n: int, obj: Any, endpoint: str, models: set[str] | None,
                seen: dict[str, int]) -> None:
    if not isinstance(obj, dict):
        out.error(n, "invalid_json_line", f"line {n} is not a JSON object")
        return
    cid = obj.get("custom_id")
    if not isinstance(cid, str) or not cid:
        out.error(n, "missing_required_parameter", "custom_id must be a non-empty string", "custom_id")
        return
    if cid in seen:
        out.error(n, "duplicate_custom_id", f"custom_id {cid!r} is also on line {seen[cid]}; custom_ids must be "
                  "unique within a batch", "custom_id")
        return
    seen[cid] = n
    if obj.get("method") != "POST":
        out.error(n, "invalid_method", "method must be \"POST\"", "method")
        return
    if obj.get("url") != endpoint:
        out.error(n, "invalid_url", f"url {obj.get('url')!r} does not match the batch's endpoint {endpoint!r}",
                  "url")
        return
    body = obj.get("body")
    if not isinstance(body, dict):
        out.error(n, "invalid_request", "body must be a JSON object (the request)", "body")
        return
    problem = _check_body(endpoint, body)
    if problem is not None:
        message, param, code = problem
        out.error(n, code, message, f"body.{param}" if param else "body")
        return
    model = body["model"]
    if models is not None and model not in models:
        out.error(n, "model_not_found", f"model {model!r} is not served here; available: {sorted(models)}",
                  "body.model")
        return
    out.model = out.model or model
    out.rows.append((n, cid, json.dumps(body, ensure_ascii=False)))
