"""nginx front door: the shipped template, rendered and run for real in front of real tiny-model servers.

Covers `nginx -t` with a private prefix, failover on SIGKILL of the primary during
a concurrent request loop (zero failures), traffic returning to a restarted primary,
SSE streaming through nginx, /nginx-health, loopback-only stub_status, body-size and
per-client rate limits. The front door's active checks (frozen primary, per-model
failover, edge exposure) are in tests/front_door/test_front_door.py.
"""

from __future__ import annotations

import itertools
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import httpx
import pytest

from app.ops.nginx import NginxSettings, render_nginx
from tests.support.env import ROOT, need, need_binary
from tests.support.front_door import Nginx, request_loop
from tests.support.openai_errors import assert_openai_error
from tests.support.servers import ServerProcess, free_port, stop_process, wait_until

COMPLETION = {"model": "tiny", "prompt": "hello", "max_tokens": 4}




@pytest.fixture
def nginx_factory(tmp_path: Path):  # type: ignore[no-untyped-def]
    started: list[Nginx] = []

    def _make(**settings: object) -> Nginx:
        n = Nginx(tmp_path / f"nginx{len(started)}", **settings)
        started.append(n)
        return n.start()

    yield _make
    for n in started:
        n.stop()


def _addr(srv: ServerProcess) -> str:
    return f"127.0.0.1:{srv.port}"


def test_render_cli_and_nginx_t(tmp_path: Path) -> None:
    need_binary("nginx")
    env = {**os.environ, "SERVE_PORT": "18000", "FALLBACK_PORT": "18001,18003", "NGINX_PORT": "18080",
           "NGINX_RATE_LIMIT": "5r/s", "NGINX_READ_TIMEOUT": "120s",
           "BATCH_PORT": "18002"}
    out = subprocess.run([sys.executable, "-m", "app", "ops", "render-nginx", "--out", str(tmp_path)],
                         cwd=ROOT, env=env, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    conf = (tmp_path / "nginx.conf").read_text()
    res = subprocess.run(["nginx", "-t", "-p", str(tmp_path), "-e", str(tmp_path / "logs/error.log"),
                          "-c", str(tmp_path / "nginx.conf")], capture_output=True, text=True, timeout=30)
    assert res.returncode == 0, res.stderr
    assert "test is successful" in res.stderr
    assert not re.search(r"^\s*user\s", conf, re.M), "a `user` directive breaks non-root runs"
    proxy = (tmp_path / "proxy.conf").read_text()
    # passive accounting off: one model's 503 must not eject the upstream (the front door checks actively)
    assert "server 127.0.0.1:18000 max_fails=0 fail_timeout=10s;" in conf
    assert "server 127.0.0.1:18001 max_fails=0 fail_timeout=10s backup;" in conf
    assert "server 127.0.0.1:18003 max_fails=0 fail_timeout=10s backup;" in conf
    assert "proxy_next_upstream error timeout http_502 http_503 non_idempotent;" in proxy
    assert "proxy_next_upstream_timeout 10s;" in proxy
    assert "listen 127.0.0.1:18080;" in conf and "listen 127.0.0.1:8081;" in conf
    assert "proxy_read_timeout 120s;" in proxy and "proxy_connect_timeout 2s;" in proxy
    # /v1/ and /health to the API upstreams; /v1/files and /v1/batches to the batch service: the proxied locations
    assert conf.count("include proxy.conf;") == 4
    batch = conf[conf.index("upstream llm_batch"):]
    assert "server 127.0.0.1:18002;" in batch[:batch.index("}")]
    files = conf[conf.index("location /v1/files"):]
    assert "client_max_body_size 201m;" in files[:files.index("}")] and "proxy_pass http://llm_batch;" in files
    for directive in ("client_header_timeout 10s;", "client_body_timeout 30s;", "large_client_header_buffers 4 32k;",
                      "keepalive_timeout 75s;"):
        assert directive in conf
    assert "limit_req zone=per_client burst=20 nodelay;" in conf and "rate=5r/s" in conf
    assert not re.search(r"\$\{[A-Z]", conf), "unrendered placeholder"


def test_render_rejects_bad_values(tmp_path: Path) -> None:
    env = {**os.environ, "NGINX_READ_TIMEOUT": "forever"}
    out = subprocess.run([sys.executable, "-m", "app", "ops", "render-nginx", "--out", str(tmp_path)],
                         cwd=ROOT, env=env, capture_output=True, text=True, timeout=60)
    assert out.returncode == 2 and "NGINX_READ_TIMEOUT" in out.stderr, out.stderr
    env = {**os.environ, "NGINX_BACKUPS": "10.0.0.5"}
    out = subprocess.run([sys.executable, "-m", "app", "ops", "render-nginx", "--out", str(tmp_path)],
                         cwd=ROOT, env=env, capture_output=True, text=True, timeout=60)
    assert out.returncode == 2 and "NGINX_BACKUPS" in out.stderr, out.stderr


def test_streaming_limits_health_and_status(start_server, nginx_factory) -> None:  # type: ignore[no-untyped-def]
    srv = start_server()
    ngx = nginx_factory(serve_port=srv.port, fallback_port=str(free_port()), nginx_max_body="2k",
                        nginx_expose_upstream=True)
    conf = ngx.conf.read_text()
    # a timing test alone cannot prove the absence of buffering: assert the directives too
    conf += (ngx.prefix / "proxy.conf").read_text()
    for directive in ("proxy_buffering off;", "gzip off;", "proxy_cache off;", "proxy_http_version 1.1;",
                      'proxy_set_header Connection "";', "add_header X-Accel-Buffering no always;"):
        assert directive in conf

    assert httpx.get(ngx.base_url + "/nginx-health", timeout=5).text == "ok\n"
    status = httpx.get(f"http://127.0.0.1:{ngx.status_port}/stub_status", timeout=5)
    assert status.status_code == 200 and "Active connections" in status.text
    assert f"listen 127.0.0.1:{ngx.status_port};" in conf

    body = {"model": "tiny", "prompt": "stream me", "max_tokens": 300, "min_tokens": 300, "stream": True}
    stamps: list[float] = []
    lines: list[str] = []
    with httpx.stream("POST", ngx.base_url + "/v1/completions", json=body, timeout=120) as resp:
        assert resp.status_code == 200
        assert resp.headers["content-type"].startswith("text/event-stream")
        assert resp.headers["x-upstream"] == _addr(srv)
        assert resp.headers.get("x-accel-buffering") == "no"
        assert "content-encoding" not in resp.headers
        for line in resp.iter_lines():
            if line.startswith("data: "):
                stamps.append(time.monotonic())
                lines.append(line)
    assert lines[-1] == "data: [DONE]"
    assert len(lines) > 50
    # 300 tokens take well over 100 ms on this CPU; a buffered proxy would deliver them in one burst
    spread = stamps[-1] - stamps[0]
    print(f"\nSSE through nginx: {len(lines)} events over {spread:.3f}s")
    assert spread > 0.1, f"all {len(lines)} chunks arrived within {spread:.3f}s: nginx buffered the stream"
    # chunks arrive spread out, not in a handful of bursts
    gaps = [b - a for a, b in itertools.pairwise(stamps)]
    assert sum(1 for g in gaps if g > 0.0005) > len(gaps) // 4

    big = {"model": "tiny", "prompt": "x" * 4096, "max_tokens": 1}
    too_big = httpx.post(ngx.base_url + "/v1/completions", json=big, timeout=30)
    assert assert_openai_error(too_big, 413)["code"] == "request_too_large" and too_big.headers["x-request-id"]


def test_rate_limit_per_client(start_server, nginx_factory) -> None:  # type: ignore[no-untyped-def]
    srv = start_server()
    ngx = nginx_factory(serve_port=srv.port, fallback_port=str(free_port()), nginx_rate_limit="1r/m",
                        nginx_rate_burst=1)
    answers = [httpx.get(ngx.base_url + "/v1/models", timeout=30) for _ in range(4)]
    codes = [r.status_code for r in answers]
    assert codes[:2] == [200, 200] and codes[2:] == [429, 429], codes
    assert assert_openai_error(answers[3], 429)["type"] == "rate_limit_error" and answers[3].headers["retry-after"]
    assert httpx.get(ngx.base_url + "/nginx-health", timeout=5).status_code == 200  # not rate limited




def test_failover_on_sigkill_and_return_of_primary(start_server, nginx_factory, tmp_path: Path,
                                                  tiny_model: Path) -> None:  # type: ignore[no-untyped-def]
    primary, backup = start_server(), start_server()
    fail_timeout = 10
    ngx = nginx_factory(serve_port=primary.port, fallback_port=str(backup.port),
                        nginx_fail_timeout=f"{fail_timeout}s", nginx_expose_upstream=True)

    results = request_loop(ngx.base_url + "/v1/completions", 240, 4,
                            {60: lambda: primary.stop(signal.SIGKILL)})
    assert len(results) == 240
    # A response the primary had begun to send when it died cannot be moved (nginx never replays bytes it has
    # passed on): that request fails at the client, and nginx logs the primary's 200 cut short. At most the
    # requests in flight at the kill (3: the fourth thread is the one killing); every other one must succeed.
    failed = [r for r in results if r[0] != 200]
    cut = len(re.findall(r"(upstream prematurely closed connection|reset by peer\)) while reading upstream,",
                         ngx.error_log()))
    assert len(failed) <= min(cut, 3), (f"failed requests during the primary kill: {failed}; responses cut by "
                                        f"the kill (nginx error log): {cut}")
    assert all(r == (-1, "RemoteProtocolError") for r in failed), failed
    # who answered (max_fails=0: the dead one is tried first)
    served = Counter(up.split(", ")[-1] for code, up in results if code == 200)
    assert served[_addr(primary)] >= 50 and served[_addr(backup)] >= 150, served
    log = ngx.access_log()
    # the log names the upstreams tried, in order (max_fails=0: the dead primary first, then the backup)
    assert f"upstream={_addr(primary)} " in log and f"upstream={_addr(primary)}, {_addr(backup)} " in log
    assert re.search(r"urt=[0-9.]+", log)

    # the primary comes back on the same port: it gets traffic again within fail_timeout of its last failure.
    # First wait for nginx's next probe of the dead primary (a request tried on both), so the clock starts
    # at a known failure; then restart the primary and time how long until nginx sends it traffic again.
    def post() -> httpx.Response:
        r = httpx.post(ngx.base_url + "/v1/completions", json=COMPLETION, timeout=60)
        assert r.status_code == 200
        return r

    wait_until(lambda: post().headers["x-upstream"] == f"{_addr(primary)}, {_addr(backup)}", fail_timeout + 10,
               0.2, "nginx probing the dead primary")
    failed_at = time.monotonic()
    revived = ServerProcess(["--model", str(tiny_model), "--served-model-name", "tiny"], port=primary.port,
                            log_path=tmp_path / "revived.log")
    try:
        revived.wait_ready()
        ready_after = time.monotonic() - failed_at
        wait_until(lambda: post().headers["x-upstream"] == _addr(primary), fail_timeout + 10, 0.2,
                   "traffic back on the restarted primary")
        back_after = time.monotonic() - failed_at
        print(f"\nSIGKILL loop: {dict(served)}; restarted primary ready {ready_after:.2f}s and back in use "
              f"{back_after:.2f}s after its last failure (fail_timeout {fail_timeout}s)")
        # slack: nginx keeps time in whole seconds (fail_timeout expires up to 1s late), plus one poll round trip
        assert back_after <= max(fail_timeout, ready_after) + 3, f"primary got traffic only after {back_after:.1f}s"
    finally:
        revived.stop(signal.SIGKILL)


def test_runs_as_non_root_user(tmp_path: Path) -> None:
    need_binary("nginx", "setpriv")
    need(os.geteuid() == 0, "needs root to switch to the unprivileged user `nobody`")
    base = Path(tempfile.mkdtemp(prefix="nginx-nobody-", dir="/tmp"))  # pytest's tmp_path is 0700 root-only
    base.chmod(0o755)
    prefix = base / "prefix"
    port, status_port = free_port(), free_port()
    conf = render_nginx(prefix, NginxSettings(nginx_port=port, nginx_status_port=status_port,
                                              nginx_worker_processes="1"))
    subprocess.run(["chown", "-R", "nobody", str(prefix)], check=True)
    # setpriv execs nginx itself (no wrapper process that would swallow signals)
    cmd = ["setpriv", "--reuid=nobody", "--regid=nogroup", "--clear-groups",
           "nginx", "-p", str(prefix), "-e", str(prefix / "logs" / "error.log"), "-c", str(conf)]
    res = subprocess.run([*cmd, "-t"], capture_output=True, text=True, timeout=30)
    assert res.returncode == 0, res.stderr
    proc = subprocess.Popen([*cmd, "-g", "daemon off;"], stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
    try:
        wait_until(lambda: httpx.get(f"http://127.0.0.1:{port}/nginx-health", timeout=2).status_code == 200,
                   30, 0.1, "nginx as nobody")
        assert (prefix / "nginx.pid").read_text().strip()  # pid file written by an unprivileged master
        r = httpx.get(f"http://127.0.0.1:{port}/v1/models", timeout=10)
        assert assert_openai_error(r, 502)["code"] == "bad_gateway"  # no upstream: nginx works unprivileged
    finally:
        stop_process(proc, signal.SIGQUIT, 15)
        shutil.rmtree(base, ignore_errors=True)
