"""An engine of the engine protocol with no model: what the API layer costs on its own, and the unit layer's engine.

`FakeEngine` "generates" numbered words (`w0 w1 ...`, one token each), admits requests through the real
`AdmissionController` (so 429s are real), and can be told to fail on the first chunk or mid-stream, or to
hold every token until a gate opens. It records what it was asked and how its streams ended. bench/api_overhead.py
measures the API per token against it; tests/unit drive the API router with it (the router is what is tested).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncGenerator

from app.engines.admission import AdmissionController
from app.engines.base import (
    Engine,
    EngineError,
    EngineInfo,
    EngineNotReadyError,
    EngineStats,
    GenerationChunk,
    GenerationRequest,
    PromptTooLongError,
)
from app.metrics import PrometheusSink


class FakeEngine(Engine):
    def __init__(self, model_id: str = "fake", *, metrics: PrometheusSink, max_num_seqs: int = 2,
                 max_waiting: int = 2, max_context: int = 64, default_max_tokens: int = 4):
        self.info = EngineInfo(model_id=model_id, engine="fake", model_source="memory", max_context=max_context,
                               reason="unit-test engine", max_parallel=max_num_seqs + max_waiting)
        self.labels = {"model": model_id, "engine": "fake"}
        self._admission = AdmissionController(max_num_seqs, max_waiting, retry_after_s=2.0, metrics=metrics,
                                              metric_labels=self.labels)
        self.default_max_tokens = default_max_tokens
        self.ready = False
        self.fail_first: EngineError | None = None  # raised when the first chunk is asked for
        self.fail_after: tuple[int, EngineError] | None = None  # raised after that many chunks
        self.gate: asyncio.Event | None = None  # when set, every token waits for it
        self.hold_after = 0  # ... every token from this index on
        self.requests: list[GenerationRequest] = []
        self.finished: list[str] = []  # per stream: "done", "closed" (consumer went away) or "error"

    async def start(self) -> None:
        self.ready = True

    def is_ready(self) -> bool:
        return self.ready

    async def check_health(self) -> None:
        if not self.ready:
            raise EngineNotReadyError(f"model {self.info.model_id} is still loading", retry_after=5)

    def stats(self) -> EngineStats:
        return self._admission.stats()

    async def generate(self, request: GenerationRequest) -> AsyncGenerator[GenerationChunk, None]:
        await self.check_health()
        self.requests.append(request)
        if self.fail_first is not None:
            raise self.fail_first
        prompt_tokens = len((request.prompt or "").split()) + sum(
            len(str(m.get("content", "")).split()) + 1 for m in request.messages or [])
        n = request.max_tokens if request.max_tokens is not None else self.default_max_tokens
        if prompt_tokens + n > self.info.max_context:
            raise PromptTooLongError(f"this model's maximum context length is {self.info.max_context} tokens",
                                     param="messages" if request.messages is not None else "prompt")
        async with self._admission.admitted(self._stream(prompt_tokens, n)) as chunks:
            async for chunk in chunks:
                yield chunk

    async def _stream(self, prompt_tokens: int, n: int) -> AsyncGenerator[GenerationChunk, None]:
        outcome = "closed"
        try:
            for i in range(n):
                if self.gate is not None and i >= self.hold_after:
                    await self.gate.wait()
                await asyncio.sleep(0)
                if self.fail_after is not None and i == self.fail_after[0]:
                    outcome = "error"
                    raise self.fail_after[1]
                yield GenerationChunk(f"w{i} ", prompt_tokens, i + 1, "length" if i + 1 == n else None)
            outcome = "done"
        finally:
            self.finished.append(outcome)
