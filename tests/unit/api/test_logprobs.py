"""Logprobs: token texts from exact bytes, top-k selection, and OpenAI's chat and completions shapes."""

from __future__ import annotations

import math
import pickle

import pytest
import torch

from app.api.logprobs import ChatChoiceLogprobs, CompletionLogprobsBuilder, chat_logprobs
from app.engines.token_logprobs import TokenLogprob, TokenTexts, batch_top_logprobs, top_logprobs

pytestmark = pytest.mark.unit

# id: bytes, as a tokenizer's decoded vocabulary gives them ("é" is 0xc3 0xa9, split over ids 3 and 4)
VOCAB = [b"Hello", b" world", b"!", b"\xc3", b"\xa9", b"<|im_end|>"]


def texts() -> TokenTexts:
    return TokenTexts(VOCAB)


def test_token_text_and_bytes() -> None:
    t = texts()
    assert t.text(1) == " world" and t.token_bytes(1) == b" world"
    assert t.text(3) == "bytes:\\xc3" and t.token_bytes(3) == b"\xc3"  # OpenAI's notation for part of a character
    assert t.text(5) == "<|im_end|>"
    assert t.text(99) == "" and t.token_bytes(99) == b""


def test_entry_keeps_the_k_most_likely_whatever_the_input_order() -> None:
    # vLLM's logprob dicts hold the sampled token first, then the top-k
    entry = texts().entry(2, -3.0, [(2, -3.0), (0, -0.1), (1, -1.5), (5, -2.0)], k=2)
    assert entry.chosen.token == "!" and entry.chosen.logprob == -3.0
    assert [c.token_id for c in entry.top] == [0, 1]
    assert pickle.loads(pickle.dumps(entry)) == entry


def test_top_logprobs_of_a_row_and_of_a_batch_agree() -> None:
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(3, len(VOCAB), generator=gen)
    logits[1, 4] = float("-inf")  # a token a grammar forbids
    lp = torch.log_softmax(logits, dim=-1)
    chosen, value, pairs = top_logprobs(logits[0], 2, 3)
    assert chosen == 2 and math.isclose(value, float(lp[0, 2]), rel_tol=1e-6)
    assert [i for i, _ in pairs] == torch.topk(lp[0], 3).indices.tolist()
    batch = batch_top_logprobs(logits, [2, 4, 0], [3, len(VOCAB), None])
    assert batch[0] == (chosen, value, pairs)
    assert batch[2] is None
    assert batch[1] is not None and batch[1][1] == float("-inf") and batch[1][2][-1] == (4, float("-inf"))
    assert top_logprobs(logits[0], 1, 0)[2] == []


def entries() -> list[TokenLogprob]:
    t = texts()
    return [
        t.entry(0, -0.5, [(0, -0.5), (1, -1.0), (2, -2.0)], k=2),
        t.entry(3, -0.25, [(3, -0.25), (4, float("-inf"))], k=2),
        t.entry(4, -0.75, [(1, -0.5), (4, -0.75)], k=2),
    ]


def test_chat_shape() -> None:
    out = chat_logprobs(entries(), top_k=2)
    assert isinstance(out, ChatChoiceLogprobs) and out.refusal is None
    first, second, third = out.content or []
    assert first.model_dump() == {
        "token": "Hello", "logprob": -0.5, "bytes": list(b"Hello"),
        "top_logprobs": [{"token": "Hello", "logprob": -0.5, "bytes": list(b"Hello")},
                         {"token": " world", "logprob": -1.0, "bytes": list(b" world")}],
    }
    assert second.top_logprobs[1].logprob == -9999.0  # -inf cannot be JSON
    assert b"".join(bytes(e.bytes or []) for e in (second, third)).decode() == "é"
    assert chat_logprobs(entries(), top_k=0).content[0].top_logprobs == []  # type: ignore[index]


def test_completions_shape_and_offsets_across_stream_chunks() -> None:
    whole = CompletionLogprobsBuilder(top_k=1).build(entries())
    assert whole.tokens == ["Hello", "bytes:\\xc3", "bytes:\\xa9"]
    assert whole.token_logprobs == [-0.5, -0.25, -0.75]
    # the top-k plus the chosen token, keyed by token text
    assert whole.top_logprobs == [{"Hello": -0.5}, {"bytes:\\xc3": -0.25}, {" world": -0.5, "bytes:\\xa9": -0.75}]
    # "Hello" is 5 characters; "é" counts once, at the token that completes it
    assert whole.text_offset == [0, 5, 5]
    builder = CompletionLogprobsBuilder(top_k=1, initial_offset=0)
    parts = [builder.build(entries()[:1]), builder.build(entries()[1:2]), builder.build(entries()[2:])]
    assert [o for p in parts for o in p.text_offset] == whole.text_offset
    assert builder.offset == len("Helloé")
