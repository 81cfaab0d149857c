"""LoRA adapters through a real `python -m app serve` (the fallback's shape: `--backup`, the engine process).

One server serves the tiny model with `--dynamic-lora-loading-path` (a copy of the session's adapters A, B, C)
and at most 2 adapters held. Checked over HTTP: /v1/models lists the adapters with their parent, `tiny:A`
answers differently from `tiny` and the same every time, an adapter copied in while serving is served, per-adapter
metrics and the access log carry the adapter, and each bad input is a clear 4xx after which the server keeps
serving.
"""

from __future__ import annotations

import json
import shutil
import struct
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.support.openai_errors import assert_openai_error
from tests.support.servers import ServerProcess, scrape, spawn_server


@pytest.fixture(scope="module")
def adapters(tiny_loras: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("served-adapters")
    for name in ("A", "B", "C"):
        shutil.copytree(tiny_loras / name, root / name)
    return root


@pytest.fixture(scope="module")
def server(tiny_model: Path, adapters: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    srv = spawn_server(tmp_path_factory.mktemp("lora-server"), tiny_model, "--backup",
                       "--dynamic-lora-loading-path", str(adapters),
                       env={"LLM_MAX_NUM_ADAPTERS_PER_REPLICA": "2", "LLM_DEVICE": "cpu"})
    yield srv
    srv.stop()


def chat(srv: ServerProcess, model: str, content: str = "hello world", **kw: Any) -> httpx.Response:
    body = {"model": model, "messages": [{"role": "user", "content": content}], "max_tokens": 12,
            "temperature": 0, "ignore_eos": True, **kw}
    return httpx.post(srv.base_url + "/v1/chat/completions", json=body, timeout=120)


def text(resp: httpx.Response) -> str:
    assert resp.status_code == 200, resp.text[:500]
    return str(resp.json()["choices"][0]["message"]["content"])


def test_models_list_adapters_with_their_parent(server: ServerProcess) -> None:
    data = httpx.get(server.base_url + "/v1/models", timeout=10).json()["data"]
    by_id = {card["id"]: card for card in data}
    assert list(by_id) == ["tiny", "tiny:A", "tiny:B", "tiny:C"]
    assert by_id["tiny"]["parent"] is None
    assert all(by_id[f"tiny:{n}"]["parent"] == by_id[f"tiny:{n}"]["root"] == "tiny" for n in "ABC")
    assert by_id["tiny:A"]["ready"] is True
    card = httpx.get(server.base_url + "/v1/models/tiny:B", timeout=10).json()
    assert (card["id"], card["parent"]) == ("tiny:B", "tiny")
    assert_openai_error(httpx.get(server.base_url + "/v1/models/tiny:nope", timeout=10), 404)


def test_an_adapter_changes_the_answer_and_is_counted(server: ServerProcess) -> None:
    base, a, b = text(chat(server, "tiny")), text(chat(server, "tiny:A")), text(chat(server, "tiny:B"))
    assert len({base, a, b}) == 3
    resp = chat(server, "tiny:A")
    assert text(resp) == a and resp.json()["model"] == "tiny:A"
    stream = httpx.post(server.base_url + "/v1/completions", json={
        "model": "tiny:A", "prompt": "hello", "max_tokens": 5, "stream": True, "ignore_eos": True}, timeout=60)
    assert stream.status_code == 200 and stream.text.rstrip().endswith("data: [DONE]")
    assert scrape(server.base_url, "llm_lora_requests_total", adapter="A") == 3
    assert scrape(server.base_url, "llm_lora_output_tokens_total", adapter="A") == 12 * 2 + 5
    assert scrape(server.base_url, "llm_lora_adapter_loads_total", adapter="A") == 1
    assert " model=tiny:A engine=transformers status=200 " in server.log_text()


def test_least_recently_used_adapter_is_unloaded_beyond_the_limit(server: ServerProcess) -> None:
    for model in ("tiny:A", "tiny:B", "tiny:C"):  # C makes three: A, the least recently used, goes
        text(chat(server, model, max_tokens=2))
    assert scrape(server.base_url, "llm_lora_adapter_evictions_total", adapter="A") >= 1
    assert scrape(server.base_url, "llm_lora_adapters_loaded") == 2


def test_an_adapter_copied_in_while_serving_is_served(server: ServerProcess, adapters: Path) -> None:
    shutil.copytree(adapters / "B", adapters / "B-copy")
    assert "tiny:B-copy" in [c["id"] for c in httpx.get(server.base_url + "/v1/models", timeout=10).json()["data"]]
    assert text(chat(server, "tiny:B-copy")) == text(chat(server, "tiny:B"))


def _corrupt(adapters: Path) -> None:
    shutil.copytree(adapters / "A", adapters / "broken")
    (adapters / "broken" / "adapter_model.safetensors").write_bytes(b"\x01\x02")
    shutil.copytree(adapters / "A", adapters / "rank64")
    cfg = json.loads((adapters / "rank64" / "adapter_config.json").read_text())
    (adapters / "rank64" / "adapter_config.json").write_text(json.dumps({**cfg, "r": 64}))
    # an adapter made for a wider model: lora_A of q_proj reads 128 features, the tiny model's layer has 64
    (adapters / "wide").mkdir()
    (adapters / "wide" / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 4,
                                                                       "target_modules": ["q_proj"]}))
    key = "base_model.model.model.layers.0.self_attn.q_proj"
    header = json.dumps({f"{key}.lora_A.weight": {"dtype": "F32", "shape": [4, 128], "data_offsets": [0, 2048]},
                         f"{key}.lora_B.weight": {"dtype": "F32", "shape": [128, 4], "data_offsets": [2048, 4096]}})
    (adapters / "wide" / "adapter_model.safetensors").write_bytes(
        struct.pack("<Q", len(header)) + header.encode() + bytes(4096))


@pytest.mark.parametrize(("model", "status", "says"), [
    ("tiny:nope", 404, "model 'tiny:nope' does not exist: no adapter folder 'nope'"),
    ("tiny:../A", 400, "an adapter name is a folder name"),
    ("tiny:A/../../etc", 400, "an adapter name is a folder name"),
    ("tiny:broken", 400, "adapter tiny:broken cannot be served: adapter_model.safetensors is corrupt"),
    ("tiny:rank64", 400, "its rank 64 is above max_lora_rank 16"),
    ("tiny:wide", 400, "layer model.layers.0.self_attn.q_proj is 64->64 in the base model tiny but 128->128"),
    ("other:A", 503, "model 'other:A' is not served by this backup server"),
])
def test_bad_adapters_are_clear_4xx_and_the_server_keeps_serving(server: ServerProcess, adapters: Path,
                                                                 model: str, status: int, says: str) -> None:
    if not (adapters / "broken").exists():
        _corrupt(adapters)
    for stream in (False, True):
        err = assert_openai_error(chat(server, model, stream=stream), status)
        assert says in err["message"], err
        if status == 404:
            assert (err["code"], err["param"]) == ("model_not_found", "model")
    assert text(chat(server, "tiny", max_tokens=2)) and text(chat(server, "tiny:A", max_tokens=2))


def test_grafana_lora_row_reads_what_prometheus_stores(server: ServerProcess, tmp_path: Path) -> None:
    """Every query of the dashboard's LoRA row returns data from a real Prometheus scraping this server (run after
    the eviction test, so loads, evictions and held adapters all have series)."""
    from tests.support.prometheus import assert_dashboard_queries_return_data, scraping

    text(chat(server, "tiny:B"))
    prom = scraping(server.port, tmp_path)
    try:
        assert_dashboard_queries_return_data(prom, "llm_lora_", 5)
    finally:
        prom.stop()


def test_through_nginx_the_fallback_answers_with_the_same_adapter_when_the_primary_dies(
        server: ServerProcess, adapters: Path, tiny_model: Path, tmp_path: Path) -> None:
    """nginx -> primary (same adapter folder) and this module's server as the backup: after the primary is
    SIGKILLed, `tiny:A` is answered by the fallback with A's greedy text, not the base model's."""
    import signal

    from tests.support.front_door import Nginx

    primary = spawn_server(tmp_path / "primary", tiny_model, "--dynamic-lora-loading-path", str(adapters),
                           env={"LLM_DEVICE": "cpu"})
    front = Nginx(tmp_path / "nginx", nginx_primary=f"127.0.0.1:{primary.port}",
                  nginx_backups=f"127.0.0.1:{server.port}").start()
    try:
        base, with_a = text(chat(server, "tiny")), text(chat(server, "tiny:A"))
        assert base != with_a
        via_primary = httpx.post(front.base_url + "/v1/chat/completions", timeout=120, json={
            "model": "tiny:A", "messages": [{"role": "user", "content": "hello world"}], "max_tokens": 12,
            "temperature": 0, "ignore_eos": True})
        assert text(via_primary) == with_a and f"upstream=127.0.0.1:{primary.port} " in front.access_log()
        primary.stop(signal.SIGKILL)
        for _ in range(3):  # each one fails over (nginx retries the dead primary's connection on the backup)
            r = httpx.post(front.base_url + "/v1/chat/completions", timeout=120, json={
                "model": "tiny:A", "messages": [{"role": "user", "content": "hello world"}], "max_tokens": 12,
                "temperature": 0, "ignore_eos": True})
            assert text(r) == with_a
        assert f"127.0.0.1:{server.port}" in front.access_log()
    finally:
        front.stop()
        primary.stop(signal.SIGKILL)
