"""A 3.9 MB prompt is rendered and tokenized off the event loop: /healthz and other streams carry on meanwhile.

The real transformers engine on a tiny model with a 64k context (so the prompt is not refused by its length
alone and really goes through the chat template and the tokenizer), mounted in the one API app and driven
through httpx.ASGITransport. The tokenizer's fast backend is wrapped so the test knows when the 3.9 MB
encode is running: after encoding for real, the wrapper holds the worker thread until the test has seen
/healthz answer and a second request stream to its end. Were tokenization on the event loop, the loop
would be stuck in that hold and neither could answer (the hold gives up after 60 s and the test fails).
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from app.api.app import create_app
from app.api.backend import LocalBackend
from app.engines.base import EngineSpec
from app.engines.hf.engine import TransformersEngine
from app.metrics import PrometheusSink
from app.models.tiny import build_tiny_model

# loads the tiny model into real engines (seconds each): part of the unit layer, not of `tests/run.sh --fast`
pytestmark = pytest.mark.slow

BIG = ("The quick brown fox jumps over the lazy dog. " * 90_000)[:3_900_000]
CONTEXT = 65_536  # 3.9 MB / (29-char longest token x 4) < 64k: only the tokenizer can tell it is too long


class HeldEncoder:
    """Proxy of a `tokenizers.Tokenizer`: a big encode runs for real, then waits for the test's release."""

    def __init__(self, real: Any):
        self.real = real
        self.entered = threading.Event()
        self.encoded = threading.Event()
        self.release = threading.Event()
        self.gave_up = False

    def encode_batch_fast(self, texts: list[str], **kw: Any) -> Any:
        big = sum(len(t) for t in texts) > 1_000_000
        if big:
            self.entered.set()
        out = self.real.encode_batch_fast(texts, **kw)
        if big:
            self.encoded.set()
            self.gave_up = not self.release.wait(60)
        return out

    def __getattr__(self, name: str) -> Any:
        return getattr(self.real, name)


@pytest.fixture(scope="module")
def engine(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TransformersEngine]:
    model = tmp_path_factory.mktemp("models") / "tiny-64k"
    build_tiny_model(model, max_context=CONTEXT)
    spec = EngineSpec(model_id="tiny-64k", model_source=str(model), engine="transformers",
                      engine_kwargs={"device": "cpu", "max_num_seqs": 4}, max_waiting=4)
    eng = TransformersEngine(spec, PrometheusSink())
    asyncio.run(eng.start())
    yield eng
    asyncio.run(eng.shutdown())


async def test_healthz_and_other_streams_answer_while_a_huge_prompt_tokenizes(
        engine: TransformersEngine, monkeypatch: pytest.MonkeyPatch) -> None:
    tok = engine.runner.tokenizer
    held = HeldEncoder(tok._tokenizer)
    monkeypatch.setattr(tok, "_tokenizer", held)
    app = create_app(LocalBackend({"tiny-64k": engine}), manage_backend=False)
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test",
                                 timeout=120) as client:
        big = asyncio.create_task(client.post("/v1/chat/completions", json={
            "model": "tiny-64k", "messages": [{"role": "user", "content": BIG}], "max_tokens": 4}))
        assert await asyncio.to_thread(held.entered.wait, 60), "the big prompt never reached the tokenizer"
        health = await client.get("/healthz")
        assert health.status_code == 200
        body = {"model": "tiny-64k", "prompt": "meanwhile", "max_tokens": 8, "ignore_eos": True, "stream": True}
        async with client.stream("POST", "/v1/completions", json=body) as resp:
            events = [line async for line in resp.aiter_lines() if line.startswith("data: ")]
        assert resp.status_code == 200 and events[-1] == "data: [DONE]" and len(events) >= 3
        assert not big.done() and not held.gave_up  # all of that while the big prompt was still in the tokenizer
        held.release.set()
        answer = await big
    assert not held.gave_up and held.encoded.is_set()
    # 953k tokens: refused by the context after tokenizing, with the count, as a 400 naming `messages`
    assert answer.status_code == 400, answer.text
    error = answer.json()["error"]
    assert error["param"] == "messages" and f"maximum context length is {CONTEXT} tokens" in error["message"]
