"""OpenAI's logprobs shapes, and builders that fill them from engine-neutral `TokenLogprob`s.

Request fields: chat `logprobs: bool` + `top_logprobs: 0..20` (which needs `logprobs: true`), completions
`logprobs: 0..20` (the top count). Responses, streaming and not:
- chat: `choices[i].logprobs = {"content": [{token, logprob, bytes, top_logprobs: [{token, logprob, bytes}]}],
  "refusal": null}`, with exactly the `top_logprobs` most likely tokens per position;
- completions: `choices[i].logprobs = {tokens, token_logprobs, top_logprobs: [{token: logprob}], text_offset}`,
  whose top dicts also hold the chosen token (OpenAI: "up to logprobs+1 elements"), and whose offsets continue
  across stream chunks (`CompletionLogprobsBuilder` keeps the running offset).
-inf (a token the grammar forbids) becomes -9999.0, as OpenAI and vLLM send it.
"""

from __future__ import annotations

import codecs
import math
from collections.abc import Sequence
from typing import Annotated, Literal

from pydantic import BaseModel, Field, ValidationInfo, field_validator

from app.api.strict import INTEGRAL, RequestModel
from app.engines.token_logprobs import MAX_TOP_LOGPROBS, TokenCandidate, TokenLogprob

LOGPROB_FLOOR = -9999.0


def _clamp(logprob: float) -> float:
    return LOGPROB_FLOOR if math.isnan(logprob) else max(logprob, LOGPROB_FLOOR)


# ----------------------------------------------------------------------------- request fields


class ChatLogprobsFields(RequestModel):
    """Chat request fields (mixed into `ChatCompletionRequest` at integration)."""

    logprobs: bool | None = None
    top_logprobs: Annotated[int, Field(ge=0, le=MAX_TOP_LOGPROBS), INTEGRAL] | None = None

    @field_validator("top_logprobs")
    @classmethod
    def _needs_logprobs(cls, v: int | None, info: ValidationInfo) -> int | None:
        if v is not None and not info.data.get("logprobs"):
            raise ValueError("top_logprobs requires logprobs to be true")
        return v

    @property
    def logprobs_k(self) -> int | None:
        """How many top tokens the engine reports per position; None when logprobs are off."""
        return (self.top_logprobs or 0) if self.logprobs else None


class CompletionLogprobsFields(RequestModel):
    """Completions request field (mixed into `CompletionRequest` at integration)."""

    # some clients send `false` for "no logprobs"
    logprobs: Annotated[int, Field(ge=0, le=MAX_TOP_LOGPROBS), INTEGRAL] | Literal[False] | None = None

    @property
    def logprobs_k(self) -> int | None:
        return None if self.logprobs is False else self.logprobs


# ----------------------------------------------------------------------------- chat shapes


class TopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int] | None


class ChatTokenLogprob(TopLogprob):
    top_logprobs: list[TopLogprob]


class ChatChoiceLogprobs(BaseModel):
    content: list[ChatTokenLogprob] | None
    refusal: list[ChatTokenLogprob] | None = None


def _top(c: TokenCandidate) -> TopLogprob:
    return TopLogprob(token=c.token, logprob=_clamp(c.logprob), bytes=list(c.token_bytes))


def chat_logprobs(entries: Sequence[TokenLogprob], top_k: int) -> ChatChoiceLogprobs:
    """`logprobs` of a chat choice (or of one stream chunk: the entries of the tokens it carries)."""
    return ChatChoiceLogprobs(content=[
        ChatTokenLogprob(token=e.chosen.token, logprob=_clamp(e.chosen.logprob), bytes=list(e.chosen.token_bytes),
                         top_logprobs=[_top(c) for c in e.top[:top_k]])
        for e in entries
    ])


# ----------------------------------------------------------------------------- completions shapes


class CompletionLogprobs(BaseModel):
    tokens: list[str]
    token_logprobs: list[float | None]
    top_logprobs: list[dict[str, float] | None]
    text_offset: list[int]


class CompletionLogprobsBuilder:
    """Builds a completion choice's `logprobs`, chunk by chunk: offsets count characters of the generated text
    from `initial_offset` (0 without echo) and continue from one `build` to the next. A character split across
    tokens counts at the token that completes it (the bytes are decoded incrementally, as the text is)."""

    def __init__(self, top_k: int, initial_offset: int = 0):
        self.top_k = top_k
        self.offset = initial_offset
        self._utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def build(self, entries: Sequence[TokenLogprob]) -> CompletionLogprobs:
        out = CompletionLogprobs(tokens=[], token_logprobs=[], top_logprobs=[], text_offset=[])
        for e in entries:
            out.tokens.append(e.chosen.token)
            out.token_logprobs.append(_clamp(e.chosen.logprob))
            top: dict[str, float] = {}
            for c in (*e.top[: self.top_k], e.chosen):
                top[c.token] = max(top.get(c.token, LOGPROB_FLOOR), _clamp(c.logprob))
            out.top_logprobs.append(top)
            out.text_offset.append(self.offset)
            self.offset += len(self._utf8.decode(e.chosen.token_bytes))
        return out
