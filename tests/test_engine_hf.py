"""The transformers engine in-process on the tiny model, plus its stop-string matcher and detokenizer.

Fast tests of the real engine class (no server): token streaming, abort on close,
seeded and greedy reproducibility, context checks before the first chunk, admission
limits; the stop matcher against a reference over many random splits; the incremental
detokenizer on multi-byte text.
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import Iterator
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from app import metrics
from app.engines.base import (
    EngineNotReadyError,
    GenerationChunk,
    GenerationRequest,
    InvalidRequestError,
    PromptTooLongError,
    QueueFullError,
)
from app.engines.hf import HFEngineConfig, TransformersEngine
from app.engines.text import IncrementalDetokenizer, StopMatcher

# --------------------------------------------------------------------------- stop matcher


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
    text, hit = m.feed("abcdefg")
    assert (text, hit) == ("abcd", False)  # len("STOP") - 1 characters held back
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


# --------------------------------------------------------------------------- detokenizer


@pytest.fixture(scope="module")
def tokenizer(tiny_model: Path):  # type: ignore[no-untyped-def]
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_model)


@pytest.mark.parametrize("text", [
    "The quick brown fox jumps over the lazy dog.",
    "Ünïcödé ✓ 你好 – “quotes” … emoji 🚀 end",
    "tabs\tand\nnewlines  double  spaces",
])
def test_incremental_detokenizer_matches_full_decode(tokenizer, text: str) -> None:  # type: ignore[no-untyped-def]
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    assert len(ids) > 3
    d = IncrementalDetokenizer(tokenizer)
    deltas = [d.push(i) for i in ids]
    out = "".join(deltas) + d.flush()
    assert out == tokenizer.decode(ids, skip_special_tokens=True) == text
    assert not any("\ufffd" in delta for delta in deltas)  # incomplete UTF-8 is held back, not emitted
    assert sum(1 for delta in deltas if delta) > 1  # it really is incremental


def test_detokenizer_flushes_an_incomplete_tail(tokenizer) -> None:  # type: ignore[no-untyped-def]
    ids = tokenizer("🚀", add_special_tokens=False)["input_ids"]  # not in the training text: byte tokens
    assert len(ids) >= 2  # the tiny model's vocabulary is deterministic and has no emoji token
    d = IncrementalDetokenizer(tokenizer)
    assert d.push(ids[0]) == ""  # a lone partial byte sequence is held back
    assert d.flush() != ""  # and not lost when generation ends there


# --------------------------------------------------------------------------- engine


@pytest.fixture(scope="module")
def engine(tiny_model: Path) -> Iterator[TransformersEngine]:
    eng = TransformersEngine(HFEngineConfig(model_id="tiny-inproc", model_source=str(tiny_model), device="cpu",
                                            max_running=1, max_waiting=1, default_max_tokens=16))
    asyncio.run(eng.start())
    yield eng
    asyncio.run(eng.shutdown())


async def _collect(engine: TransformersEngine, **kw: object) -> list[GenerationChunk]:
    return [c async for c in engine.generate(GenerationRequest(**kw))]  # type: ignore[arg-type]


def _aborted() -> float:
    text = metrics.render()[0].decode()
    return sum(s.value for f in text_string_to_metric_families(text) for s in f.samples
               if s.name == "llm_requests_aborted_total" and s.labels.get("model") == "tiny-inproc")


def test_engine_info_after_start(engine: TransformersEngine) -> None:
    assert engine.is_ready()
    assert engine.info.engine == "transformers"
    assert engine.info.max_context == 2048
    assert engine.info.device == "cpu" and engine.info.dtype == "float32"
    asyncio.run(engine.check_health())


async def test_fixed_length_stream_and_cumulative_counts(engine: TransformersEngine) -> None:
    chunks = await _collect(engine, prompt="hello", max_tokens=12, ignore_eos=True)
    assert chunks[-1].finish_reason == "length"
    assert all(c.finish_reason is None for c in chunks[:-1])
    assert chunks[-1].completion_tokens == 12
    counts = [c.completion_tokens for c in chunks]
    assert counts == sorted(counts) and len(chunks) > 3  # one chunk per token with text
    assert {c.prompt_tokens for c in chunks} == {len(engine.tokenizer("hello")["input_ids"])}


async def test_default_max_tokens_applies(engine: TransformersEngine) -> None:
    chunks = await _collect(engine, prompt="hello", ignore_eos=True)
    assert chunks[-1].completion_tokens == 16


async def test_min_tokens_suppresses_early_eos(engine: TransformersEngine) -> None:
    chunks = await _collect(engine, prompt="hello", max_tokens=10, min_tokens=10, temperature=1.0, seed=5)
    assert chunks[-1].completion_tokens == 10


async def test_seeded_sampling_and_greedy_are_reproducible(engine: TransformersEngine) -> None:
    async def text(**kw: object) -> str:
        return "".join(c.text for c in await _collect(engine, prompt="seed test", max_tokens=20,
                                                        ignore_eos=True, **kw))

    assert await text(temperature=1.0, seed=11) == await text(temperature=1.0, seed=11)
    assert await text(temperature=1.0, seed=11) != await text(temperature=1.0, seed=12)
    assert await text(temperature=0.0) == await text(temperature=0.0)
    # a denormal temperature must not overflow the logits into NaN (it was a 500): it is greedy
    assert await text(temperature=1e-40, seed=1) == await text(temperature=0.0)
    assert await text(temperature=0.7, top_p=0.5, seed=3) == await text(temperature=0.7, top_p=0.5, seed=3)


async def test_chat_messages_use_the_chat_template(engine: TransformersEngine) -> None:
    chat = await _collect(engine, messages=[{"role": "user", "content": "hello"}], max_tokens=1)
    raw = await _collect(engine, prompt="hello", max_tokens=1)
    assert chat[-1].prompt_tokens > raw[-1].prompt_tokens  # <|im_start|>user ... <|im_start|>assistant


async def test_stop_string_ends_generation(engine: TransformersEngine) -> None:
    full = "".join(c.text for c in await _collect(engine, prompt="stop test", max_tokens=30, temperature=0.0,
                                                    ignore_eos=True))
    stop = next(full[i : i + 2] for i in range(5, len(full) - 2) if "\ufffd" not in full[i : i + 2])
    chunks = await _collect(engine, prompt="stop test", max_tokens=30, temperature=0.0, ignore_eos=True, stop=[stop])
    assert chunks[-1].finish_reason == "stop"
    assert "".join(c.text for c in chunks) == full[: full.index(stop)]


async def test_errors_surface_before_the_first_chunk(engine: TransformersEngine) -> None:
    with pytest.raises(PromptTooLongError) as exc:
        await _collect(engine, prompt="word " * 3000)
    assert "2048" in exc.value.message and exc.value.param == "prompt"
    with pytest.raises(PromptTooLongError) as exc:
        await _collect(engine, prompt="hi", max_tokens=4000)
    assert exc.value.param == "max_tokens"
    with pytest.raises(InvalidRequestError):
        await _collect(engine, prompt="")
    assert engine.stats().running == 0


async def test_closing_the_stream_aborts_and_frees_the_slot(engine: TransformersEngine) -> None:
    before = _aborted()
    gen = engine.generate(GenerationRequest(prompt="long", max_tokens=2000, ignore_eos=True))
    first = await gen.__anext__()
    assert first.completion_tokens >= 1
    assert engine.stats().running == 1
    await asyncio.wait_for(gen.aclose(), 5)  # returns once the decode thread has really stopped
    assert engine.stats().running == 0
    assert _aborted() == before + 1
    # the slot is free again
    assert (await _collect(engine, prompt="next", max_tokens=2, ignore_eos=True))[-1].completion_tokens == 2


async def test_cancelling_the_consumer_task_aborts(engine: TransformersEngine) -> None:
    before = _aborted()
    started = asyncio.Event()

    async def consume() -> None:
        async for _ in engine.generate(GenerationRequest(prompt="long", max_tokens=2000, ignore_eos=True)):
            started.set()

    task = asyncio.create_task(consume())
    await asyncio.wait_for(started.wait(), 30)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert engine.stats().running == 0
    assert _aborted() == before + 1


async def test_admission_limits_give_queue_full(engine: TransformersEngine) -> None:
    running = engine.generate(GenerationRequest(prompt="a", max_tokens=2000, ignore_eos=True))
    await running.__anext__()
    waiting = asyncio.create_task(_collect(engine, prompt="b", max_tokens=2, ignore_eos=True))
    for _ in range(1000):
        if engine.stats().waiting == 1:
            break
        await asyncio.sleep(0)
    assert engine.stats().waiting == 1
    with pytest.raises(QueueFullError) as exc:
        await _collect(engine, prompt="c", max_tokens=2)
    assert exc.value.retry_after is not None
    await running.aclose()
    assert (await asyncio.wait_for(waiting, 30))[-1].completion_tokens == 2


async def test_not_ready_engine_refuses(tiny_model: Path) -> None:
    eng = TransformersEngine(HFEngineConfig(model_id="cold", model_source=str(tiny_model)))
    assert not eng.is_ready()
    with pytest.raises(EngineNotReadyError):
        await _collect(eng, prompt="x")
    with pytest.raises(EngineNotReadyError):
        await eng.check_health()
