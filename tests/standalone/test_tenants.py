"""Named keys with limits against one real `python -m app serve`, through the official `openai` client.

One server (one engine slot, a queue of 8) reads a keys file written by the real `python -m app keys add`; each
test uses its own key, so their budgets do not interfere. Covered: RPM 429 with Retry-After and the
x-ratelimit-* headers, the SDK's own retry honouring Retry-After and then succeeding; TPM charged while a stream
runs; a concurrency limit; a model outside the allowance is a 404; revoke is a 401 within a second, no restart;
an expired key is a 401; a bad file keeps the last good one with a log line; a batch-priority key's queued
requests yield to an interactive key's; no key or hash ever shows up in the server's log, /metrics, /readyz or an
error body; per-key usage is in the SQLite file when the server has stopped.
"""

from __future__ import annotations

import logging
import re
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
import yaml

from app.tenants.keyfile import hash_key
from app.tenants.usage import UsageStore, usage_window
from tests.support.env import ROOT
from tests.support.servers import ServerProcess, scrape, spawn_server, wait_until

MODEL = "tiny"
SEEN_BODIES: list[str] = []  # every error body the tests received (checked for secrets at the end)


def keys_cli(keys_file: Path, *args: str) -> str:
    out = subprocess.run([sys.executable, "-m", "app", "keys", *args, "--file", str(keys_file)], cwd=ROOT,
                         capture_output=True, text=True, timeout=60, check=True)
    return out.stdout.strip()


class Env:
    def __init__(self, root: Path, tiny_model: Path):
        self.root, self.tiny_model = root, tiny_model
        self.keys_file = root / "keys.yaml"
        self.usage_db = root / "usage.sqlite"
        self.keys: dict[str, str] = {}
        for name, *opts in (("rpm", "--rpm", "20"), ("tpm", "--tpm", "60"), ("conc", "--concurrency", "1"),
                            ("adapters-only", "--model", "tiny:*"), ("revoked",), ("bulk", "--priority", "batch"),
                            ("chat",), ("ops", "--admin")):
            self.keys[name] = keys_cli(self.keys_file, "add", name, *opts)
        self.keys["expired"] = keys_cli(self.keys_file, "add", "expired", "--expires", "2020-01-01")
        self.server = self.start()

    def start(self) -> ServerProcess:
        return spawn_server(self.root / "logs", self.tiny_model, "--max-num-seqs", "1", "--max-waiting", "8",
                            env={"API_KEYS": "", "KEYS_FILE": str(self.keys_file),
                                 "LLM_USAGE_DB": str(self.usage_db)})

    def client(self, name: str, retries: int = 0) -> openai.OpenAI:
        return openai.OpenAI(base_url=self.server.base_url + "/v1", api_key=self.keys[name], max_retries=retries,
                             timeout=120)

    def logs(self) -> str:
        return "\n".join(p.read_text(errors="replace") for p in sorted((self.root / "logs").glob("*.log")))


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory, tiny_model: Path) -> Iterator[Env]:
    e = Env(tmp_path_factory.mktemp("tenants"), tiny_model)
    yield e
    e.server.stop()


def complete(client: openai.OpenAI, tokens: int = 1, **kw: Any) -> Any:
    return client.completions.with_raw_response.create(model=MODEL, prompt="hi", max_tokens=tokens,
                                                        extra_body={"ignore_eos": True}, **kw)


def status_error(call: Any) -> openai.APIStatusError:
    with pytest.raises(openai.APIStatusError) as info:
        call()
    SEEN_BODIES.append(info.value.response.text)
    return info.value


def test_rpm_gives_429_with_headers_and_the_sdk_retry_waits_for_retry_after(
        env: Env, caplog: pytest.LogCaptureFixture) -> None:
    client = env.client("rpm")
    first = complete(client)
    assert first.headers["x-ratelimit-limit-requests"] == "20"
    assert first.headers["x-ratelimit-remaining-requests"] == "19" and first.headers["x-ratelimit-reset-requests"]
    for _ in range(40):  # the bucket refills 1 request per 3 s: 20 quick requests empty it
        try:
            complete(client)
        except openai.RateLimitError as exc:
            refused = exc
            break
    else:
        pytest.fail("no 429 after 40 requests at rpm 20")
    SEEN_BODIES.append(refused.response.text)
    assert refused.code == "rate_limit_exceeded" and "requests per min (RPM): limit 20" in refused.message
    headers = refused.response.headers
    assert 1 <= int(headers["retry-after"]) <= 3 and headers["x-ratelimit-remaining-requests"] == "0"
    assert "x-ratelimit-limit-tokens" not in headers  # this key has no token limit

    caplog.set_level(logging.INFO, logger="openai._base_client")
    out = env.client("rpm", retries=3).completions.create(model=MODEL, prompt="hi", max_tokens=1)
    assert out.usage is not None and out.usage.completion_tokens >= 0
    waits = [float(m.group(1)) for r in caplog.records
             if (m := re.match(r"Retrying request in ([0-9.]+) seconds", r.getMessage()))]
    assert waits and all(0 < w <= 3.0 for w in waits), waits  # the server's Retry-After, not the SDK's backoff
    assert scrape(env.server.base_url, "llm_key_rate_limited_total", key="rpm", limit="requests") >= 1


def test_tpm_is_charged_while_the_stream_runs(env: Env) -> None:
    client = env.client("tpm")
    stream = client.completions.create(model=MODEL, prompt="hi", max_tokens=1000, stream=True,
                                       extra_body={"ignore_eos": True})
    received, refused_at = 0, 0
    for _ in stream:
        received += 1
        if received == 61:  # every chunk carries >= 1 token: with the prompt, more than the minute's 60 are spent
            err = status_error(lambda: complete(client))
            assert err.status_code == 429 and "tokens per min (TPM): limit 60" in err.message
            assert err.response.headers["x-ratelimit-remaining-tokens"] == "0"
            refused_at = received
    assert refused_at and received > refused_at  # refused while the stream was still running


def test_concurrency_limit_counts_requests_in_flight(env: Env) -> None:
    client = env.client("conc")
    stream = client.completions.create(model=MODEL, prompt="hi", max_tokens=50, stream=True,
                                       extra_body={"ignore_eos": True})
    next(iter(stream))
    err = status_error(lambda: complete(client))
    assert err.status_code == 429 and "concurrent requests: limit 1" in err.message
    for _ in stream:
        pass
    wait_until(lambda: complete(client).http_response.status_code == 200, 10, 0.1, "the slot freed")


def test_a_model_outside_the_allowance_does_not_exist(env: Env) -> None:
    client = env.client("adapters-only")
    err = status_error(lambda: client.completions.create(model=MODEL, prompt="hi", max_tokens=1))
    assert isinstance(err, openai.NotFoundError) and err.code == "model_not_found"
    assert client.models.list().data == []


def test_revoked_key_is_refused_within_a_second_without_restart(env: Env) -> None:
    client = env.client("revoked")
    assert complete(client).http_response.status_code == 200
    keys_cli(env.keys_file, "revoke", "revoked")

    def refused() -> bool:
        try:
            client.models.list()
        except openai.AuthenticationError as exc:
            SEEN_BODIES.append(exc.response.text)
            return True
        return False

    wait_until(refused, 1.0, 0.05, "401 for the revoked key")
    err = status_error(lambda: env.client("expired").models.list())
    assert err.status_code == 401 and err.message.endswith("API key expired")


def test_a_bad_keys_file_keeps_the_last_good_one_with_a_log_line(env: Env) -> None:
    good = env.keys_file.read_text()
    doc = yaml.safe_load(good)
    doc["keys"].append({"name": "leak", "hash": env.keys["chat"]})  # a plaintext key where a hash belongs
    env.keys_file.write_text(yaml.safe_dump(doc))
    try:
        # the file is checked on the request path: requests make the server look (and log the bad version once)
        wait_until(lambda: env.client("chat").models.list() and "looks like a plaintext key" in env.logs(), 10, 0.1,
                   "the bad-file log line")
        assert complete(env.client("chat")).http_response.status_code == 200  # the last good file is in force
        assert env.logs().count("keeping the last good keys file") == 1
    finally:
        env.keys_file.write_text(good)


def test_batch_priority_key_yields_to_an_interactive_key(env: Env) -> None:
    done: list[str] = []
    lock = threading.Lock()

    def send(name: str, key: str) -> None:
        client = env.client(key)
        client.completions.create(model=MODEL, prompt=name, max_tokens=300, extra_body={"min_tokens": 300})
        with lock:
            done.append(name)

    bulk = [threading.Thread(target=send, args=(f"bulk-{i}", "bulk")) for i in range(5)]
    for t in bulk:
        t.start()
    wait_until(lambda: scrape(env.server.base_url, "llm_queue_depth", model=MODEL) == 4, 60, 0.05, "4 queued")
    chat = threading.Thread(target=send, args=("chat", "chat"))
    chat.start()
    for t in [*bulk, chat]:
        t.join(120)
    # first come, first served would finish it last; it runs right after the running one (or the next)
    assert len(done) == 6 and done.index("chat") <= 2, done


def test_no_key_or_hash_appears_in_logs_metrics_readyz_or_errors(env: Env) -> None:
    texts = [env.logs(), httpx.get(env.server.base_url + "/metrics", timeout=10).text,
             httpx.get(env.server.base_url + "/readyz", timeout=10).text, *SEEN_BODIES]
    assert len(SEEN_BODIES) >= 5
    for key in env.keys.values():
        digest = hash_key(key)
        for text in texts:
            assert key not in text and digest[7:] not in text and digest[7:23] not in text


def test_grafana_keys_row_reads_what_prometheus_stores(env: Env, tmp_path: Path) -> None:
    """Every query of the dashboard's keys row returns data from a real Prometheus scraping this server (after the
    tests above: 2xx and refused requests, tokens and 429s by a key's own limit all have series)."""
    from tests.support.prometheus import assert_dashboard_queries_return_data, scraping

    prom = scraping(env.server.port, tmp_path)
    try:
        assert_dashboard_queries_return_data(prom, "llm_key_", 4)
    finally:
        prom.stop()


def test_usage_is_persisted_when_the_server_stops_and_only_admins_see_every_key(env: Env) -> None:
    """Last in the module (it stops the server). Reading the file back after a restart is UsageStore's unit test."""
    def usage(name: str) -> dict[str, Any]:
        r = httpx.get(env.server.base_url + "/v1/usage", headers={"Authorization": f"Bearer {env.keys[name]}"},
                      timeout=10)
        assert r.status_code == 200, r.text
        return r.json()

    before = {(r["key"], r["model"]): r for r in usage("ops")["data"]}
    assert before[("bulk", MODEL)]["requests"] == 5 and before[("bulk", MODEL)]["completion_tokens"] == 1500
    assert {r["key"] for r in usage("chat")["data"]} == {"chat"}
    assert "key=bulk" in env.logs()  # the access log names the key
    env.server.stop()
    stored = UsageStore(env.usage_db)
    after = {(r.key, r.model): r.as_dict() for r in stored.query(*usage_window(None, None))}
    stored.close()
    assert after == before
