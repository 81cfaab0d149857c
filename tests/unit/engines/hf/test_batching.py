"""Continuous batching on the tiny model (float32, CPU): batched output == unbatched output, bitwise.

The scheduler is driven step by step from the test (`BatchScheduler.step`), so joins and leaves happen at
chosen step boundaries; the engine-level tests run the real scheduler thread behind `TransformersEngine`.
Every comparison is against the same request run alone.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from prometheus_client.parser import text_string_to_metric_families

from app.engines.base import EngineSpec, GenerationChunk, GenerationRequest
from app.engines.grammar.specs import json_schema_grammar
from app.engines.hf.batching import BatchScheduler, LoopSink, Sequence
from app.engines.hf.engine import TransformersEngine
from app.engines.hf.ragged import GRANULE_CANDIDATES, probe_row_granule
from app.engines.hf.runner import HFEngineConfig, HFModelRunner
from app.engines.hf.sampling import SequenceHook
from app.metrics import PrometheusSink

# loads the tiny model into real engines (seconds each): part of the unit layer, not of `tests/run.sh --fast`
pytestmark = pytest.mark.slow

PROMPTS = ["hello", "The quick brown fox jumps over the lazy dog and keeps running " * 3, "a",
           "nginx upstream failover, Ray Serve replicas and DeepSpeed tensor parallel " * 5, "x y z"]


@pytest.fixture(scope="module")
def runner(tiny_model: Path) -> HFModelRunner:
    r = HFModelRunner(str(tiny_model), HFEngineConfig(device="cpu", max_num_seqs=8), model_id="tiny")
    r.load()
    return r


class RecordRows(SequenceHook):
    """Keeps every logits row the sequence sampled from (the hook point the logprobs capture will use)."""

    def __init__(self) -> None:
        self.rows: list[torch.Tensor] = []

    def observe(self, row: Any, token: int) -> Any:
        self.rows.append(row.clone())
        return len(self.rows) - 1  # rides with the token: the step index


class BanToken(SequenceHook):
    """A per-sequence logits processor: one token id may never be chosen; counts its calls."""

    def __init__(self, token: int) -> None:
        self.token = token
        self.calls = 0
        self.accepted: list[int] = []

    def process(self, row: Any) -> Any:
        self.calls += 1
        row[self.token] = float("-inf")
        return row

    def accept(self, token: int) -> bool:
        self.accepted.append(token)
        return False


class Driver:
    """Steps a scheduler by hand on the test's event loop."""

    def __init__(self, runner: HFModelRunner, prefill_chunk: int = 512, max_num_seqs: int = 8):
        self.runner = runner
        self.model = runner.step_model()
        self.scheduler = BatchScheduler(self.model, max_num_seqs=max_num_seqs, prefill_chunk=prefill_chunk)

    def submit(self, prompt: str, max_new: int = 12, hooks: list[SequenceHook] | None = None,
               **kw: Any) -> Sequence:
        req = GenerationRequest(prompt=prompt, max_tokens=max_new, **{"temperature": 0.0, "ignore_eos": True, **kw})
        seq = Sequence(self.runner.prompt_ids(req), self.runner.sampler(req, max_new, hooks),
                       LoopSink.of(asyncio.get_running_loop()))
        self.scheduler.submit(seq)
        return seq

    async def step(self) -> None:
        with torch.inference_mode():
            self.scheduler.step()
        await asyncio.sleep(0)  # deliver the step's events

    async def until_left(self, *seqs: Sequence, limit: int = 500) -> None:
        for _ in range(limit):
            if all(s.left.is_set() for s in seqs):
                return
            await self.step()
        raise AssertionError("sequences did not finish")


def tokens(seq: Sequence) -> list[int]:
    out = []
    while not seq.queue.empty():
        event = seq.queue.get_nowait()
        if event[0] == "token":
            out.append(event[1])
    return out


async def alone(runner: HFModelRunner, prompt: str, max_new: int = 12, prefill_chunk: int = 512,
                **kw: Any) -> tuple[list[int], list[torch.Tensor]]:
    d = Driver(runner, prefill_chunk)
    rec = RecordRows()
    seq = d.submit(prompt, max_new, [rec], **kw)
    await d.until_left(seq)
    return tokens(seq), rec.rows


# --------------------------------------------------------------------------- the ragged forward


def test_row_granule_makes_every_row_independent_of_the_batch(runner: HFModelRunner) -> None:
    g = probe_row_granule(runner.model, 8)
    assert g in GRANULE_CANDIDATES
    lin = runner.model.lm_head
    x = torch.randn(16, lin.in_features)
    with torch.inference_mode():
        alone_rows = [lin(x[i : i + 1].repeat(g, 1))[0] for i in range(16)]
        for m in range(g, 17, g):
            out = lin(x[:m])
            assert all(torch.equal(out[i], alone_rows[i]) for i in range(m)), m


async def test_batched_logits_are_bitwise_the_unbatched_ones(runner: HFModelRunner) -> None:
    """Five prompts of different lengths join at steps 0, 0, 3, 5 and 9 and leave at different steps."""
    lengths = [12, 20, 6, 16, 9]
    refs = [await alone(runner, p, n) for p, n in zip(PROMPTS, lengths, strict=True)]
    d = Driver(runner)
    joins = {0: [0, 1], 3: [2], 5: [3], 9: [4]}
    seqs: dict[int, Sequence] = {}
    recs = {i: RecordRows() for i in range(len(PROMPTS))}
    batch_sizes = set()
    for step in range(200):
        for i in joins.get(step, []):
            seqs[i] = d.submit(PROMPTS[i], lengths[i], [recs[i]])
        await d.step()
        batch_sizes.add(sum(1 for s in seqs.values() if not s.left.is_set()))
        if len(seqs) == len(PROMPTS) and all(s.left.is_set() for s in seqs.values()):
            break
    assert max(batch_sizes) >= 4  # they really ran together
    for i, (ref_tokens, ref_rows) in enumerate(refs):
        assert tokens(seqs[i]) == ref_tokens, i
        assert len(recs[i].rows) == len(ref_rows) == lengths[i]
        assert all(torch.equal(a, b) for a, b in zip(recs[i].rows, ref_rows, strict=True)), i  # bitwise


async def test_chunked_prefill_interleaves_with_decode_and_changes_nothing(runner: HFModelRunner) -> None:
    long_prompt = PROMPTS[3]
    n_prompt = len(runner.prompt_ids(GenerationRequest(prompt=long_prompt)))
    chunk = 16
    assert n_prompt > 3 * chunk
    ref_long = (await alone(runner, long_prompt, 8, prefill_chunk=chunk))[0]
    ref_short = (await alone(runner, PROMPTS[0], 30, prefill_chunk=chunk))[0]
    d = Driver(runner, prefill_chunk=chunk)
    short = d.submit(PROMPTS[0], 30)
    await d.step()
    long = d.submit(long_prompt, 8)
    seen = [len(tokens_peek(short))]
    while long.prefilled < n_prompt:
        before = long.prefilled
        await d.step()
        assert long.prefilled - before <= chunk  # one chunk per step
        seen.append(len(tokens_peek(short)))
    assert all(b - a == 1 for a, b in itertools.pairwise(seen))  # the short one got a token every step
    await d.until_left(short, long)
    assert tokens(long) == ref_long and tokens(short) == ref_short


def tokens_peek(seq: Sequence) -> list[Any]:
    return [e for e in list(seq.queue._queue) if e[0] == "token"]  # type: ignore[attr-defined]


async def test_sampling_settings_stay_exact_in_a_batch(runner: HFModelRunner) -> None:
    cases: list[dict[str, Any]] = [
        {"temperature": 1.0, "seed": 7},
        {"temperature": 0.8, "top_p": 0.5, "seed": 3},
        {"temperature": 0.0, "presence_penalty": 1.5, "frequency_penalty": 0.7},
        {"temperature": 1.0, "seed": 11, "ignore_eos": False, "min_tokens": 6},
    ]
    refs = [(await alone(runner, PROMPTS[i % len(PROMPTS)], 14, **kw))[0] for i, kw in enumerate(cases)]
    d = Driver(runner)
    seqs = []
    for i, kw in enumerate(cases):
        seqs.append(d.submit(PROMPTS[i % len(PROMPTS)], 14, **kw))
        await d.step()  # each joins one step later
    await d.until_left(*seqs)
    assert [tokens(s) for s in seqs] == refs
    assert len(refs[3]) >= 6  # min_tokens held EOS back


async def test_finished_and_cancelled_sequences_leave_at_the_step_boundary(runner: HFModelRunner) -> None:
    ref_long = (await alone(runner, PROMPTS[1], 20))[0]
    d = Driver(runner)
    short, long, cancelled = d.submit(PROMPTS[0], 2), d.submit(PROMPTS[1], 20), d.submit(PROMPTS[2], 50)
    await d.step()  # prefill of all three (first tokens) + one decode step: the short one is done
    assert short.left.is_set() and len(tokens(short)) == 2
    assert not long.left.is_set()
    await d.step()
    d.scheduler.cancel(cancelled)
    assert not cancelled.left.is_set()
    got = len(tokens_peek(cancelled))
    await d.step()  # leaves at this boundary, before the forward
    assert cancelled.left.is_set() and len(tokens_peek(cancelled)) == got
    assert d.scheduler.live == [long]
    await d.until_left(long)
    assert tokens(long) == ref_long  # the others leaving changed nothing for it


async def test_hooks_are_per_sequence_and_extras_ride_with_tokens(runner: HFModelRunner) -> None:
    ref_tokens, _ = await alone(runner, PROMPTS[0], 12)
    banned = ref_tokens[3]
    hooked_ref, _ = await alone_with(runner, PROMPTS[0], [BanToken(banned)])
    assert banned not in hooked_ref and hooked_ref != ref_tokens
    d = Driver(runner)
    ban, rec = BanToken(banned), RecordRows()
    with_hook = d.submit(PROMPTS[0], 12, [ban, rec])
    without = d.submit(PROMPTS[0], 12)
    await d.until_left(with_hook, without)
    events = [e for e in list(with_hook.queue._queue) if e[0] == "token"]  # type: ignore[attr-defined]
    assert [e[1] for e in events] == hooked_ref  # same as the hooked request alone
    assert [e[3] for e in events] == [[None, i] for i in range(12)]  # one extra per hook, in token order
    assert ban.calls == 12 and ban.accepted == hooked_ref
    assert all(row[banned] == float("-inf") for row in rec.rows)  # observe sees the processed row
    assert tokens(without) == ref_tokens  # its neighbour in the batch is untouched


async def alone_with(runner: HFModelRunner, prompt: str, hooks: list[SequenceHook]) -> tuple[list[int], None]:
    d = Driver(runner)
    seq = d.submit(prompt, 12, hooks)
    await d.until_left(seq)
    return tokens(seq), None


# --------------------------------------------------------------------------- the engine


def _spec(tiny_model: Path, **kwargs: object) -> EngineSpec:
    return EngineSpec(model_id="tiny-batch", model_source=str(tiny_model), engine="transformers",
                      engine_kwargs={"device": "cpu", "max_num_seqs": 8, **kwargs}, max_waiting=8,
                      default_max_tokens=16)


@pytest.fixture(scope="module")
def engine(tiny_model: Path) -> Iterator[TransformersEngine]:
    eng = TransformersEngine(_spec(tiny_model), PrometheusSink())
    asyncio.run(eng.start())
    yield eng
    asyncio.run(eng.shutdown())


async def _text(engine: TransformersEngine, **kw: Any) -> str:
    return "".join(c.text for c in [c async for c in engine.generate(GenerationRequest(**kw))])


def _batch_counts(engine: TransformersEngine) -> dict[float, float]:
    text = engine.metrics.render()[0].decode()
    return {float(s.labels["le"]): s.value for f in text_string_to_metric_families(text) for s in f.samples
            if s.name == "llm_decode_batch_size_bucket" and s.labels.get("model") == "tiny-batch"}


async def test_engine_greedy_output_is_the_same_alone_or_concurrent(engine: TransformersEngine) -> None:
    reqs = [{"prompt": p, "max_tokens": 10 + 3 * i, "temperature": 0.0, "ignore_eos": True}
            for i, p in enumerate(PROMPTS)]
    refs = [await _text(engine, **r) for r in reqs]
    before = _batch_counts(engine)
    assert await asyncio.gather(*(_text(engine, **r) for r in reqs)) == refs
    after = _batch_counts(engine)
    assert after[1.0] - before.get(1.0, 0) < after[float("inf")] - before.get(float("inf"), 0)  # steps of >1


async def _chunks(engine: TransformersEngine, **kw: Any) -> tuple[str, list[Any]]:
    chunks = [c async for c in engine.generate(GenerationRequest(**kw))]
    return "".join(c.text for c in chunks), [e for c in chunks for e in c.logprobs or ()]


async def test_grammar_and_logprobs_are_the_same_alone_or_batched(engine: TransformersEngine) -> None:
    """The issue-14 primitives as batched-sampler hooks: a JSON-schema grammar and top-3 logprobs give the
    same text and the same logprob entries whether the request ran alone or among plain and other
    constrained requests."""
    schema = {"type": "object", "properties": {"n": {"type": "integer"}, "tag": {"enum": ["red", "green"]}},
              "required": ["n", "tag"], "additionalProperties": False}
    grammar = json_schema_grammar(schema, param="response_format", any_whitespace=False)
    reqs: list[dict[str, Any]] = [
        {"prompt": PROMPTS[0], "max_tokens": 160, "temperature": 1.0, "seed": 5, "grammar": grammar, "logprobs": 3},
        {"prompt": PROMPTS[1], "max_tokens": 24, "temperature": 0.0, "ignore_eos": True},
        {"prompt": PROMPTS[2], "max_tokens": 160, "temperature": 1.0, "seed": 9, "grammar": grammar},
        {"prompt": PROMPTS[3], "max_tokens": 20, "temperature": 0.0, "ignore_eos": True, "logprobs": 2},
    ]
    refs = [await _chunks(engine, **r) for r in reqs]
    assert await asyncio.gather(*(_chunks(engine, **r) for r in reqs)) == refs
    assert json.loads(refs[0][0]).keys() == {"n", "tag"} and json.loads(refs[2][0]).keys() == {"n", "tag"}
    assert len(refs[0][1]) >= 1 and all(len(e.top) == 3 for e in refs[0][1])
    assert len(refs[3][1]) == 20 and all(len(e.top) == 2 for e in refs[3][1])
    assert refs[1][1] == [] and refs[2][1] == []


async def test_engine_disconnect_stops_a_batched_sequence(engine: TransformersEngine) -> None:
    ref = await _text(engine, prompt="other", max_tokens=40, temperature=0.0, ignore_eos=True)
    other = asyncio.create_task(_text(engine, prompt="other", max_tokens=40, temperature=0.0, ignore_eos=True))
    gen = engine.generate(GenerationRequest(prompt="long", max_tokens=2000, ignore_eos=True))
    first: GenerationChunk = await anext(gen)
    assert first.completion_tokens >= 1 and engine.stats().running == 2
    await asyncio.wait_for(gen.aclose(), 10)  # returns once the sequence has left the batch
    assert engine.stats().running <= 1
    assert await other == ref


async def test_prompt_tokenization_runs_off_the_event_loop(engine: TransformersEngine,
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    """While one request's prompt is being tokenized (held inside the tokenizer), another stream goes on."""
    entered, release = threading.Event(), threading.Event()
    real = engine.runner.prompt_ids

    def slow_prompt_ids(req: GenerationRequest) -> list[int]:
        if req.prompt == "BIG":
            entered.set()
            assert release.wait(30)
        return real(req)

    monkeypatch.setattr(engine.runner, "prompt_ids", slow_prompt_ids)
    big = asyncio.create_task(_text(engine, prompt="BIG", max_tokens=3, ignore_eos=True))
    await asyncio.to_thread(entered.wait, 30)
    chunks = [c async for c in engine.generate(GenerationRequest(prompt="meanwhile", max_tokens=8,
                                                                    ignore_eos=True))]
    assert chunks[-1].completion_tokens == 8 and not big.done()  # streamed while BIG was still tokenizing
    release.set()
    assert len(await big) > 0


def test_an_impossible_prompt_is_refused_before_tokenization(runner: HFModelRunner) -> None:
    from app.engines.base import PromptTooLongError

    with pytest.raises(PromptTooLongError) as exc:
        runner.prompt_ids(GenerationRequest(prompt="word " * 800_000))  # 4 MB
    assert "at least" in exc.value.message and exc.value.param == "prompt"
    with pytest.raises(PromptTooLongError) as exc:  # within the length bound: tokenized, then refused
        runner.prompt_ids(GenerationRequest(prompt="word " * 3000))
    assert "maximum context length is 2048" in exc.value.message and "at least" not in exc.value.message
