"""Prometheus metrics of a real server, and client disconnects aborting generation.

A client that goes away mid-stream (or mid non-streaming request) must stop the
engine within about a second: asserted through `llm_requests_aborted_total` and
`llm_running_requests` on /metrics, polled with `wait_until`.
"""

from __future__ import annotations

import json
import socket
import time

import httpx
from prometheus_client.parser import text_string_to_metric_families

from tests.support.servers import ServerProcess, scrape, wait_until

LONG = 2000  # tokens: several seconds of generation, so only an abort ends it within the bound
ABORT_BOUND_S = 2.0  # "within about a second", with slack for a loaded 2-core machine
ENGINE = {"model": "tiny", "engine": "transformers"}


def _families(base_url: str) -> dict[str, object]:
    text = httpx.get(base_url + "/metrics", timeout=10).text
    return {f.name: f for f in text_string_to_metric_families(text)}


def test_metrics_exposition_names_types_and_labels(core_server: ServerProcess) -> None:
    r = httpx.post(core_server.base_url + "/v1/completions", timeout=60,
                   json={"model": "tiny", "prompt": "count me", "max_tokens": 5, "ignore_eos": True})
    assert r.status_code == 200
    resp = httpx.get(core_server.base_url + "/metrics", timeout=10)
    assert resp.headers["content-type"].startswith("text/plain")
    fams = _families(core_server.base_url)
    expected = {
        "llm_requests": "counter",
        "llm_request_latency_seconds": "histogram",
        "llm_time_to_first_token_seconds": "histogram",
        "llm_prompt_tokens": "counter",
        "llm_output_tokens": "counter",
        "llm_running_requests": "gauge",
        "llm_queue_depth": "gauge",
        "llm_model_ready": "gauge",
        "llm_engine_info": "gauge",
    }
    for name, kind in expected.items():
        assert name in fams, f"{name} missing from /metrics"
        assert fams[name].type == kind, (name, fams[name].type)  # type: ignore[attr-defined]
    req = [s for s in fams["llm_requests"].samples if s.name == "llm_requests_total"]  # type: ignore[attr-defined]
    assert any(s.labels == {**ENGINE, "endpoint": "completions", "status": "200"} for s in req)
    buckets = [s for s in fams["llm_request_latency_seconds"].samples  # type: ignore[attr-defined]
               if s.name.endswith("_bucket")]
    assert {tuple(sorted(set(s.labels) - {"le"})) for s in buckets} == {("endpoint", "engine", "model")}
    assert any(s.labels["le"] == "+Inf" for s in buckets)
    ttft = [s for s in fams["llm_time_to_first_token_seconds"].samples  # type: ignore[attr-defined]
            if s.name.endswith("_count")]
    assert ttft and all(s.labels == ENGINE for s in ttft)
    assert scrape(core_server.base_url, "llm_model_ready", **ENGINE) == 1
    info = [s for s in fams["llm_engine_info"].samples]  # type: ignore[attr-defined]
    assert info and info[0].labels["fallback"] in ("true", "false") and info[0].labels["reason"]


def test_token_counters_and_latency_follow_requests(core_server: ServerProcess) -> None:
    url = core_server.base_url

    def snapshot() -> tuple[float, float, float, float, float]:
        return (
            scrape(url, "llm_requests_total", endpoint="chat", status="200", **ENGINE),
            scrape(url, "llm_output_tokens_total", **ENGINE),
            scrape(url, "llm_prompt_tokens_total", **ENGINE),
            scrape(url, "llm_request_latency_seconds_count", endpoint="chat", **ENGINE),
            scrape(url, "llm_time_to_first_token_seconds_count", **ENGINE),
        )

    before = snapshot()
    usage = httpx.post(url + "/v1/chat/completions", timeout=60, json={
        "model": "tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 7, "ignore_eos": True,
    }).json()["usage"]
    with httpx.stream("POST", url + "/v1/chat/completions", timeout=60, json={
        "model": "tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4, "ignore_eos": True,
        "stream": True,
    }) as resp:
        assert resp.read().decode().rstrip().endswith("data: [DONE]")
    after = snapshot()
    assert after[0] - before[0] == 2
    assert after[1] - before[1] == usage["completion_tokens"] + 4
    assert after[2] - before[2] == 2 * usage["prompt_tokens"]
    assert after[3] - before[3] == 2
    assert after[4] - before[4] == 2


def _wait_idle(url: str) -> None:
    wait_until(lambda: scrape(url, "llm_running_requests", **ENGINE) == 0, 30, 0.05, "no running requests")


def test_disconnect_mid_stream_aborts_generation(core_server: ServerProcess) -> None:
    url = core_server.base_url
    _wait_idle(url)
    aborted = scrape(url, "llm_requests_aborted_total", **ENGINE)
    tokens = scrape(url, "llm_output_tokens_total", **ENGINE)
    body = {"model": "tiny", "prompt": "go on forever", "max_tokens": LONG, "ignore_eos": True, "stream": True}
    with httpx.Client(timeout=60) as http, http.stream("POST", url + "/v1/completions", json=body) as resp:
        lines = resp.iter_lines()  # keep a reference: a collected httpx line iterator closes the response
        first = next(lines)
        assert first.startswith("data: ")
        assert scrape(url, "llm_running_requests", **ENGINE) == 1
        closed_at = time.monotonic()
    # leaving the block closes the connection mid-stream
    wait_until(lambda: scrape(url, "llm_requests_aborted_total", **ENGINE) == aborted + 1
               and scrape(url, "llm_running_requests", **ENGINE) == 0,
               ABORT_BOUND_S, 0.02, "generation aborted after the client closed the stream")
    assert time.monotonic() - closed_at < ABORT_BOUND_S
    # it stopped early: far fewer than LONG tokens were generated for it
    assert scrape(url, "llm_output_tokens_total", **ENGINE) - tokens < LONG / 2
    assert scrape(url, "llm_requests_total", endpoint="completions", status="499", **ENGINE) >= 1


def test_disconnect_mid_non_streaming_request_aborts_generation(core_server: ServerProcess) -> None:
    url = core_server.base_url
    _wait_idle(url)
    aborted = scrape(url, "llm_requests_aborted_total", **ENGINE)
    body = json.dumps({"model": "tiny", "prompt": "long answer", "max_tokens": LONG, "ignore_eos": True}).encode()
    head = (f"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1:{core_server.port}\r\n"
            f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n").encode()
    sock = socket.create_connection(("127.0.0.1", core_server.port), timeout=30)
    try:
        sock.sendall(head + body)
        wait_until(lambda: scrape(url, "llm_running_requests", **ENGINE) == 1, 30, 0.02, "request running")
    finally:
        sock.close()
    closed_at = time.monotonic()
    wait_until(lambda: scrape(url, "llm_requests_aborted_total", **ENGINE) == aborted + 1
               and scrape(url, "llm_running_requests", **ENGINE) == 0,
               ABORT_BOUND_S, 0.02, "generation aborted after the client hung up")
    assert time.monotonic() - closed_at < ABORT_BOUND_S
    # the server is fine afterwards
    r = httpx.post(url + "/v1/completions", json={"model": "tiny", "prompt": "x", "max_tokens": 2}, timeout=60)
    assert r.status_code == 200
