"""Batch client (`python -m app batch`) against real servers on 127.0.0.1.

The client always runs as a real subprocess. Its peers are the standalone server
with the tiny model and, for the failure modes a healthy server does not produce
on demand, a deliberately failing HTTP server in this test process that follows
a script (429 + Retry-After, 502/503, dropped connections, 400) and records when
each request arrived.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from tests.support.env import ROOT
from tests.support.servers import free_port, wait_until

FAST_RETRY = ["--backoff", "0.05", "--max-backoff", "0.2", "--cooldown", "0.5"]


def batch_cmd(inp: Path, out: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "app", "batch", str(inp), "-o", str(out), "--no-progress", *extra]


def run_batch(inp: Path, out: Path, *extra: str, timeout: float = 240) -> subprocess.CompletedProcess[str]:
    return subprocess.run(batch_cmd(inp, out, *extra), cwd=ROOT, capture_output=True, text=True, timeout=timeout)


def write_jsonl(path: Path, rows: list[Any]) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def read_out(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def count_lines(path: Path) -> int:
    return path.read_text().count("\n") if path.exists() else 0


def prompts(n: int, tokens: int = 8, prefix: str = "p") -> list[dict[str, Any]]:
    return [{"id": f"{prefix}{i}", "prompt": f"request {i} says hello", "max_tokens": tokens, "min_tokens": tokens,
             "ignore_eos": True} for i in range(n)]


# ----------------------------------------------------------------------------- deliberately failing server


class ScriptedServer:
    """OpenAI-shaped HTTP server on 127.0.0.1 that answers each POST with the next action of `script`.

    Actions: "ok", "429:<retry-after>", "503", "502", "400", "drop" (close without a response).
    When the script runs out it answers "ok". Each POST's arrival (monotonic time, action) is recorded.
    """

    def __init__(self, script: list[str], text: str = "scripted ok"):
        self.script = list(script)
        self.text = text
        self.hits: list[tuple[float, str]] = []
        self.lock = threading.Lock()
        outer = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: Any) -> None:
                pass

            def _send(self, status: int, body: dict[str, Any], headers: dict[str, str] | None = None) -> None:
                raw = json.dumps(body).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(raw)))
                for k, v in (headers or {}).items():
                    self.send_header(k, v)
                self.end_headers()
                self.wfile.write(raw)

            def do_POST(self) -> None:
                self.rfile.read(int(self.headers.get("Content-Length", 0)))
                with outer.lock:
                    action = outer.script.pop(0) if outer.script else "ok"
                    outer.hits.append((time.monotonic(), action))
                if action == "drop":
                    self.close_connection = True
                    return
                if action.startswith("429"):
                    self._send(429, {"error": {"message": "slow down", "type": "rate_limit_error"}},
                               {"Retry-After": action.split(":")[1]})
                elif action in ("502", "503", "400"):
                    self._send(int(action), {"error": {"message": f"scripted {action}", "type": "scripted"}})
                else:
                    self._send(200, {"id": "cmpl-1", "object": "text_completion", "created": 0, "model": "m",
                                     "choices": [{"index": 0, "text": outer.text, "finish_reason": "stop"}],
                                     "usage": {"prompt_tokens": 3, "completion_tokens": 2, "total_tokens": 5}})

        self.httpd = ThreadingHTTPServer(("127.0.0.1", free_port()), Handler)
        self.base_url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def scripted() -> Iterator[Any]:
    servers: list[ScriptedServer] = []

    def make(script: list[str], text: str = "scripted ok") -> ScriptedServer:
        servers.append(ScriptedServer(script, text))
        return servers[-1]

    yield make
    for s in servers:
        s.close()


# ----------------------------------------------------------------------------- against the tiny server


def test_bad_lines_reported_and_batch_goes_on_with_stream_ttft(core_server: Any, tmp_path: Path) -> None:
    inp = write_jsonl(tmp_path / "in.jsonl", [
        {"id": 1, "prompt": "hello", "max_tokens": 4, "min_tokens": 4, "ignore_eos": True},
        "this is not json",
        {"id": "chat", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4, "min_tokens": 4},
        {"prompt": "no id"},
        {"id": 3},
        {"id": 1, "prompt": "duplicate id"},
        "[1, 2]",
        {"id": "bad-param", "prompt": "x", "temperature": -1},
        {"id": 5, "prompt": "last one", "max_tokens": 4, "min_tokens": 4},
    ])
    out, summary = tmp_path / "out.jsonl", tmp_path / "summary.json"
    res = run_batch(inp, out, "-e", core_server.base_url, "--stream", "--summary-json", str(summary))
    assert res.returncode == 1, res.stderr  # some lines failed
    for line_no in (2, 4, 5, 6, 7):
        assert f"in.jsonl:{line_no}: skipped" in res.stderr
    recs = {r["id"]: r for r in read_out(out)}
    assert sorted(recs, key=str) == sorted([1, "chat", "bad-param", 5], key=str)
    for rid in (1, "chat", 5):
        r = recs[rid]
        assert r["ok"] and r["text"] is not None and r["usage"]["completion_tokens"] >= 1
        assert r["endpoint"] == core_server.base_url and r["attempts"] == 1
        assert 0 < r["ttft_s"] <= r["latency_s"]
    bad = recs["bad-param"]
    assert not bad["ok"] and bad["attempts"] == 1 and bad["error"]["status"] == 400  # never retried
    s = json.loads(summary.read_text())
    assert (s["ok"], s["failed"], s["requests"]) == (3, 1, 4)
    assert [b["line"] for b in s["invalid_lines"]] == [2, 4, 5, 6, 7]
    assert s["ttft_s"]["p50"] > 0 and s["latency_s"]["p99"] >= s["latency_s"]["p50"] > 0
    assert "batch summary" in res.stderr and "p50 / p95 / p99" in res.stderr


def test_api_key(start_server: Any, tmp_path: Path) -> None:
    srv = start_server(env={"API_KEYS": "k-one,k-two"})
    inp = write_jsonl(tmp_path / "in.jsonl", prompts(3, tokens=2))
    res = run_batch(inp, tmp_path / "nokey.jsonl", "-e", srv.base_url, "--model", "tiny", *FAST_RETRY)
    assert res.returncode == 1
    recs = read_out(tmp_path / "nokey.jsonl")
    assert len(recs) == 3 and all(r["error"]["status"] == 401 and r["attempts"] == 1 for r in recs)

    res = run_batch(inp, tmp_path / "key.jsonl", "-e", srv.base_url, "--api-key", "k-two")
    assert res.returncode == 0, res.stderr
    assert all(r["ok"] for r in read_out(tmp_path / "key.jsonl"))


def test_failover_when_first_endpoint_dies_mid_batch(start_server: Any, tmp_path: Path) -> None:
    first, second = start_server(), start_server()
    rows = prompts(80, tokens=48)
    inp = write_jsonl(tmp_path / "in.jsonl", rows)
    out = tmp_path / "out.jsonl"
    proc = subprocess.Popen(batch_cmd(inp, out, "-e", first.base_url, "-e", second.base_url, "--concurrency", "4",
                                      "--summary-json", str(tmp_path / "s.json"), *FAST_RETRY),
                            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        wait_until(lambda: count_lines(out) >= 10, 120, 0.05, "the first results")
        first.stop(signal.SIGKILL)
        stdout, _ = proc.communicate(timeout=240)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, stdout
    recs = read_out(out)
    ids = Counter(r["id"] for r in recs)
    assert set(ids) == {r["id"] for r in rows} and max(ids.values()) == 1  # none lost, none duplicated
    assert all(r["ok"] for r in recs)
    used = Counter(r["endpoint"] for r in recs)
    assert used[first.base_url] >= 1 and used[second.base_url] >= 1
    assert recs[-1]["endpoint"] == second.base_url


def test_resume_after_client_killed_mid_batch(core_server: Any, tmp_path: Path) -> None:
    rows = prompts(80, tokens=48, prefix="r")
    inp = write_jsonl(tmp_path / "in.jsonl", rows)
    out = tmp_path / "out.jsonl"
    proc = subprocess.Popen(batch_cmd(inp, out, "-e", core_server.base_url, "--concurrency", "2"), cwd=ROOT,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_until(lambda: count_lines(out) >= 5, 120, 0.02, "some results")
    finally:
        proc.kill()
        proc.wait(30)
    before = count_lines(out)
    assert before < len(rows), "the batch finished before the kill; make it longer"

    res = run_batch(inp, out, "-e", core_server.base_url, "--concurrency", "4")
    assert res.returncode == 2 and "--resume" in res.stderr  # refuses to mix runs without --resume
    res = run_batch(inp, out, "-e", core_server.base_url, "--concurrency", "4", "--resume",
                    "--summary-json", str(tmp_path / "s.json"))
    assert res.returncode == 0, res.stderr
    recs = read_out(out)
    ids = Counter(r["id"] for r in recs)
    assert set(ids) == {r["id"] for r in rows} and max(ids.values()) == 1
    assert all(r["ok"] for r in recs)
    s = json.loads((tmp_path / "s.json").read_text())
    assert s["skipped_resume"] >= before - 1 and s["skipped_resume"] + s["requests"] == len(rows)


# ----------------------------------------------------------------------------- against the failing server


def test_429_retry_after_is_honoured(scripted: Any, tmp_path: Path) -> None:
    srv = scripted(["429:1", "ok"])
    inp = write_jsonl(tmp_path / "in.jsonl", [{"id": "a", "prompt": "x"}])
    res = run_batch(inp, tmp_path / "out.jsonl", "-e", srv.base_url, "--model", "m", *FAST_RETRY)
    assert res.returncode == 0, res.stderr
    (rec,) = read_out(tmp_path / "out.jsonl")
    assert rec["ok"] and rec["attempts"] == 2 and rec["text"] == "scripted ok"
    (t1, a1), (t2, a2) = srv.hits
    assert (a1, a2) == ("429:1", "ok")
    assert t2 - t1 >= 0.95  # waited for Retry-After (1 s), not the 0.05 s backoff


def test_transient_errors_retried_other_4xx_not(scripted: Any, tmp_path: Path) -> None:
    srv = scripted(["503", "drop", "502", "ok", "400"])
    inp = write_jsonl(tmp_path / "in.jsonl", [{"id": "a", "prompt": "x"}, {"id": "b", "prompt": "y"}])
    res = run_batch(inp, tmp_path / "out.jsonl", "-e", srv.base_url, "--model", "m", "--concurrency", "1",
                    *FAST_RETRY)
    assert res.returncode == 1
    recs = {r["id"]: r for r in read_out(tmp_path / "out.jsonl")}
    assert recs["a"]["ok"] and recs["a"]["attempts"] == 4
    assert not recs["b"]["ok"] and recs["b"]["attempts"] == 1 and recs["b"]["error"]["status"] == 400
    assert [a for _, a in srv.hits] == ["503", "drop", "502", "ok", "400"]


def test_retry_budget_caps_retries(scripted: Any, tmp_path: Path) -> None:
    srv = scripted(["503"] * 100)
    inp = write_jsonl(tmp_path / "in.jsonl", [{"id": i, "prompt": "x"} for i in range(4)])
    res = run_batch(inp, tmp_path / "out.jsonl", "-e", srv.base_url, "--model", "m", "--concurrency", "1",
                    "--retry-budget", "3", "--max-attempts", "10", "--summary-json", str(tmp_path / "s.json"),
                    *FAST_RETRY)
    assert res.returncode == 1
    recs = read_out(tmp_path / "out.jsonl")
    assert len(recs) == 4 and not any(r["ok"] for r in recs)
    assert len(srv.hits) == 4 + 3  # one try each plus the budget's 3 retries
    assert any("retry budget exhausted" in r["error"]["message"] for r in recs)
    assert json.loads((tmp_path / "s.json").read_text())["retries"] == 3


def test_failover_from_refusing_endpoint(scripted: Any, tmp_path: Path) -> None:
    dead = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    srv = scripted([])
    inp = write_jsonl(tmp_path / "in.jsonl", [{"id": i, "prompt": "x"} for i in range(6)])
    res = run_batch(inp, tmp_path / "out.jsonl", "-e", dead, "-e", srv.base_url, "--model", "m",
                    "--concurrency", "2", "--cooldown", "30")
    assert res.returncode == 0, res.stderr
    recs = read_out(tmp_path / "out.jsonl")
    assert len(recs) == 6 and all(r["ok"] and r["endpoint"] == srv.base_url for r in recs)
    assert len(srv.hits) == 6


def test_output_lines_survive_unicode_line_separators(scripted: Any, tmp_path: Path) -> None:
    # A model may generate U+2028/U+2029/U+0085: legal raw inside JSON, but splitlines() and most JSONL
    # readers end a line there. Each record must stay one line and round-trip to the exact text.
    text = "one\u2028two\u2029three\u0085four \u00e9\u4e2d"
    srv = scripted([], text)
    inp = write_jsonl(tmp_path / "in.jsonl", [{"id": i, "prompt": "x"} for i in range(3)])
    out = tmp_path / "out.jsonl"
    res = run_batch(inp, out, "-e", srv.base_url, "--model", "m")
    assert res.returncode == 0, res.stderr
    raw = out.read_text(encoding="utf-8")
    assert "\u2028" not in raw and "\u00e9\u4e2d" in raw  # separators escaped, other text kept readable
    recs = read_out(out)  # splits with str.splitlines()
    assert len(recs) == 3 and all(r["ok"] and r["text"] == text for r in recs)
    again = run_batch(inp, out, "-e", srv.base_url, "--model", "m", "--resume")  # all three ids recognised
    assert again.returncode == 0, again.stderr
    assert len(read_out(out)) == 3 and len(srv.hits) == 3


def test_input_that_is_not_utf8_is_reported_not_altered(scripted: Any, tmp_path: Path) -> None:
    srv = scripted([])
    inp = tmp_path / "in.jsonl"
    inp.write_bytes(b"\xef\xbb\xbf" + b'{"id": 1, "prompt": "first line after a byte-order mark"}\r\n'
                    + b'{"id": 2, "prompt": "latin-1 caf\xe9"}\n'
                    + '{"id": 3, "prompt": "caf\u00e9 \u4e2d\u6587"}\n'.encode())
    out, summary = tmp_path / "out.jsonl", tmp_path / "s.json"
    res = run_batch(inp, out, "-e", srv.base_url, "--model", "m", "--summary-json", str(summary))
    assert res.returncode == 1, res.stderr  # an unusable input line makes the batch exit 1
    assert "in.jsonl:2: skipped: not valid UTF-8" in res.stderr
    assert sorted(r["id"] for r in read_out(out)) == [1, 3] and len(srv.hits) == 2
    s = json.loads(summary.read_text())
    assert [b["line"] for b in s["invalid_lines"]] == [2] and s["input_lines"] == 3
