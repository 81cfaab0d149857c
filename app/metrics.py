"""The one set of metric names, and the sinks that export them.

Names, kinds, label sets and buckets are declared once (`SPECS`). Code records
through a `MetricsSink` it is handed (`inc`/`observe`/`set_gauge`): each server
makes one and passes it to its engines and its API app. `PrometheusSink`
(standalone and DeepSpeed servers, served on `/metrics`) or, inside Ray Serve
replicas, `RaySink` (Ray's metrics API, exported on each node's metrics port: a
prometheus_client metric created in a replica is never exported by Ray).
There is no process-global sink. Dashboards and alert rules use these names only.

Names contain no ':' on purpose: prometheus_client >= 0.23 rewrites such names
when scraped by Prometheus 2.x (client_python #1177).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, Literal, Protocol

Kind = Literal["counter", "gauge", "histogram"]

LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.0, 3.0, 5.0, 10.0, 20.0, 30.0, 60.0, 120.0)
TTFT_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.0, 5.0, 10.0, 30.0)


@dataclass(frozen=True)
class MetricSpec:
    name: str  # exported name (counters end in _total)
    kind: Kind
    description: str
    labels: tuple[str, ...]
    buckets: tuple[float, ...] = ()


REQUESTS = MetricSpec(
    "llm_requests_total",
    "counter",
    "Finished API requests by endpoint and HTTP status.",
    ("model", "engine", "endpoint", "status"),
)
REQUEST_ERRORS = MetricSpec(
    "llm_request_errors_total",
    "counter",
    "API requests that ended in an error, by error type.",
    ("model", "engine", "endpoint", "error_type"),
)
REQUEST_LATENCY = MetricSpec(
    "llm_request_latency_seconds",
    "histogram",
    "End-to-end request latency (until the last byte of the response).",
    ("model", "engine", "endpoint"),
    LATENCY_BUCKETS,
)
TTFT = MetricSpec(
    "llm_time_to_first_token_seconds",
    "histogram",
    "Time from request arrival to the first generated token.",
    ("model", "engine"),
    TTFT_BUCKETS,
)
PROMPT_TOKENS = MetricSpec(
    "llm_prompt_tokens_total", "counter", "Prompt tokens processed.", ("model", "engine")
)
OUTPUT_TOKENS = MetricSpec(
    "llm_output_tokens_total", "counter", "Completion tokens generated.", ("model", "engine")
)
ABORTED = MetricSpec(
    "llm_requests_aborted_total",
    "counter",
    "Generations stopped early because the client went away or the request was cancelled.",
    ("model", "engine"),
)
RUNNING = MetricSpec(
    "llm_running_requests", "gauge", "Requests currently generating.", ("model", "engine")
)
QUEUE_DEPTH = MetricSpec(
    "llm_queue_depth", "gauge", "Requests waiting for a generation slot.", ("model", "engine")
)
MODEL_READY = MetricSpec(
    "llm_model_ready", "gauge", "1 when the model has loaded and passed warm-up.", ("model", "engine")
)
DECODE_BATCH = MetricSpec(
    "llm_decode_batch_size",
    "histogram",
    "Sequences advanced by one decode forward (transformers engine and DeepSpeed TP: the continuous batch).",
    ("model", "engine"),
    (1, 2, 4, 8, 16, 32, 64, 128, 256),
)
ENGINE_INFO = MetricSpec(
    "llm_engine_info",
    "gauge",
    "Always 1: which engine serves a model, and why (fallback reason).",
    ("model", "engine", "fallback", "reason"),
)
# the batch service (app.batch): model="-", engine="batch" (a batch may name several models)
BATCHES = MetricSpec(
    "llm_batches", "gauge", "Batch jobs by status (OpenAI Batch API statuses).", ("model", "engine", "status")
)
BATCH_LINES = MetricSpec(
    "llm_batch_lines_total",
    "counter",
    "Batch lines finished, by outcome (completed: a 2xx answer; failed: an error answer or none; expired).",
    ("model", "engine", "outcome"),
)
BATCH_QUEUE = MetricSpec(
    "llm_batch_queue_lines", "gauge", "Batch lines not yet sent (batches validating or running).",
    ("model", "engine")
)
BATCH_IN_FLIGHT = MetricSpec(
    "llm_batch_runner_concurrency", "gauge", "Batch requests the runner has in flight now.", ("model", "engine")
)

# multi-LoRA (app.engines.adapters): recorded by the engine, so under Ray per replica (Serve adds `replica`)
LORA_REQUESTS = MetricSpec(
    "llm_lora_requests_total", "counter", "Generations that ran with a LoRA adapter, by adapter.",
    ("model", "engine", "adapter"),
)
LORA_OUTPUT_TOKENS = MetricSpec(
    "llm_lora_output_tokens_total", "counter", "Completion tokens generated with a LoRA adapter, by adapter.",
    ("model", "engine", "adapter"),
)
LORA_LOADS = MetricSpec(
    "llm_lora_adapter_loads_total", "counter",
    "LoRA adapters loaded into an engine (a replica loads an adapter once while it holds it).",
    ("model", "engine", "adapter"),
)
LORA_EVICTIONS = MetricSpec(
    "llm_lora_adapter_evictions_total", "counter",
    "LoRA adapters unloaded (least recently used beyond max_num_adapters_per_replica).", ("model", "engine", "adapter"),
)
LORA_HELD = MetricSpec(
    "llm_lora_adapters_loaded", "gauge", "LoRA adapters an engine holds now.", ("model", "engine")
)
# tenants (app.tenants): `key` is a name from the keys file, `anonymous` for API_KEYS keys and servers without
# keys (bounded: names come only from the file); model is the requested id ("-" for requests refused before one)
KEY_REQUESTS = MetricSpec(
    "llm_key_requests_total", "counter", "Finished generation requests per API key name, by HTTP status.",
    ("model", "engine", "key", "status"),
)
KEY_TOKENS = MetricSpec(
    "llm_key_tokens_total", "counter", "Tokens per API key name (kind: prompt or completion).",
    ("model", "engine", "key", "kind"),
)
KEY_RATE_LIMITED = MetricSpec(
    "llm_key_rate_limited_total", "counter",
    "Requests refused with 429 by a key's own limit (limit: requests, tokens or concurrency).",
    ("model", "engine", "key", "limit"),
)

SPECS: tuple[MetricSpec, ...] = (
    REQUESTS,
    REQUEST_ERRORS,
    REQUEST_LATENCY,
    TTFT,
    PROMPT_TOKENS,
    OUTPUT_TOKENS,
    ABORTED,
    RUNNING,
    QUEUE_DEPTH,
    MODEL_READY,
    DECODE_BATCH,
    ENGINE_INFO,
    BATCHES,
    BATCH_LINES,
    BATCH_QUEUE,
    BATCH_IN_FLIGHT,
    LORA_REQUESTS,
    LORA_OUTPUT_TOKENS,
    LORA_LOADS,
    LORA_EVICTIONS,
    LORA_HELD,
    KEY_REQUESTS,
    KEY_TOKENS,
    KEY_RATE_LIMITED,
)


def exported_series_names() -> set[str]:
    """Every series name Prometheus can store for our specs (histograms expand)."""
    names: set[str] = set()
    for spec in SPECS:
        if spec.kind == "histogram":
            names |= {f"{spec.name}_bucket", f"{spec.name}_sum", f"{spec.name}_count"}
        else:
            names.add(spec.name)
    return names


class MetricsSink(Protocol):
    """Where metrics go. Servers make one and hand it to their engines and to the API app."""

    exports_through_ray: bool  # True inside Ray Serve replicas (engines pick Ray-aware exporters by it)

    def inc(self, spec: MetricSpec, labels: dict[str, str], value: float = 1.0) -> None: ...
    def set_gauge(self, spec: MetricSpec, labels: dict[str, str], value: float) -> None: ...
    def observe(self, spec: MetricSpec, labels: dict[str, str], value: float) -> None: ...
    def render(self) -> tuple[bytes, str]: ...


def _clean(spec: MetricSpec, labels: dict[str, str]) -> dict[str, str]:
    """Exactly the spec's label names (missing ones empty, unknown ones dropped), values as strings."""
    return {k: str(labels.get(k, "")) for k in spec.labels}


class PrometheusSink:
    """prometheus_client metrics in a private registry, rendered by `/metrics` (standalone, DeepSpeed rank 0)."""

    exports_through_ray = False

    def __init__(self) -> None:
        import prometheus_client as pc

        self._pc = pc
        pc.disable_created_metrics()  # no *_created series: they double the series count for nothing
        self.registry = pc.CollectorRegistry(auto_describe=True)
        self._metrics: dict[str, Any] = {}
        for spec in SPECS:
            if spec.kind == "counter":
                # prometheus_client appends _total itself
                m: Any = pc.Counter(
                    spec.name.removesuffix("_total"), spec.description, spec.labels, registry=self.registry
                )
            elif spec.kind == "gauge":
                m = pc.Gauge(spec.name, spec.description, spec.labels, registry=self.registry)
            else:
                m = pc.Histogram(
                    spec.name, spec.description, spec.labels, buckets=spec.buckets, registry=self.registry
                )
            self._metrics[spec.name] = m

    def inc(self, spec: MetricSpec, labels: dict[str, str], value: float = 1.0) -> None:
        self._metrics[spec.name].labels(**_clean(spec, labels)).inc(value)

    def set_gauge(self, spec: MetricSpec, labels: dict[str, str], value: float) -> None:
        self._metrics[spec.name].labels(**_clean(spec, labels)).set(value)

    def observe(self, spec: MetricSpec, labels: dict[str, str], value: float) -> None:
        self._metrics[spec.name].labels(**_clean(spec, labels)).observe(value)

    def render(self) -> tuple[bytes, str]:
        """Our metrics plus the engines' own families (vLLM's `vllm:*`), in the classic text format."""
        return self._pc.generate_latest(self.registry) + engine_registry_text(), self._pc.CONTENT_TYPE_LATEST


class RaySink:
    """Ray's metrics API (inside Ray Serve replicas): exported on each node's metrics export port.

    Ray prefixes exported names with `ray_` (e.g. `ray_llm_requests_total`); the
    Prometheus scrape jobs for Ray nodes strip that prefix, so stored names equal
    the standalone server's. Inside a replica `ray.serve.metrics` is used, which
    adds `application`/`deployment`/`replica` labels.
    """

    exports_through_ray = True

    def __init__(self) -> None:
        try:
            from ray.serve import get_replica_context

            get_replica_context()
            from ray.serve import metrics as rm
        except Exception:  # not inside a Serve replica
            from ray.util import metrics as rm

        self._metrics: dict[str, Any] = {}
        for spec in SPECS:
            tags: Any = spec.labels  # a tuple of names (Ray annotates it as a 1-tuple)
            if spec.kind == "counter":
                # Ray's exporter appends _total to counters itself
                m: Any = rm.Counter(spec.name.removesuffix("_total"), spec.description, tag_keys=tags)
            elif spec.kind == "gauge":
                m = rm.Gauge(spec.name, spec.description, tag_keys=tags)
            else:
                m = rm.Histogram(spec.name, spec.description, boundaries=list(spec.buckets), tag_keys=tags)
            self._metrics[spec.name] = m

    def inc(self, spec: MetricSpec, labels: dict[str, str], value: float = 1.0) -> None:
        if value > 0:
            self._metrics[spec.name].inc(value, tags=_clean(spec, labels))

    def set_gauge(self, spec: MetricSpec, labels: dict[str, str], value: float) -> None:
        self._metrics[spec.name].set(value, tags=_clean(spec, labels))

    def observe(self, spec: MetricSpec, labels: dict[str, str], value: float) -> None:
        self._metrics[spec.name].observe(value, tags=_clean(spec, labels))

    def render(self) -> tuple[bytes, str]:
        return b"# metrics of this process are exported by Ray on the node's metrics port\n", "text/plain"


ENGINE_METRIC_PREFIXES = ("vllm:", "vllm_")

# vLLM's own metric families that the shipped dashboards read: vLLM 0.32 names (vllm/v1/metrics/loggers.py;
# tests/vllm/test_vllm_cpu_engine.py checks them against the installed vLLM).
# Prometheus stores them under these names on both paths (the Ray path is renamed back by prometheus.yml).
VLLM_FAMILIES = {
    "vllm:kv_cache_usage_perc": "gauge",
    "vllm:num_requests_running": "gauge",
    "vllm:num_requests_waiting": "gauge",
    "vllm:time_to_first_token_seconds": "histogram",
    "vllm:inter_token_latency_seconds": "histogram",
    "vllm:prefix_cache_queries": "counter",  # prompt tokens looked up in the prefix cache, per replica
    "vllm:prefix_cache_hits": "counter",  # of those, tokens found cached
}


def vllm_series_names() -> set[str]:
    """Series names Prometheus stores for `VLLM_FAMILIES` (histograms expand, counters end in _total)."""
    names: set[str] = set()
    for name, kind in VLLM_FAMILIES.items():
        if kind == "histogram":
            names |= {f"{name}_bucket", f"{name}_sum", f"{name}_count"}
        else:
            names.add(f"{name}_total" if kind == "counter" else name)
    return names


def engine_registry_text() -> bytes:
    """Metrics engines register in prometheus_client's default REGISTRY (vLLM: `vllm:*`), as text.

    Only `vllm:*`/`vllm_*` families are taken (not the default process/GC collectors).
    The classic text format keeps the ':' (legal in Prometheus metric names), so what
    Prometheus stores is vLLM's own name, e.g. `vllm:time_to_first_token_seconds_bucket`;
    prometheus_client >= 0.23 rewrites ':' to '_' only on the OpenMetrics path
    (client_python #1177), which `/metrics` never negotiates. With PROMETHEUS_MULTIPROC_DIR
    set, vLLM's values live in files and are read with a MultiProcessCollector.
    """
    import os

    import prometheus_client as pc

    source: Any = pc.REGISTRY
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        from prometheus_client import multiprocess

        source = pc.CollectorRegistry()
        multiprocess.MultiProcessCollector(source)

    class _EngineFamilies:
        def collect(self) -> Iterator[Any]:
            for family in source.collect():
                if family.name.startswith(ENGINE_METRIC_PREFIXES):
                    yield family

    registry = pc.CollectorRegistry(auto_describe=False)
    registry.register(_EngineFamilies())
    return pc.generate_latest(registry)
