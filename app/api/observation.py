"""What one generation request leaves behind: its metrics, its access-log line and its `X-Served-By` header.

`RequestObservation` is created when a request is routed to a model, notes the first token (TTFT), the tokens
and which engines served it, and on `finish(status)` records the request counter, latency, token counters,
error counter and the access-log line, once. `tenancy` (the key's admitted request, when it has one) is charged
the tokens as they become known (`progress`, the key's tokens-per-minute budget) and records the key's usage.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from app import metrics
from app.api.access import log_request
from app.engines.base import GenerationChunk
from app.metrics import MetricsSink
from app.tenants.gate import RequestTenancy


@dataclass
class RequestObservation:
    """Per-request metrics bookkeeping."""

    sink: MetricsSink
    model: str
    engine: str
    endpoint: str
    request_id: str = "-"
    start: float = field(default_factory=time.monotonic)
    first_token_at: float | None = None
    output_tokens: int = 0
    prompt_tokens: int = 0
    served_by: list[str] = field(default_factory=list)
    tenancy: RequestTenancy | None = None

    def note_served_by(self, chunk: GenerationChunk) -> None:
        if chunk.served_by and chunk.served_by not in self.served_by:
            self.served_by.append(chunk.served_by)

    @property
    def headers(self) -> dict[str, str]:
        return {"X-Served-By": ", ".join(self.served_by)} if self.served_by else {}

    @property
    def labels(self) -> dict[str, str]:
        return {"model": self.model, "engine": self.engine, "endpoint": self.endpoint}

    def token(self) -> None:
        if self.first_token_at is None:
            self.first_token_at = time.monotonic()
            self.sink.observe(metrics.TTFT, self.labels, self.first_token_at - self.start)

    def progress(self, prompt_tokens: int, completion_tokens: int) -> None:
        """The request's token totals so far (charged to the key's tokens-per-minute budget as they grow)."""
        if self.tenancy is not None:
            self.tenancy.charge(prompt_tokens, completion_tokens)

    def finish(self, status: int, error_type: str | None = None) -> None:
        labels = self.labels
        if self.tenancy is not None:
            self.tenancy.record(self.model, self.engine, status, self.prompt_tokens, self.output_tokens)
        latency = time.monotonic() - self.start
        self.sink.inc(metrics.REQUESTS, {**labels, "status": str(status)})
        self.sink.observe(metrics.REQUEST_LATENCY, labels, latency)
        log_request(
            self.request_id, self.endpoint, status, model=self.model, engine=self.engine, error_type=error_type,
            prompt_tokens=self.prompt_tokens, output_tokens=self.output_tokens, latency_s=latency,
            ttft_s=None if self.first_token_at is None else self.first_token_at - self.start,
            key=self.tenancy.name if self.tenancy is not None else "-",
        )
        if self.output_tokens:
            self.sink.inc(metrics.OUTPUT_TOKENS, labels, self.output_tokens)
        if self.prompt_tokens:
            self.sink.inc(metrics.PROMPT_TOKENS, labels, self.prompt_tokens)
        if error_type:
            self.sink.inc(metrics.REQUEST_ERRORS, {**labels, "error_type": error_type})
