"""Assertions on the OpenAI error shape every server of the kit answers with."""

from __future__ import annotations

from typing import Any

import httpx


def assert_openai_error(resp: httpx.Response, status: int) -> dict[str, Any]:
    assert resp.status_code == status, resp.text[:500]
    assert "Traceback" not in resp.text and 'File "' not in resp.text
    assert "errors.pydantic.dev" not in resp.text and "/site-packages/" not in resp.text
    body = resp.json()
    assert set(body) == {"error"}
    err = body["error"]
    assert set(err) == {"message", "type", "param", "code"}
    assert isinstance(err["message"], str) and err["message"]
    assert isinstance(err["type"], str) and err["type"]
    return err
