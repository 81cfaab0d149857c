"""DeepSpeed TP=2 over two emulated VMs: real `deepspeed --launcher pdsh`, real sshd, real gloo over a veth.

Each test launches a fresh group with `python -m app deepspeed launch` (see tests/support/ds_cluster.py)
because every fault ends its group. The first test reuses its group for all API checks
(greedy equality with single-process transformers, OpenAI client chat/completions/streaming,
4xx, 429) and ends it by killing rank 1 during a request.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import time
from collections.abc import Iterator
from concurrent.futures import Future
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

from tests.support.ds_cluster import Group, NetnsPool, TwoVMs, greedy_reference, two_vms, wait_ready
from tests.support.env import need, need_binary, need_root

PROMPTS = ["hello world", "The quick brown fox", "nginx upstream failover"]
CHATS = [[{"role": "user", "content": "Say something about Ray Serve."}],
         [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is tensor parallelism?"}]]
N_TOKENS = 16
COLLECTIVE_TIMEOUT_S = 6.0  # DS_COLLECTIVE_TIMEOUT_S in ds_cluster.launch_env
HEARTBEAT_S = 1.0


def _apt_done() -> bool:
    try:
        return "apt-done" in Path("/tmp/apt.log").read_text(errors="replace")
    except OSError:
        return True  # no background install on this machine: rely on need_binary


@pytest.fixture(scope="module")
def vms(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TwoVMs]:
    need_root()
    if not _apt_done():
        from tests.support.servers import wait_until

        wait_until(_apt_done, 600, 2, "/tmp/apt.log apt-done (pdsh, openssh-server)")
    need_binary("pdsh", "sshd", "ssh", "ssh-keygen", "unshare", "ip")
    need(shutil.which("deepspeed") is not None or _has_deepspeed(), "needs the deepspeed package")
    with two_vms(tmp_path_factory.mktemp("ds")) as made:
        yield made


def _has_deepspeed() -> bool:
    import importlib.util

    return importlib.util.find_spec("deepspeed") is not None


@pytest.fixture(scope="module")
def pool(vms: TwoVMs) -> Iterator[NetnsPool]:
    p = NetnsPool(vms.ns_a, workers=6)
    yield p
    p.close()


@pytest.fixture(scope="module")
def reference(tiny_model: Path) -> dict[str, str]:
    """Greedy output of the unsharded model in one process (plain transformers `generate`)."""
    return greedy_reference(tiny_model, PROMPTS, CHATS, N_TOKENS)


def _openai(vms: TwoVMs) -> Any:
    import openai

    return openai.OpenAI(base_url=f"http://{vms.ip_a}:8002/v1", api_key="unused", max_retries=0, timeout=120,
                         http_client=httpx.Client(trust_env=False, timeout=120))


def _post(vms: TwoVMs, path: str, body: Any, timeout: float = 120) -> httpx.Response:
    kw: dict[str, Any] = {"content": body} if isinstance(body, str) else {"json": body}
    return httpx.post(f"http://{vms.ip_a}:8002{path}", timeout=timeout, trust_env=False, **kw)


def _readyz(vms: TwoVMs) -> httpx.Response:
    return httpx.get(f"http://{vms.ip_a}:8002/readyz", timeout=3, trust_env=False)


def _scrape(vms: TwoVMs, name: str) -> float:
    from prometheus_client.parser import text_string_to_metric_families

    text = httpx.get(f"http://{vms.ip_a}:8002/metrics", timeout=10, trust_env=False).text
    return sum(s.value for f in text_string_to_metric_families(text) for s in f.samples if s.name == name)


def _scrape_batched(vms: TwoVMs) -> float:
    """Decode steps that advanced more than one sequence (llm_decode_batch_size: count minus the le=1 bucket)."""
    from prometheus_client.parser import text_string_to_metric_families

    text = httpx.get(f"http://{vms.ip_a}:8002/metrics", timeout=10, trust_env=False).text
    samples = [s for f in text_string_to_metric_families(text) for s in f.samples]
    count = sum(s.value for s in samples if s.name == "llm_decode_batch_size_count")
    single = sum(s.value for s in samples if s.name == "llm_decode_batch_size_bucket" and s.labels["le"] == "1.0")
    return count - single


def _stream_then_disconnect(vms: TwoVMs) -> None:
    body = {"model": "tiny", "prompt": "long", "max_tokens": 1800, "ignore_eos": True, "stream": True}
    with httpx.Client(trust_env=False, timeout=60) as http, http.stream(
        "POST", f"http://{vms.ip_a}:8002/v1/completions", json=body
    ) as resp:
        assert resp.status_code == 200
        for line in resp.iter_lines():
            if line.startswith("data: "):
                break  # first token seen; leaving both blocks closes the connection


def _launched(vms: TwoVMs, pool: NetnsPool, tiny_model: Path, name: str) -> Group:
    group = vms.launch(tiny_model, name=name)
    try:
        wait_ready(group, pool)
    except BaseException:
        group.kill()
        raise
    return group


def _rank1(group: Group) -> int:
    pid = group.rank_pid(group.vms.ns_b)
    assert pid, f"rank 1 process not found in {group.vms.ns_b}:\n{group.log()[-3000:]}"
    return pid


def _readyz_503_within(vms: TwoVMs, pool: NetnsPool, since: float, limit: float) -> float:
    """Poll /readyz from namespace A until 503; return seconds since `since` (fails past `limit`)."""
    while time.monotonic() - since < limit:
        try:
            if pool.run(_readyz, vms, timeout=10).status_code == 503:
                return time.monotonic() - since
        except httpx.HTTPError:
            pass  # rank 0 may already have exited: keep looking for the 503 it must have shown
        time.sleep(0.1)
    pytest.fail(f"/readyz did not turn 503 within {limit}s")


def _exits_nonzero_within(group: Group, since: float, limit: float) -> int:
    left = limit - (time.monotonic() - since)
    try:
        rc = group.proc.wait(max(left, 0.1))
    except Exception:
        pytest.fail(f"launcher still running {limit}s after the fault:\n{group.log()[-4000:]}")
    assert rc != 0, f"launcher exited 0 after a fault:\n{group.log()[-3000:]}"
    assert "launcher exited with" in group.log()
    return rc


def test_tp2_serves_same_api_and_greedy_output_then_fails_inflight_on_rank_kill(
    vms: TwoVMs, pool: NetnsPool, tiny_model: Path, reference: dict[str, str]
) -> None:
    group = _launched(vms, pool, tiny_model, "api")
    try:
        client = _openai(vms)

        # greedy TP=2 output == single-process transformers output (completions and chat)
        for p in PROMPTS:
            r = pool.run(lambda p=p: client.completions.create(
                model="tiny", prompt=p, max_tokens=N_TOKENS, temperature=0, extra_body={"ignore_eos": True}))
            assert r.choices[0].text == reference[p], p
            assert r.usage.completion_tokens == N_TOKENS
        for i, messages in enumerate(CHATS):
            r = pool.run(lambda m=messages: client.chat.completions.create(
                model="tiny", messages=m, max_tokens=N_TOKENS, temperature=0, extra_body={"ignore_eos": True}))
            assert r.choices[0].message.content == reference[f"chat{i}"]

        # streaming (chat and completions) carries the same text
        def stream_chat() -> str:
            s = client.chat.completions.create(model="tiny", messages=CHATS[0], max_tokens=N_TOKENS, temperature=0,
                                               stream=True, extra_body={"ignore_eos": True})
            return "".join(c.choices[0].delta.content or "" for c in s if c.choices)

        def stream_completion() -> str:
            s = client.completions.create(model="tiny", prompt=PROMPTS[1], max_tokens=N_TOKENS, temperature=0,
                                          stream=True, extra_body={"ignore_eos": True})
            return "".join(c.choices[0].text for c in s if c.choices)

        # concurrent requests run as one batch on both ranks (DS_MAX_NUM_SEQS=2): still the same greedy output
        def complete(p: str) -> str:
            r = client.completions.create(model="tiny", prompt=p, max_tokens=N_TOKENS, temperature=0,
                                          extra_body={"ignore_eos": True})
            return str(r.choices[0].text)

        batched_before = pool.run(_scrape_batched, vms)
        futs_b = [pool.submit(complete, p) for p in PROMPTS]
        assert [f.result(120) for f in futs_b] == [reference[p] for p in PROMPTS]
        assert pool.run(_scrape_batched, vms) > batched_before  # decode steps of 2 sequences ran

        assert pool.run(stream_chat) == reference["chat0"]
        assert pool.run(stream_completion) == reference[PROMPTS[1]]

        # a LoRA adapter: the TP engine says it cannot apply one (400 naming the model), and keeps serving
        with pytest.raises(openai.BadRequestError) as refused:
            pool.run(lambda: client.completions.create(model="tiny:A", prompt=PROMPTS[0], max_tokens=4))
        assert "cannot apply LoRA adapters" in refused.value.message and refused.value.param == "model"
        assert pool.run(complete, PROMPTS[0]) == reference[PROMPTS[0]]

        # tools, structured output and logprobs (issue 14): rank 0's decode loop applies the grammar
        params = {"type": "object", "properties": {"q": {"type": "string", "maxLength": 8}}, "required": ["q"]}
        tool = {"type": "function", "function": {"name": "search", "parameters": params}}
        called = pool.run(lambda: client.chat.completions.create(
            model="tiny", messages=CHATS[0], tools=[tool], max_tokens=120, temperature=0,
            tool_choice={"type": "function", "function": {"name": "search"}}))
        [call] = called.choices[0].message.tool_calls or []
        assert called.choices[0].finish_reason == "tool_calls" and call.function.name == "search"
        assert set(json.loads(call.function.arguments)) == {"q"}
        fmt = {"type": "json_schema", "json_schema": {"name": "q", "schema": params}}
        docs = [pool.run(lambda seed=seed: client.chat.completions.create(  # greedy random weights loop on blanks
            model="tiny", messages=CHATS[0], response_format=fmt, max_tokens=200, temperature=0.8, seed=seed,
            logprobs=True, top_logprobs=2)) for seed in range(3)]
        finished = [d for d in docs if d.choices[0].finish_reason == "stop"]
        assert finished, "no json_schema answer finished within 200 tokens in 3 seeds"
        for doc in finished:
            assert set(json.loads(doc.choices[0].message.content or "")) == {"q"}
        for doc in docs:
            entries = doc.choices[0].logprobs.content if doc.choices[0].logprobs else []
            assert len(entries) == doc.usage.completion_tokens and all(len(e.top_logprobs) == 2 for e in entries)

        models = pool.run(lambda: client.models.list())
        assert [m.id for m in models.data] == ["tiny"]
        assert pool.run(_readyz, vms).json()["models"]["tiny"]["engine"] == "deepspeed"

        # bad input -> 4xx, and the group keeps serving
        bad = [
            {"model": "nope", "prompt": "x", "max_tokens": 2},
            {"model": "tiny", "prompt": "x", "max_tokens": 0},
            {"model": "tiny", "prompt": "x", "max_tokens": 100000},
            {"model": "tiny", "prompt": "x", "temperature": 7},
        ]
        for body in bad:
            status = pool.run(_post, vms, "/v1/completions", body).status_code
            assert 400 <= status < 500, (body, status)
        assert pool.run(_post, vms, "/v1/chat/completions", "{not json").status_code in (400, 422)

        # a client that goes away mid-stream stops the group's generation (not after its 1800 tokens)
        aborted_before = pool.run(_scrape, vms, "llm_requests_aborted_total")
        pool.run(_stream_then_disconnect, vms)
        gone = time.monotonic()
        while pool.run(_readyz, vms).json()["models"]["tiny"]["running"] != 0:
            assert time.monotonic() - gone < 5, "generation still running 5 s after the client disconnected"
            time.sleep(0.05)
        assert pool.run(_scrape, vms, "llm_requests_aborted_total") == aborted_before + 1

        # two running (DS_MAX_NUM_SEQS=2) + DS_MAX_WAITING=1 queued: a fourth concurrent request gets 429
        long_body = {"model": "tiny", "prompt": "busy", "max_tokens": 120, "ignore_eos": True, "temperature": 0}
        futs = [pool.submit(_post, vms, "/v1/completions", long_body) for _ in range(4)]
        statuses = sorted(f.result(120).status_code for f in futs)
        assert statuses == [200, 200, 200, 429], statuses

        # fault: SIGKILL rank 1 while a request is in flight
        inflight: Future[httpx.Response] = pool.submit(
            _post, vms, "/v1/completions",
            {"model": "tiny", "prompt": "long", "max_tokens": 1800, "ignore_eos": True, "temperature": 0})
        deadline = time.monotonic() + 30
        while pool.run(_readyz, vms).json()["models"]["tiny"]["running"] != 1:
            assert time.monotonic() < deadline and not inflight.done(), "request never started running"
            time.sleep(0.05)
        rank1 = _rank1(group)
        killed = time.monotonic()
        os.kill(rank1, signal.SIGKILL)
        resp = inflight.result(60)
        assert resp.status_code == 503, resp.text
        assert resp.json()["error"]["code"] == "engine_dead"
        _readyz_503_within(vms, pool, killed, 15)
        _exits_nonzero_within(group, killed, 60)
    finally:
        group.kill()


def test_rank1_killed_while_idle(vms: TwoVMs, pool: NetnsPool, tiny_model: Path) -> None:
    group = _launched(vms, pool, tiny_model, "idle-kill")
    try:
        killed = time.monotonic()
        os.kill(_rank1(group), signal.SIGKILL)
        took = _readyz_503_within(vms, pool, killed, 15)
        # while rank 0 lingers, requests get 503 (not a hang, not a 500)
        try:
            status = pool.run(_post, vms, "/v1/completions", {"model": "tiny", "prompt": "x", "max_tokens": 2},
                              timeout=10).status_code
            assert status == 503
        except httpx.HTTPError:
            pass  # rank 0 already exited: covered by the exit check below
        _exits_nonzero_within(group, killed, 60)
        print(f"idle SIGKILL: /readyz 503 after {took:.1f}s, launcher exited after {time.monotonic() - killed:.1f}s")
    finally:
        group.kill()


def _slow_client_answer(vms: TwoVMs) -> tuple[bytes, float]:
    """Send half a request head and wait: the guarded server must answer (408) and close on its own."""
    import socket

    t0 = time.monotonic()
    with socket.create_connection((vms.ip_a, 8002), timeout=30) as sock:
        sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: rank0\r\n")
        data = b""
        while chunk := sock.recv(65536):
            data += chunk
    return data, time.monotonic() - t0


def _stream_through_sigterm(vms: TwoVMs, group: Group, n: int, key: str) -> tuple[int, str | None, bool]:
    """Stream `n` tokens, SIGTERM rank 0 once the first arrives; (tokens, finish_reason, [DONE] seen)."""
    body = {"model": "tiny", "prompt": "drain", "max_tokens": n, "ignore_eos": True, "stream": True,
            "temperature": 0, "stream_options": {"include_usage": True}}
    tokens, finish, done, signalled = 0, None, False, False
    with httpx.Client(trust_env=False, timeout=120) as http, http.stream(
        "POST", f"http://{vms.ip_a}:8002/v1/completions", json=body, headers={"Authorization": f"Bearer {key}"}
    ) as resp:
        assert resp.status_code == 200
        for line in resp.iter_lines():
            if not line.startswith("data: "):
                continue
            if line == "data: [DONE]":
                done = True
                break
            event = json.loads(line[6:])
            if event.get("usage"):
                tokens = event["usage"]["completion_tokens"]
            for choice in event.get("choices", []):
                finish = choice.get("finish_reason") or finish
            if not signalled:
                rank0 = group.rank_pid(group.vms.ns_a)
                assert rank0, "rank 0 process not found"
                os.kill(rank0, signal.SIGTERM)
                signalled = True
    return tokens, finish, done


def test_rank0_guards_slow_clients_enforces_the_keys_file_and_drains_on_sigterm(
        vms: TwoVMs, pool: NetnsPool, tiny_model: Path, tmp_path: Path) -> None:
    """Rank 0 serves through the standalone server's guarded transport: a client that never finishes its
    headers gets 408 after DS_HEADER_TIMEOUT_S; the keys file (DS_KEYS_FILE, as compose passes it) is enforced
    (401 without a key, a key's RPM limit a 429 with OpenAI's headers); SIGTERM lets a running stream finish,
    then rank 0 exits."""
    from app.tenants.keyfile import KeyEntry, KeysFile, hash_key, save

    limited, streaming = "sk-ds-limited-0123456789", "sk-ds-stream-0123456789"
    save(tmp_path / "keys.yaml", KeysFile(keys=[KeyEntry(name="ds-limited", hash=hash_key(limited), rpm=1),
                                                KeyEntry(name="ds-stream", hash=hash_key(streaming))]))
    group = vms.launch(tiny_model, name="guard", DS_HEADER_TIMEOUT_S="2", DS_GRACEFUL_TIMEOUT_S="60",
                       DS_KEYS_FILE=str(tmp_path / "keys.yaml"))
    try:
        wait_ready(group, pool)
        answer, took = pool.run(_slow_client_answer, vms)
        assert answer.startswith(b"HTTP/1.1 408"), answer[:200]
        assert b"request_timeout" in answer
        assert 1.5 <= took < 15, took  # cut by the guard, not by the test's own socket timeout

        def complete(key: str | None) -> httpx.Response:
            headers = {"Authorization": f"Bearer {key}"} if key else {}
            return httpx.post(f"http://{vms.ip_a}:8002/v1/completions", headers=headers, trust_env=False,
                              json={"model": "tiny", "prompt": "x", "max_tokens": 2}, timeout=60)

        assert pool.run(complete, None).status_code == 401
        first = pool.run(complete, limited)
        assert first.status_code == 200 and first.headers["x-ratelimit-limit-requests"] == "1", first.text
        refused = pool.run(complete, limited)
        assert refused.status_code == 429 and int(refused.headers["retry-after"]) >= 1, refused.text
        assert refused.json()["error"]["code"] == "rate_limit_exceeded"

        tokens, finish, done = pool.run(_stream_through_sigterm, vms, group, 200, streaming, timeout=180)
        assert (tokens, finish, done) == (200, "length", True)
        deadline = time.monotonic() + 60
        while group.rank_pid(vms.ns_a) is not None:
            assert time.monotonic() < deadline, f"rank 0 still running 60 s after SIGTERM:\n{group.log()[-3000:]}"
            time.sleep(0.2)
        assert "draining" in group.log()
    finally:
        group.kill()


def test_rank1_frozen_detected_within_collective_timeout(vms: TwoVMs, pool: NetnsPool, tiny_model: Path) -> None:
    group = _launched(vms, pool, tiny_model, "sigstop")
    try:
        stopped = time.monotonic()
        os.kill(_rank1(group), signal.SIGSTOP)
        # detection = next heartbeat + the collective timeout (+ slack for a loaded CI box)
        took = _readyz_503_within(vms, pool, stopped, COLLECTIVE_TIMEOUT_S + HEARTBEAT_S + 3)
        # the frozen rank keeps pdsh waiting: the launcher's own grace (DS_EXIT_GRACE_S) must end the group
        _exits_nonzero_within(group, stopped, 60)
        print(f"SIGSTOP: /readyz 503 after {took:.1f}s, launcher exited after {time.monotonic() - stopped:.1f}s")
    finally:
        group.kill()


def test_launch_fails_clearly_when_a_host_is_unreachable(vms: TwoVMs, tiny_model: Path) -> None:
    bad_ip = f"10.78.{vms.octet}.3"  # on the veth subnet, but nobody answers
    group = vms.launch(tiny_model, name="unreachable", DS_HOSTS=f"{vms.ip_a},{bad_ip}")
    try:
        rc = group.proc.wait(60)
        log = group.log()
        assert rc != 0
        assert f"passwordless ssh failed for {bad_ip}" in log, log[-2000:]
        assert "deepspeed.launcher" not in log  # refused before anything was launched
    finally:
        group.kill()
