"""The per-token stream payloads built as plain dicts (app/api/openai.py) are the models' own dumps, key order too.

The streaming paths skip pydantic per token (20-30 µs of the API process's CPU each); these checks hold the dicts
to what `CompletionResponse` / `ChatCompletionChunk` dump for the same chunk, so the wire bytes are unchanged.
"""

from __future__ import annotations

import json

import pytest

from app.api.openai import _chat_chunk, chat_finish_frame, chat_frame, completion_frame
from app.api.protocol import ChatChunkChoice, ChatCompletionChunk, ChatDelta, CompletionChoice, CompletionResponse


def _same(a: dict, b: dict) -> None:
    assert json.dumps(a) == json.dumps(b)  # equal values and the same key order (the SSE bytes)


@pytest.mark.parametrize(("idx", "text", "finish"), [(0, "abc", None), (3, "", None), (1, "", "stop"),
                                                     (0, "x\u2028y", "length")])
def test_completion_frame_is_the_models_dump(idx: int, text: str, finish: str | None) -> None:
    head = CompletionResponse(id="cmpl-1", created=7, model="tiny", choices=[]).model_dump(exclude={"usage"})
    model = CompletionResponse(id="cmpl-1", created=7, model="tiny", choices=[
        CompletionChoice(index=idx, text=text, finish_reason=finish)]).model_dump(exclude={"usage"})
    _same(completion_frame(head, idx, text, finish), model)


@pytest.mark.parametrize(("idx", "text", "first"), [(0, "abc", True), (0, "", True), (2, "de", False),
                                                    (1, "", False)])
def test_chat_frame_is_the_models_dump(idx: int, text: str, first: bool) -> None:
    head = ChatCompletionChunk(id="chatcmpl-1", created=7, model="tiny", choices=[]).model_dump(exclude_none=True)
    delta = ChatDelta(role="assistant" if first else None, content=text)
    _same(chat_frame(head, idx, text, first), _chat_chunk("chatcmpl-1", 7, "tiny", ChatChunkChoice(index=idx,
                                                                                                    delta=delta)))


@pytest.mark.parametrize("reason", ["stop", "length", "tool_calls", None])
def test_chat_finish_frame_is_the_models_dump(reason: str | None) -> None:
    head = ChatCompletionChunk(id="chatcmpl-1", created=7, model="tiny", choices=[]).model_dump(exclude_none=True)
    _same(chat_finish_frame(head, 4, reason), _chat_chunk("chatcmpl-1", 7, "tiny", ChatChunkChoice(
        index=4, delta=ChatDelta(), finish_reason=reason)))
