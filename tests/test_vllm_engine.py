"""The vLLM engine adapter: request translation, engine_kwargs validation, start failures, vLLM's metrics.

vLLM can never be installed in CPU CI (it pins a CUDA torch), so the tests that need it are skipped with
that reason; everything that does not need vLLM (the pure translation, the validation done before vLLM is
imported, the real start failure without vLLM, `/metrics` carrying `vllm:*` families) runs everywhere.
"""

from __future__ import annotations

import asyncio
import importlib.util
from pathlib import Path

import prometheus_client as pc
import pytest

from app import metrics
from app.engines.base import EngineSpec, GenerationRequest, InvalidRequestError
from app.engines.vllm import VLLM_VERSION, VLLMEngine, sampling_params_kwargs, vllm_engine_args
from app.metrics import PrometheusSink

HAVE_VLLM = importlib.util.find_spec("vllm") is not None
needs_vllm = pytest.mark.skipif(
    not HAVE_VLLM,
    reason=f"vLLM is not installed: vllm=={VLLM_VERSION} needs a CUDA torch, so it is never installed in CPU CI",
)


def test_sampling_params_translation() -> None:
    req = GenerationRequest(prompt="x", max_tokens=10, temperature=0.7, top_p=0.9, stop=["\n\n", "END"], seed=-1,
                            presence_penalty=0.5, frequency_penalty=-0.25, min_tokens=50, ignore_eos=True)
    assert sampling_params_kwargs(req, 10) == {
        "n": 1,
        "max_tokens": 10,
        "min_tokens": 10,  # clamped: vLLM rejects min_tokens > max_tokens
        "temperature": 0.7,
        "top_p": 0.9,
        "presence_penalty": 0.5,
        "frequency_penalty": -0.25,
        "ignore_eos": True,
        "stop": ["\n\n", "END"],
        "include_stop_str_in_output": False,
        "skip_special_tokens": True,
        "detokenize": True,
        "seed": 2**64 - 1,  # folded to 64 bits like the transformers engine (vLLM would read -1 as "unseeded")
    }
    plain = sampling_params_kwargs(GenerationRequest(prompt="x"), 5)
    assert "seed" not in plain and plain["stop"] == [] and plain["min_tokens"] == 0


@pytest.mark.parametrize(("field", "value", "param"), [("top_p", 0.0, "top_p"), ("temperature", -1.0, "temperature"),
                                                      ("temperature", float("nan"), "temperature")])
def test_sampling_params_translation_rejects_what_vllm_would(field: str, value: float, param: str) -> None:
    with pytest.raises(InvalidRequestError) as exc:
        sampling_params_kwargs(GenerationRequest(prompt="x", **{field: value}), 4)
    assert exc.value.param == param and exc.value.status_code == 400


def test_engine_kwargs_validated_before_vllm_is_imported() -> None:
    ok = vllm_engine_args({"device": "auto", "dtype": "bfloat16", "tensor_parallel_size": 2, "max_model_len": 4096,
                           "gpu_memory_utilization": 0.85, "enable_prefix_caching": True, "quantization": None})
    assert ok == {"dtype": "bfloat16", "tensor_parallel_size": 2, "max_model_len": 4096,
                  "gpu_memory_utilization": 0.85, "enable_prefix_caching": True}
    bad = [
        ({"device": "cpu"}, "engine_kwargs.device='cpu'"),
        ({"tensor_parallel_size": 0}, "tensor_parallel_size=0: must be an integer >= 1"),
        ({"max_num_seqs": "8"}, "max_num_seqs='8'"),
        ({"gpu_memory_utilization": 1.5}, r"gpu_memory_utilization=1.5: must be in \(0, 1\]"),
        ({"enforce_eager": "yes"}, "enforce_eager='yes': must be true or false"),
        ({"dtype": "float64"}, "dtype='float64'"),
    ]
    for kwargs, message in bad:
        with pytest.raises(ValueError, match=message):
            vllm_engine_args(kwargs)


def test_engine_start_fails_for_real_on_a_missing_model_path(tmp_path: Path) -> None:
    engine = VLLMEngine(EngineSpec(model_id="m", model_source=str(tmp_path / "nope"), engine="vllm"))
    with pytest.raises(FileNotFoundError, match="does not exist"):
        asyncio.run(engine.start())
    assert not engine.is_ready()


@pytest.mark.skipif(HAVE_VLLM, reason="vLLM is installed here: its import does not fail")
def test_engine_start_without_vllm_raises_the_import_error(tiny_model: Path) -> None:
    engine = VLLMEngine(EngineSpec(model_id="tiny", model_source=str(tiny_model), engine="vllm",
                                   engine_kwargs={"max_model_len": 256}))
    with pytest.raises(ModuleNotFoundError, match="No module named 'vllm'"):
        asyncio.run(engine.start())


def test_vllm_metric_families_are_appended_to_our_metrics() -> None:
    """vLLM registers `vllm:*` metrics in prometheus_client's default REGISTRY; render() must carry them.

    The families below are created the way vLLM's PrometheusStatLogger creates them (default registry,
    ':' in the name); only `vllm:*`/`vllm_*` families are taken from that registry.
    """
    ttft = pc.Histogram("vllm:time_to_first_token_seconds", "TTFT", ["model_name", "engine"], buckets=(0.1, 1.0))
    kv = pc.Gauge("vllm:kv_cache_usage_perc", "KV cache usage", ["model_name", "engine"])
    try:
        ttft.labels("m", "0").observe(0.25)
        kv.labels("m", "0").set(0.5)
        sink = PrometheusSink()
        sink.inc(metrics.OUTPUT_TOKENS, {"model": "m", "engine": "vllm"}, 3)
        body, content_type = sink.render()
    finally:
        pc.REGISTRY.unregister(ttft)
        pc.REGISTRY.unregister(kv)
    text = body.decode()
    assert content_type.startswith("text/plain")
    assert 'llm_output_tokens_total{engine="vllm",model="m"}' in text
    assert 'vllm:time_to_first_token_seconds_bucket{engine="0",le="1.0",model_name="m"} 1.0' in text
    assert 'vllm:kv_cache_usage_perc{engine="0",model_name="m"} 0.5' in text
    assert "process_cpu_seconds_total" not in text and "python_gc" not in text  # default collectors stay out
    assert "vllm:" not in sink.render()[0].decode()  # nothing left once vLLM's collectors are gone


# ----------------------------------------------------------------------------- with vLLM installed


@needs_vllm
def test_translation_builds_real_sampling_params() -> None:
    from vllm.sampling_params import RequestOutputKind, SamplingParams

    req = GenerationRequest(prompt="x", max_tokens=8, temperature=0.5, top_p=0.8, stop=["END"], seed=7,
                            min_tokens=2, presence_penalty=0.1, frequency_penalty=0.2)
    sp = SamplingParams(output_kind=RequestOutputKind.DELTA, **sampling_params_kwargs(req, 8))
    assert (sp.max_tokens, sp.min_tokens, sp.temperature, sp.top_p, sp.seed) == (8, 2, 0.5, 0.8, 7)
    assert sp.stop == ["END"] and not sp.include_stop_str_in_output
    assert (sp.presence_penalty, sp.frequency_penalty) == (0.1, 0.2)
    assert sp.output_kind == RequestOutputKind.DELTA


@needs_vllm
def test_engine_kwargs_are_async_engine_args_fields() -> None:
    import dataclasses

    from vllm.engine.arg_utils import AsyncEngineArgs

    fields = {f.name for f in dataclasses.fields(AsyncEngineArgs)}
    documented = {"tensor_parallel_size", "dtype", "gpu_memory_utilization", "max_model_len", "max_num_seqs",
                  "max_num_batched_tokens", "enable_prefix_caching", "quantization", "enforce_eager",
                  "trust_remote_code", "pipeline_parallel_size", "enable_chunked_prefill", "kv_cache_dtype",
                  "seed", "revision", "tokenizer", "download_dir"}
    assert documented <= fields, documented - fields


@needs_vllm
def test_dashboard_vllm_families_are_registered_by_vllm() -> None:
    import inspect

    import vllm.v1.metrics.loggers as loggers

    from app.metrics import VLLM_FAMILIES

    source = inspect.getsource(loggers)
    missing = [name for name in VLLM_FAMILIES if f'"{name}"' not in source]
    assert not missing, f"vLLM {VLLM_VERSION} no longer defines {missing}"
