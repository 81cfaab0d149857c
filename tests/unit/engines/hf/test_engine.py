"""The transformers engine in-process on the tiny model (real weights, real decode loop, no server).

Token streaming, abort on close, seeded and greedy reproducibility (also with an engine seed), context
checks on the first chunk, admission limits, engine_kwargs it ignores named in its reason. The text
utilities it uses (stop strings, detokenizer) are unit-tested in tests/unit/engines/test_text.py.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from app.engines.base import (
    EngineNotReadyError,
    EngineSpec,
    GenerationChunk,
    GenerationRequest,
    InvalidRequestError,
    PromptTooLongError,
    QueueFullError,
)
from app.engines.hf.engine import TransformersEngine
from app.metrics import PrometheusSink

# loads the tiny model into real engines (seconds each): part of the unit layer, not of `tests/run.sh --fast`
pytestmark = pytest.mark.slow


def _spec(tiny_model: Path, model_id: str = "tiny-inproc", **kwargs: object) -> EngineSpec:
    return EngineSpec(model_id=model_id, model_source=str(tiny_model), engine="transformers",
                      engine_kwargs={"device": "cpu", "max_num_seqs": 1, **kwargs}, max_waiting=1,
                      default_max_tokens=16)

# --------------------------------------------------------------------------- engine


@pytest.fixture(scope="module")
def engine(tiny_model: Path) -> Iterator[TransformersEngine]:
    eng = TransformersEngine(_spec(tiny_model, gpu_memory_utilization=0.9), PrometheusSink(),
                             reason="configured: test")
    asyncio.run(eng.start())
    yield eng
    asyncio.run(eng.shutdown())


async def _collect(engine: TransformersEngine, **kw: object) -> list[GenerationChunk]:
    return [c async for c in engine.generate(GenerationRequest(**kw))]  # type: ignore[arg-type]


def _aborted(engine: TransformersEngine) -> float:
    text = engine.metrics.render()[0].decode()
    return sum(s.value for f in text_string_to_metric_families(text) for s in f.samples
               if s.name == "llm_requests_aborted_total" and s.labels.get("model") == "tiny-inproc")


def test_engine_info_after_start(engine: TransformersEngine) -> None:
    assert engine.is_ready()
    assert engine.info.engine == "transformers"
    assert engine.info.max_context == 2048
    assert engine.info.device == "cpu" and engine.info.dtype == "float32"
    assert engine.info.max_parallel == 2  # max_num_seqs 1 + max_waiting 1
    # a vLLM tuning key is not silently dropped: the reason names it
    assert engine.info.reason == "configured: test; ignores vLLM-only engine_kwargs gpu_memory_utilization"
    asyncio.run(engine.check_health())


async def test_fixed_length_stream_and_cumulative_counts(engine: TransformersEngine) -> None:
    chunks = await _collect(engine, prompt="hello", max_tokens=12, ignore_eos=True)
    assert chunks[-1].finish_reason == "length"
    assert all(c.finish_reason is None for c in chunks[:-1])
    assert chunks[-1].completion_tokens == 12
    counts = [c.completion_tokens for c in chunks]
    assert counts == sorted(counts) and len(chunks) > 3  # one chunk per token with text
    assert {c.prompt_tokens for c in chunks} == {len(engine.runner.tokenizer("hello")["input_ids"])}


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


async def test_errors_surface_on_the_first_chunk(engine: TransformersEngine) -> None:
    stream = engine.generate(GenerationRequest(prompt="word " * 3000))  # calling raises nothing
    with pytest.raises(PromptTooLongError):
        await anext(stream)
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
    before = _aborted(engine)
    gen = engine.generate(GenerationRequest(prompt="long", max_tokens=2000, ignore_eos=True))
    first = await gen.__anext__()
    assert first.completion_tokens >= 1
    assert engine.stats().running == 1
    await asyncio.wait_for(gen.aclose(), 5)  # returns once the decode thread has really stopped
    assert engine.stats().running == 0
    assert _aborted(engine) == before + 1
    # the slot is free again
    assert (await _collect(engine, prompt="next", max_tokens=2, ignore_eos=True))[-1].completion_tokens == 2


async def test_cancelling_the_consumer_task_aborts(engine: TransformersEngine) -> None:
    before = _aborted(engine)
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
    assert _aborted(engine) == before + 1


async def test_admission_limits_give_queue_full(engine: TransformersEngine) -> None:
    running = engine.generate(GenerationRequest(prompt="a", max_tokens=2000, ignore_eos=True))
    await running.__anext__()
    waiting = asyncio.create_task(_collect(engine, prompt="b", max_tokens=2, ignore_eos=True))
    for _ in range(3000):  # its prompt is tokenized in a worker thread first: poll (30 s at most)
        if engine.stats().waiting == 1:
            break
        await asyncio.sleep(0.01)
    assert engine.stats().waiting == 1
    with pytest.raises(QueueFullError) as exc:
        await _collect(engine, prompt="c", max_tokens=2)
    assert exc.value.retry_after is not None
    await running.aclose()
    assert (await asyncio.wait_for(waiting, 30))[-1].completion_tokens == 2


async def test_not_ready_engine_refuses(tiny_model: Path) -> None:
    eng = TransformersEngine(_spec(tiny_model, "cold"))
    assert not eng.is_ready()
    with pytest.raises(EngineNotReadyError):
        await _collect(eng, prompt="x")
    with pytest.raises(EngineNotReadyError):
        await eng.check_health()


async def test_engine_seed_makes_unseeded_requests_reproducible(tiny_model: Path) -> None:
    async def texts() -> list[str]:
        eng = TransformersEngine(_spec(tiny_model, "seeded", seed=123))
        await eng.start()
        try:
            return ["".join(c.text for c in await _collect(eng, prompt="seed", max_tokens=8, ignore_eos=True,
                                                              temperature=1.0)) for _ in range(2)]
        finally:
            await eng.shutdown()

    first, second = await texts(), await texts()
    assert first == second  # same engine seed, same arrival order: same samples
    assert first[0] != first[1]  # but each request draws its own seed
