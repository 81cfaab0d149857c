"""Prompt and output text for the engines that tokenize themselves (transformers, DeepSpeed TP, vLLM).

- `render_prompt`: a request's messages (chat template) or prompt as token ids. With `max_tokens` a prompt
  that cannot fit is refused before tokenization when its length alone proves it (`max_token_chars`: no
  token covers more characters than the longest vocabulary entry), else before its ids are materialised.
  Fast tokenizers encode through `encode_batch_fast`, which releases the GIL, so a large prompt tokenized in
  a worker thread does not stall the event loop (plain `tokenizer(text)` holds the GIL: 2.5 s for 3.9 MB).
- `token_budget`: how many tokens a request may generate within the model's context, or a 400 naming the limit.
- `ChunkAssembler`: generated token ids in, `GenerationChunk`s out (incremental detokenizing that never cuts a
  UTF-8 sequence, stop strings matched on text with a partial match held back, nothing lost at the end).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

from app.engines.base import (
    FinishReason,
    GenerationChunk,
    GenerationRequest,
    InvalidRequestError,
    PromptTooLongError,
    TokenLogprob,
)

log = logging.getLogger(__name__)

_fallback_template_warned: set[str] = set()
# a normalizer (NFC, as Qwen's) may compose up to ~3 characters into one before tokens are cut: the length bound
# counts each token as covering NORMALIZE_SLACK times the longest vocabulary entry
NORMALIZE_SLACK = 4


def render_prompt(tokenizer: Any, req: GenerationRequest, model_id: str, *, plain_chat_fallback: bool,
                  max_tokens: int | None = None, max_token_chars: int = 0) -> list[int]:
    """Token ids for the request. Without a chat template, chat requests use a plain `role: content` layout
    when `plain_chat_fallback` (warned once per model) and are refused with a 400 otherwise. With `max_tokens`,
    a prompt longer than that is a PromptTooLongError (a 400 naming the context)."""
    if req.messages is not None:
        if getattr(tokenizer, "chat_template", None):
            text = tokenizer.apply_chat_template(req.messages, tools=req.tools, add_generation_prompt=True,
                                                 tokenize=False)
        elif plain_chat_fallback:
            if model_id not in _fallback_template_warned:
                log.warning("tokenizer of %s has no chat template; using a plain one", model_id)
                _fallback_template_warned.add(model_id)
            text = "".join(f"{m['role']}: {m.get('content') or ''}\n" for m in req.messages) + "assistant:"
        else:
            raise InvalidRequestError(f"model {model_id} has no chat template: use /v1/completions", param="messages")
    else:
        text = req.prompt or ""
    param = "messages" if req.messages is not None else "prompt"
    if max_tokens is not None and max_token_chars and len(text) > max_tokens * max_token_chars * NORMALIZE_SLACK:
        least = -(-len(text) // (max_token_chars * NORMALIZE_SLACK))
        raise PromptTooLongError(
            f"this model's maximum context length is {max_tokens + 1} tokens; the prompt has at least {least} "
            f"tokens ({len(text)} characters)", param=param)
    ids = encode_text(tokenizer, text, add_special_tokens=req.messages is None, max_tokens=max_tokens, param=param)
    if not ids:
        raise InvalidRequestError("the prompt is empty after tokenization", param="prompt")
    return ids


def encode_text(tokenizer: Any, text: str, *, add_special_tokens: bool, max_tokens: int | None = None,
                param: str = "prompt") -> list[int]:
    """`tokenizer(text)["input_ids"]`, through the fast backend when there is one (GIL released while encoding;
    an over-long result is refused without building its id list)."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None or not hasattr(backend, "encode_batch_fast"):
        ids: list[int] = tokenizer(text, add_special_tokens=add_special_tokens)["input_ids"]
        n = len(ids)
    else:
        encoding = backend.encode_batch_fast([text], add_special_tokens=add_special_tokens)[0]
        n = len(encoding)
        ids = [] if max_tokens is not None and n > max_tokens else encoding.ids
    if max_tokens is not None and n > max_tokens:
        raise PromptTooLongError(
            f"this model's maximum context length is {max_tokens + 1} tokens; the prompt has {n} tokens", param=param)
    return ids


def max_token_chars(tokenizer: Any) -> int:
    """Characters of the longest vocabulary entry (added tokens included): no token covers more of a text."""
    try:
        vocab = tokenizer.get_vocab()
    except Exception:  # a tokenizer without a vocabulary listing: no bound
        return 0
    return max((len(t) for t in vocab), default=0)


def token_budget(prompt_len: int, req: GenerationRequest, max_context: int, default_max_tokens: int) -> int:
    """max_tokens for this request; PromptTooLongError when the prompt (plus max_tokens) exceeds the context."""
    param = "messages" if req.messages is not None else "prompt"
    if prompt_len >= max_context:
        raise PromptTooLongError(
            f"this model's maximum context length is {max_context} tokens; the prompt has {prompt_len} tokens",
            param=param,
        )
    room = max_context - prompt_len
    if req.max_tokens is None:
        return min(room, default_max_tokens)
    if req.max_tokens > room:
        raise PromptTooLongError(
            f"this model's maximum context length is {max_context} tokens; the prompt has {prompt_len} tokens "
            f"and max_tokens is {req.max_tokens} (at most {room} fit)",
            param="max_tokens",
        )
    return req.max_tokens


class IncrementalDetokenizer:
    """Turns a growing list of token ids into text deltas without re-decoding everything.

    Holds back output while the tail decodes to an incomplete UTF-8 sequence (U+FFFD). Per token it decodes the
    window since the last emitted text once; the text of the window before it (`prev`) changes only when text is
    emitted, so it is decoded then, not on every token. A fast tokenizer decodes through its Rust backend
    directly when the Python wrapper would add nothing (no `clean_up_tokenization_spaces`): the wrapper costs ~3x
    the decode itself, twice per token before.
    """

    def __init__(self, tokenizer: Any):
        self.tok = tokenizer
        self.ids: list[int] = []
        self.prefix = 0
        self.read = 0
        self._prev = ""  # the text of ids[prefix:read]
        backend = getattr(tokenizer, "backend_tokenizer", None)
        self._decode: Callable[[list[int]], str]
        if backend is not None and not getattr(tokenizer, "clean_up_tokenization_spaces", True):
            self._decode = lambda ids: backend.decode(ids, skip_special_tokens=True)
        else:
            self._decode = lambda ids: tokenizer.decode(ids, skip_special_tokens=True)

    def push(self, token_id: int) -> str:
        self.ids.append(token_id)
        full = self._decode(self.ids[self.prefix :])
        if len(full) > len(self._prev) and not full.endswith("\ufffd"):
            delta = full[len(self._prev) :]
            self.prefix, self.read = self.read, len(self.ids)
            self._prev = self._decode(self.ids[self.prefix : self.read])
            return delta
        return ""

    def flush(self) -> str:
        """At the end of generation: whatever is still held back (an incomplete sequence stays U+FFFD)."""
        full = self._decode(self.ids[self.prefix :])
        prev = self._prev
        self.prefix = self.read = len(self.ids)
        self._prev = ""
        return full[len(prev) :] if len(full) > len(prev) else ""


class StopMatcher:
    """Finds stop strings in streamed text, holding back a possible partial match."""

    def __init__(self, stops: list[str]):
        self.stops = stops
        self.hold = max((len(s) for s in stops), default=1) - 1
        self.text = ""
        self.emitted = 0

    def feed(self, delta: str) -> tuple[str, bool]:
        """Returns (text safe to emit now, stop found)."""
        self.text += delta
        if self.stops:
            start = max(0, self.emitted - self.hold)
            hits = [i for i in (self.text.find(s, start) for s in self.stops) if i >= 0]
            if hits:
                cut = min(hits)
                out = self.text[self.emitted : cut] if cut > self.emitted else ""
                self.emitted = max(self.emitted, cut)
                return out, True
        safe = len(self.text) - self.hold if self.stops else len(self.text)
        if safe > self.emitted:
            out = self.text[self.emitted : safe]
            self.emitted = safe
            return out, False
        return "", False

    def flush(self) -> str:
        out = self.text[self.emitted :]
        self.emitted = len(self.text)
        return out


class ChunkAssembler:
    """Generated token ids in, `GenerationChunk`s out, for one request.

    `push(token, finish, logprob)` takes each token with the engine's finish reason (None, "stop" for EOS,
    "length") and, when the request asked for logprobs, its `TokenLogprob`; it returns the chunk to send now, or
    None while text is held back (held-back tokens' logprobs go out with the next chunk). Once `done` is set the
    request is complete (its final chunk carried the finish reason: "stop" also when a stop string matched).
    """

    def __init__(self, tokenizer: Any, stops: list[str], prompt_tokens: int):
        self._detok = IncrementalDetokenizer(tokenizer)
        self._stops = StopMatcher(stops)
        self.prompt_tokens = prompt_tokens
        self.completion_tokens = 0
        self.done = False
        self._logprobs: list[TokenLogprob] = []

    def push(self, token: int, finish: FinishReason | None, logprob: TokenLogprob | None = None
             ) -> GenerationChunk | None:
        self.completion_tokens += 1
        if logprob is not None:
            self._logprobs.append(logprob)
        text, hit = self._stops.feed(self._detok.push(token))
        if finish and not hit:  # text the detokenizer held back would otherwise be lost
            more, hit = self._stops.feed(self._detok.flush())
            text += more
        if hit:
            self.done = True
            return self._chunk(text, "stop")
        if finish:
            self.done = True
            return self._chunk(text + self._stops.flush(), finish)
        return self._chunk(text, None) if text else None

    def _chunk(self, text: str, finish: FinishReason | None) -> GenerationChunk:
        logprobs, self._logprobs = (self._logprobs or None), []
        return GenerationChunk(text, self.prompt_tokens, self.completion_tokens, finish, logprobs=logprobs)
