"""The front door process (`python -m app ops front-door`) in front of real tiny-model servers, on 127.0.0.1.

- A frozen primary (SIGSTOP: it accepts TCP, never answers) under a concurrent open-loop request stream:
  the active checker marks it down within seconds and reloads nginx; every request that starts after
  that is answered by the backup without waiting for a read timeout; SIGCONT brings traffic back.
- Per-model failover: a 503 for one model from the primary (here a `--backup` server that does not serve
  it) is retried on the backup, and the primary stays in rotation for the model it serves; a model
  nobody serves is a 503 with Retry-After naming it.
- Edge exposure: the public listener proxies /v1/* and /health only (404 in the OpenAI shape otherwise).
- SIGTERM stops nginx gracefully and the front door exits 0.
- With the primary down, the fallback enforces the same keys file (limits, allowance, a revoke).
"""

from __future__ import annotations

import json
import re
import signal
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from app.tenants.keyfile import KeyEntry, KeysFile, hash_key, save
from tests.support.front_door import FrontDoorProcess
from tests.support.openai_errors import assert_openai_error
from tests.support.servers import ServerProcess, free_port, wait_until

COMPLETION = {"model": "tiny", "prompt": "hello", "max_tokens": 4}
READ_TIMEOUT_S = 8  # the time to first byte nginx grants an upstream




@pytest.fixture
def front_door(tmp_path: Path) -> Iterator:
    started: list[FrontDoorProcess] = []

    def _start(primary: ServerProcess, backup: ServerProcess, **env: str) -> FrontDoorProcess:
        door = FrontDoorProcess(tmp_path / f"door{len(started)}", f"127.0.0.1:{primary.port}",
                                f"127.0.0.1:{backup.port}", **env)
        started.append(door)
        return door.wait_up()

    yield _start
    for door in started:
        door.stop()


Result = tuple[float, float, int, str]


def _open_loop(url: str, rate: float, duration: float, events: dict[float, object]) -> list[Result]:
    """Send one request every 1/rate s for `duration` s, each on its own thread (arrivals never wait for
    answers); `events[t]` runs at t s. Returns (start offset, latency, status, upstream) per request."""
    results: list[Result] = []
    lock = threading.Lock()
    t0 = time.monotonic()

    def one(offset: float) -> None:
        started = time.monotonic()
        try:
            r = httpx.post(url, json=COMPLETION, timeout=60)
            item = (offset, time.monotonic() - started, r.status_code, r.headers.get("x-upstream", ""))
        except httpx.HTTPError as exc:
            item = (offset, time.monotonic() - started, -1, type(exc).__name__)
        with lock:
            results.append(item)

    pending = sorted(events.items())
    threads: list[threading.Thread] = []
    for i in range(int(rate * duration)):
        at = i / rate
        while pending and pending[0][0] <= at:
            hook = pending.pop(0)[1]
            assert callable(hook)
            hook()
        delay = t0 + at - time.monotonic()
        if delay > 0:
            time.sleep(delay)  # the open loop's pacing: the next arrival time
        t = threading.Thread(target=one, args=(at,))
        t.start()
        threads.append(t)
    for t in threads:
        t.join(120)
    return sorted(results)


def test_frozen_primary_is_taken_out_before_requests_pay_a_read_timeout(start_server, front_door) -> None:  # type: ignore[no-untyped-def]
    primary, backup = start_server(), start_server()
    door = front_door(primary, backup, NGINX_READ_TIMEOUT=f"{READ_TIMEOUT_S}s")
    p_addr, b_addr = f"127.0.0.1:{primary.port}", f"127.0.0.1:{backup.port}"
    assert httpx.post(door.base_url + "/v1/completions", json=COMPLETION, timeout=30).headers["x-upstream"] == p_addr

    frozen: dict[str, float] = {}
    t0 = time.monotonic()

    def freeze() -> None:
        frozen["at"] = time.monotonic() - t0
        primary.proc.send_signal(signal.SIGSTOP)

    try:
        results = _open_loop(door.base_url + "/v1/completions", rate=4, duration=14, events={2.0: freeze})
        log = door.log()
    finally:
        primary.proc.send_signal(signal.SIGCONT)
    assert f"upstream {p_addr} is DOWN" in log, log[-3000:]
    # detection: the first request after the freeze that went straight to the backup
    straight = [r for r in results if r[0] > frozen["at"] and r[3] == b_addr]
    assert straight, results
    detected = straight[0][0] - frozen["at"]
    after = [r for r in results if r[0] >= straight[0][0]]
    worst_after = max(lat for _, lat, _, _ in after)
    worst = max(lat for _, lat, _, _ in results)
    failures = [r for r in results if r[2] != 200]
    print(f"\nfrozen primary, open loop 4 req/s: {len(results)} requests, detected {detected:.2f}s after SIGSTOP, "
          f"worst latency {worst:.2f}s overall, {worst_after:.2f}s after detection, {len(failures)} failures")
    assert not failures, failures
    assert detected < READ_TIMEOUT_S, f"detected only after {detected:.1f}s"
    # after detection no request goes near the frozen primary: none pays the read timeout
    assert all(up == b_addr for _, _, _, up in after), after
    assert worst_after < READ_TIMEOUT_S * 0.5, after

    # thawed: the checker brings the primary back after `rise` good checks
    wait_until(lambda: httpx.post(door.base_url + "/v1/completions", json=COMPLETION, timeout=30)
               .headers["x-upstream"] == p_addr, 30, 0.2, "traffic back on the thawed primary")
    assert f"upstream {p_addr} is UP" in door.log()
    assert door.stop() == 0


def test_per_model_failover_and_edge_exposure(start_server, front_door) -> None:  # type: ignore[no-untyped-def]
    # the primary serves `a` and, as a backup server would, answers 503 for `b`; the backup serves `b`
    primary = start_server("--backup", model_name="a")
    backup = start_server("--backup", model_name="b")
    door = front_door(primary, backup)
    p_addr, b_addr = f"127.0.0.1:{primary.port}", f"127.0.0.1:{backup.port}"
    for _ in range(3):
        rb = httpx.post(door.base_url + "/v1/completions", json={**COMPLETION, "model": "b"}, timeout=30)
        assert rb.status_code == 200 and rb.headers["x-upstream"] == f"{p_addr}, {b_addr}", rb.headers
        ra = httpx.post(door.base_url + "/v1/completions", json={**COMPLETION, "model": "a"}, timeout=30)
        assert ra.status_code == 200 and ra.headers["x-upstream"] == p_addr, ra.headers  # not ejected by b's 503
    # a model nobody serves: retryable 503 naming the model (the backup's answer), never a 404
    rc = httpx.post(door.base_url + "/v1/completions", json={**COMPLETION, "model": "c"}, timeout=30)
    err = assert_openai_error(rc, 503)
    assert err["code"] == "model_not_served_here" and "'c'" in err["message"] and err["param"] == "model"
    assert int(rc.headers["retry-after"]) >= 1
    assert "DOWN" not in door.log()

    # edge exposure: the public listener proxies the API and liveness only
    assert httpx.get(door.base_url + "/v1/models", timeout=10).status_code == 200
    assert httpx.get(door.base_url + "/health", timeout=10).json() == {"status": "ok"}
    for path in ("/metrics", "/readyz", "/docs", "/openapi.json", "/", "/v1x"):
        r = httpx.get(door.base_url + path, timeout=10)
        err = assert_openai_error(r, 404)
        assert "/v1/*" in err["message"], (path, err)
    # the servers themselves still answer them (Prometheus and operators use their own addresses)
    assert httpx.get(primary.base_url + "/metrics", timeout=10).status_code == 200
    # the supervisor rendered the config it runs: both servers up, passive accounting off
    conf = (door.prefix / "nginx.conf").read_text()
    assert re.search(rf"server 127\.0\.0\.1:{primary.port} max_fails=0 [^;]*;", conf)
    assert "down;" not in conf


FEATURE_REQUESTS = {  # (issue 14) what agent and RAG clients send; the answers must not change on failover
    "named-tool": {"model": "tiny", "messages": [{"role": "user", "content": "Weather in Oslo?"}], "max_tokens": 120,
                   "tools": [{"type": "function", "function": {"name": "get_weather", "parameters": {
                       "type": "object", "properties": {"city": {"enum": ["Oslo", "Bergen"]}}, "required": ["city"]}}}],
                   "tool_choice": {"type": "function", "function": {"name": "get_weather"}}, "temperature": 0},
    "json-schema": {"model": "tiny", "messages": [{"role": "user", "content": "A flag"}], "max_tokens": 120,
                    "seed": 3, "temperature": 1.0, "response_format": {"type": "json_schema", "json_schema": {
                        "name": "flag", "strict": True, "schema": {"type": "object", "properties": {
                            "ok": {"type": "boolean"}}, "required": ["ok"], "additionalProperties": False}}}},
    "logprobs": {"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 6,
                 "temperature": 0, "ignore_eos": True, "logprobs": True, "top_logprobs": 2},
}


def _answer(body: dict) -> dict:  # type: ignore[type-arg]
    choice = body["choices"][0]
    message = dict(choice["message"])
    calls = message.pop("tool_calls", None) or []
    assert all(c.pop("id").startswith("call_") for c in calls)  # fresh per answer; the rest must match
    return {"message": message, "calls": calls, "finish": choice["finish_reason"], "logprobs": choice.get("logprobs")}


def test_tools_structured_output_and_logprobs_answer_the_same_after_failover(  # type: ignore[no-untyped-def]
        start_server, front_door) -> None:
    """The same feature requests through the front door before and after the primary is SIGKILLed: the backup
    (the transformers fallback, same model) serves every one of them, with the same answer."""
    primary, backup = start_server(), start_server()
    door = front_door(primary, backup)
    p_addr, b_addr = f"127.0.0.1:{primary.port}", f"127.0.0.1:{backup.port}"
    url = door.base_url + "/v1/chat/completions"
    before = {}
    for name, body in FEATURE_REQUESTS.items():
        r = httpx.post(url, json=body, timeout=60)
        assert r.status_code == 200 and r.headers["x-upstream"] == p_addr, (name, r.status_code, r.text[:300])
        before[name] = _answer(r.json())
    assert before["named-tool"]["finish"] == "tool_calls"
    assert before["named-tool"]["calls"][0]["function"]["name"] == "get_weather"
    assert set(json.loads(before["json-schema"]["message"]["content"])) == {"ok"}
    assert len(before["logprobs"]["logprobs"]["content"]) == 6
    primary.proc.send_signal(signal.SIGKILL)
    primary.proc.wait(10)
    for name, body in FEATURE_REQUESTS.items():
        r = httpx.post(url, json=body, timeout=60)
        assert r.status_code == 200 and r.headers["x-upstream"].endswith(b_addr), (name, r.status_code, r.text[:300])
        assert _answer(r.json()) == before[name], name


def test_the_fallback_enforces_the_same_keys_file(start_server, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """The primary is down (nothing listens on its port): nginx hands every request to the fallback, a `--backup`
    server reading the same keys file; its limits, model allowance and revocations hold there too."""
    app_key, other_key = "sk-door-app-" + "a" * 24, "sk-door-other-" + "b" * 24
    keys = tmp_path / "keys.yaml"
    save(keys, KeysFile(keys=[KeyEntry(name="app", hash=hash_key(app_key), models=("tiny",), rpm=2),
                              KeyEntry(name="other", hash=hash_key(other_key), models=("big-*",))]))
    backup = start_server("--backup", env={"KEYS_FILE": str(keys), "API_KEYS": ""})
    door = FrontDoorProcess(tmp_path / "door-keys", f"127.0.0.1:{free_port()}", f"127.0.0.1:{backup.port}")
    try:
        door.wait_up()
        url = door.base_url + "/v1/completions"
        app, other = {"Authorization": f"Bearer {app_key}"}, {"Authorization": f"Bearer {other_key}"}
        answers = [httpx.post(url, json=COMPLETION, headers=app, timeout=30) for _ in range(3)]
        assert [r.status_code for r in answers] == [200, 200, 429], [r.text for r in answers]
        assert answers[0].headers["x-upstream"].endswith(f"127.0.0.1:{backup.port}")
        assert answers[0].headers["x-ratelimit-limit-requests"] == "2"
        assert assert_openai_error(answers[2], 429)["code"] == "rate_limit_exceeded"
        assert int(answers[2].headers["retry-after"]) >= 1
        denied = httpx.post(url, json=COMPLETION, headers=other, timeout=30)
        assert assert_openai_error(denied, 404)["code"] == "model_not_found"  # a 404, not a retryable 503
        save(keys, KeysFile(keys=[KeyEntry(name="app", hash=hash_key(app_key), models=("tiny",), rpm=2)]))
        wait_until(lambda: httpx.get(door.base_url + "/v1/models", headers=other, timeout=10).status_code == 401,
                   1.0, 0.05, "401 through the front door for the revoked key")
    finally:
        door.stop()
