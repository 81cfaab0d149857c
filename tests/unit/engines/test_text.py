"""Prompt/output text utilities of the engines, in process: stop strings, detokenizing, chunk assembly, budgets.

The stop matcher is checked against a reference over many random splits; the detokenizer and the chunk
assembler run on the tiny model's byte-level BPE tokenizer, trained in process (no model, no subprocess).
"""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import pytest

from app.engines.base import GenerationRequest, InvalidRequestError, PromptTooLongError
from app.engines.text import ChunkAssembler, IncrementalDetokenizer, StopMatcher, render_prompt, token_budget


def _run_matcher(stops: list[str], pieces: list[str]) -> tuple[str, bool]:
    m = StopMatcher(stops)
    out = ""
    for piece in pieces:
        text, hit = m.feed(piece)
        out += text
        if hit:
            return out, True
    return out + m.flush(), False


def _split(text: str, rng: random.Random) -> list[str]:
    pieces, i = [], 0
    while i < len(text):
        n = rng.randint(0, 4)  # empty deltas happen (held-back bytes)
        pieces.append(text[i : i + n])
        i += n
    return pieces


@pytest.mark.parametrize(("stops", "pieces", "expected"), [
    ([], ["ab", "cd"], ("abcd", False)),
    (["STOP"], ["hello ST", "OP world"], ("hello ", True)),
    (["STOP"], ["hello ST", "AR"], ("hello STAR", False)),  # a partial match is released at the end
    (["\n\n", "###"], ["a\n", "b##", "#c"], ("a\nb", True)),
    (["end"], ["the end"], ("the ", True)),
    (["x"], ["x"], ("", True)),  # stop at the very start: empty output
    (["abcd", "c"], ["a", "b", "c", "d"], ("ab", True)),  # the first stop to complete wins
])
def test_stop_matcher_cases(stops: list[str], pieces: list[str], expected: tuple[str, bool]) -> None:
    assert _run_matcher(stops, pieces) == expected


def test_stop_matcher_holds_back_only_possible_stop_prefixes() -> None:
    m = StopMatcher(["STOP"])
    assert m.feed("abcdefg") == ("abcd", False)  # len("STOP") - 1 characters held back
    assert m.feed("S") == ("e", False)
    assert m.feed("TOP") == ("fg", True)


def test_stop_matcher_against_reference_on_random_splits() -> None:
    rng = random.Random(1)
    alphabet = "ab c\n"
    for _ in range(3000):
        text = "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 30)))
        stops = ["".join(rng.choice(alphabet) for _ in range(rng.randint(1, 4))) for _ in range(rng.randint(1, 3))]
        out, hit = _run_matcher(stops, _split(text, rng))
        assert text.startswith(out)
        assert not any(s in out for s in stops), (text, stops, out)  # no stop text in the output
        if hit:
            assert any(text[len(out) :].startswith(s) for s in stops), (text, stops, out)
        else:
            assert out == text
            assert not any(s in text for s in stops)
        # char by char, the stop that completes first ends the output
        out1, hit1 = _run_matcher(stops, list(text))
        occurrences = [(text.find(s) + len(s), text.find(s)) for s in stops if s in text]
        if occurrences:
            _, first = min(occurrences)  # earliest end; among those, the earliest start
            assert hit1 and out1 == text[:first], (text, stops, out1)
        else:
            assert not hit1 and out1 == text


# --------------------------------------------------------------------------- with the tiny tokenizer


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory: pytest.TempPathFactory) -> Any:
    from transformers import AutoTokenizer

    from app.models.tiny import build_tokenizer

    folder: Path = tmp_path_factory.mktemp("tokenizer")
    build_tokenizer(folder)
    return AutoTokenizer.from_pretrained(folder)


@pytest.mark.parametrize("text", [
    "The quick brown fox jumps over the lazy dog.",
    "Ünïcödé ✓ 你好 – “quotes” … emoji 🚀 end",
    "tabs\tand\nnewlines  double  spaces",
])
def test_incremental_detokenizer_matches_full_decode(tokenizer: Any, text: str) -> None:
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    assert len(ids) > 3
    d = IncrementalDetokenizer(tokenizer)
    deltas = [d.push(i) for i in ids]
    out = "".join(deltas) + d.flush()
    assert out == tokenizer.decode(ids, skip_special_tokens=True) == text
    assert not any("\ufffd" in delta for delta in deltas)  # incomplete UTF-8 is held back, not emitted
    assert sum(1 for delta in deltas if delta) > 1  # it really is incremental


def test_detokenizer_flushes_an_incomplete_tail(tokenizer: Any) -> None:
    ids = tokenizer("🚀", add_special_tokens=False)["input_ids"]  # not in the training text: byte tokens
    assert len(ids) >= 2
    d = IncrementalDetokenizer(tokenizer)
    assert d.push(ids[0]) == ""  # a lone partial byte sequence is held back
    assert d.flush() != ""  # and not lost when generation ends there


def test_chunk_assembler_stop_string_and_final_flush(tokenizer: Any) -> None:
    text = "alpha beta gamma delta"
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    stopped = ChunkAssembler(tokenizer, ["gamma"], prompt_tokens=7)
    chunks = [c for c in (stopped.push(t, None) for t in ids) if c is not None]
    assert stopped.done and chunks[-1].finish_reason == "stop"
    assert "".join(c.text for c in chunks) == "alpha beta "
    assert {c.prompt_tokens for c in chunks} == {7}
    full = ChunkAssembler(tokenizer, [], prompt_tokens=1)
    out = [full.push(t, "length" if i == len(ids) - 1 else None) for i, t in enumerate(ids)]
    assert "".join(c.text for c in out if c) == text and out[-1] is not None and out[-1].finish_reason == "length"
    assert out[-1].completion_tokens == len(ids)


def test_render_prompt_chat_template_and_empty_prompt(tokenizer: Any) -> None:
    plain = render_prompt(tokenizer, GenerationRequest(prompt="hello"), "m", plain_chat_fallback=True)
    chat = render_prompt(tokenizer, GenerationRequest(messages=[{"role": "user", "content": "hello"}]), "m",
                         plain_chat_fallback=True)
    assert len(chat) > len(plain)
    with pytest.raises(InvalidRequestError, match="empty"):
        render_prompt(tokenizer, GenerationRequest(prompt=""), "m", plain_chat_fallback=True)


def test_token_budget_against_the_context() -> None:
    assert token_budget(10, GenerationRequest(prompt="x"), 100, 256) == 90
    assert token_budget(10, GenerationRequest(prompt="x"), 1000, 256) == 256
    assert token_budget(10, GenerationRequest(prompt="x", max_tokens=90), 100, 256) == 90
    with pytest.raises(PromptTooLongError, match="at most 90 fit") as exc:
        token_budget(10, GenerationRequest(prompt="x", max_tokens=91), 100, 256)
    assert exc.value.param == "max_tokens"
    with pytest.raises(PromptTooLongError) as exc:
        token_budget(100, GenerationRequest(messages=[{"role": "user", "content": "x"}]), 100, 256)
    assert exc.value.param == "messages" and exc.value.code == "context_length_exceeded"


def _reference_deltas(tokenizer: Any, ids: list[int]) -> list[str]:
    """The detokenizing rule stated plainly (both windows decoded by the tokenizer on every token)."""
    out, prefix, read = [], 0, 0
    for n in range(1, len(ids) + 1):
        prev = tokenizer.decode(ids[prefix:read], skip_special_tokens=True)
        full = tokenizer.decode(ids[prefix:n], skip_special_tokens=True)
        if len(full) > len(prev) and not full.endswith("\ufffd"):
            out.append(full[len(prev):])
            prefix, read = read, n
        else:
            out.append("")
    prev = tokenizer.decode(ids[prefix:read], skip_special_tokens=True)
    full = tokenizer.decode(ids[prefix:], skip_special_tokens=True)
    out.append(full[len(prev):] if len(full) > len(prev) else "")
    return out


def test_detokenizer_gives_the_reference_deltas_on_random_ids(tokenizer: Any) -> None:
    """The cached, backend-decoding detokenizer emits exactly what decoding both windows every token emits,
    on random ids (partial UTF-8 byte tokens, special tokens) as well as on text."""
    rng = random.Random(7)
    vocab = len(tokenizer)
    special = list(tokenizer.all_special_ids)
    for _ in range(40):
        ids = [rng.choice(special) if rng.random() < 0.05 else rng.randrange(vocab) for _ in range(rng.randint(1, 40))]
        d = IncrementalDetokenizer(tokenizer)
        assert [d.push(i) for i in ids] + [d.flush()] == _reference_deltas(tokenizer, ids), ids
