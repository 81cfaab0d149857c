"""The standalone server process: readiness while the model loads, a broken model, graceful shutdown.

- `/readyz` is 503 from the first moment the port answers until the model has loaded
  and warmed up, then 200; `/healthz` is 200 throughout.
- A model that cannot load keeps `/readyz` at 503 with the error in its detail, and
  generation requests get a 503 in OpenAI shape.
- SIGTERM during an in-flight stream: the stream still completes with [DONE], new
  connections are refused (or `/readyz` says 503), and the process exits 0 within the bound;
  a stream that outlives the bound ends with an SSE error `server_shutting_down` and [DONE].
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx

from tests.support.env import ROOT
from tests.support.openai_errors import assert_openai_error
from tests.support.servers import STARTUP_S, ServerProcess, spawn_server, wait_until

GRACE_S = 20


def _status(url: str) -> int | str:
    try:
        return httpx.get(url, timeout=5).status_code
    except httpx.TransportError:
        return "refused"


def test_readyz_503_until_loaded_then_200_and_graceful_sigterm(tmp_path: Path, tiny_model: Path) -> None:
    srv = spawn_server(tmp_path, tiny_model, env={"LLM_GRACEFUL_TIMEOUT_S": str(GRACE_S)}, wait=False)
    try:
        # poll from the first moment: the port opens before the model is loaded
        seen: list[int | str] = []
        loading_errors: list[dict] = []

        def ready() -> bool:
            assert srv.proc.poll() is None, srv.log_text()[-2000:]
            code = _status(srv.base_url + "/readyz")
            seen.append(code)
            if code == 503:
                assert _status(srv.base_url + "/healthz") == 200
                if not loading_errors:  # a request while the model loads: 503 + Retry-After, not a hang
                    r = httpx.post(srv.base_url + "/v1/completions", json={"model": "tiny", "prompt": "x",
                                                                           "max_tokens": 1}, timeout=30)
                    if r.status_code != 200:  # (200 if loading finished in between)
                        err = assert_openai_error(r, 503)
                        assert int(r.headers["retry-after"]) >= 1
                        loading_errors.append(err)
            return code == 200

        wait_until(ready, 120, 0.01, "readyz 200")
        answered = [c for c in seen if c != "refused"]
        assert answered[0] == 503, seen[:20]
        assert set(answered) == {503, 200}
        assert loading_errors and loading_errors[0]["code"] == "engine_not_ready", loading_errors

        # a long stream is in flight when SIGTERM arrives
        body = {"model": "tiny", "prompt": "drain me", "max_tokens": 600, "ignore_eos": True, "stream": True}
        with httpx.Client(timeout=60) as http, http.stream("POST", srv.base_url + "/v1/completions",
                                                           json=body) as resp:
            lines = resp.iter_lines()
            assert next(lines).startswith("data: ")
            srv.proc.send_signal(signal.SIGTERM)
            sent_at = time.monotonic()
            # stop accepting: new connections are refused (or a still-open listener reports draining)
            wait_until(lambda: _status(srv.base_url + "/readyz") in ("refused", 503), 10, 0.05,
                       "readyz 503 or connection refused after SIGTERM")
            rest = [line for line in lines if line.startswith("data: ")]
        assert rest[-1] == "data: [DONE]"
        finishes = [json.loads(e[6:])["choices"][0]["finish_reason"] for e in rest[:-1]]
        assert finishes[-1] == "length"
        rc = srv.proc.wait(GRACE_S + 15)
        assert rc == 0, srv.log_text()[-2000:]
        assert time.monotonic() - sent_at < GRACE_S + 15
        assert _status(srv.base_url + "/healthz") == "refused"
    finally:
        srv.stop(signal.SIGKILL)


def test_graceful_bound_cuts_streams_with_an_error_event_and_done(tmp_path: Path, tiny_model: Path) -> None:
    # a bound of 0 cuts at once, so the test does not depend on how fast 2000 tokens are generated
    srv = spawn_server(tmp_path, tiny_model, env={"LLM_GRACEFUL_TIMEOUT_S": "0"})
    try:
        body = {"model": "tiny", "prompt": "x", "max_tokens": 2000, "ignore_eos": True, "stream": True}
        with httpx.Client(timeout=60) as http, http.stream("POST", srv.base_url + "/v1/completions",
                                                           json=body) as resp:
            lines = resp.iter_lines()
            assert next(lines).startswith("data: ")
            srv.proc.send_signal(signal.SIGTERM)
            sent_at = time.monotonic()
            events = [line for line in lines if line.startswith("data: ")]
        # the cut is the server's doing: an SSE error event, then [DONE] (never a bare connection close)
        assert events[-1] == "data: [DONE]", events[-3:]
        err = json.loads(events[-2][6:])["error"]
        assert err["code"] == "server_shutting_down" and err["type"] == "server_shutting_down", err
        srv.proc.wait(30)
        assert time.monotonic() - sent_at < 15
        log = srv.log_text()
        assert "Traceback" not in log and "Event loop is closed" not in log, log[-3000:]
        # counted as a server-side cut (503), not as a client disconnect (499)
        access = [line for line in log.splitlines() if " completions model=" in line]
        assert any("status=503 error=server_shutting_down" in line for line in access), log[-3000:]
        assert not any("status=499" in line for line in access), access
    finally:
        srv.stop(signal.SIGKILL)


def test_broken_model_keeps_readyz_503_with_the_error(tmp_path: Path) -> None:
    broken = tmp_path / "broken-model"
    broken.mkdir()
    (broken / "config.json").write_text("{}")
    srv = spawn_server(tmp_path, broken, "--engine", "transformers", wait=False)
    try:
        wait_until(lambda: _status(srv.base_url + "/healthz") == 200, 60, 0.05, "healthz")

        def failed() -> dict | None:
            r = httpx.get(srv.base_url + "/readyz", timeout=5)
            assert r.status_code == 503
            detail = r.json()["models"]["tiny"]
            return detail if "failed to start" in detail.get("reason", "") else None

        # a load that fails takes the path of one that succeeds up to the failure: the same start-up bound
        detail = wait_until(failed, STARTUP_S, 0.1, "load failure in /readyz")
        assert detail["ready"] is False
        assert detail["error"]
        assert _status(srv.base_url + "/healthz") == 200
        r = httpx.post(srv.base_url + "/v1/completions", json={"model": "tiny", "prompt": "x"}, timeout=30)
        err = assert_openai_error(r, 503)
        assert err["type"] == "service_unavailable"
        models = httpx.get(srv.base_url + "/v1/models", timeout=5).json()["data"]
        assert models[0]["id"] == "tiny" and models[0]["ready"] is False
        assert srv.proc.poll() is None  # the process stays up (nginx fails over on /readyz)
    finally:
        srv.stop(signal.SIGKILL)


def test_serve_rejects_bad_options_with_one_line_errors(tiny_model: Path) -> None:
    out = subprocess.run([sys.executable, "-m", "app", "serve", "--model", str(tiny_model), "--port", "0"],
                         cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert out.returncode == 2
    assert "port" in out.stderr and "Traceback" not in out.stderr
    out = subprocess.run([sys.executable, "-m", "app", "serve"], cwd=ROOT, capture_output=True, text=True,
                         timeout=60, env={**os.environ, "LLM_MODEL": ""})
    assert out.returncode == 2
    assert "--model" in out.stderr and "Traceback" not in out.stderr


def test_serve_names_a_missing_model_folder_and_the_fix(tmp_path: Path) -> None:
    """A plainly local model path that is not there fails at once, naming the folder (not the hub's repo-id
    wording), instead of a server that stays not-ready; the relative form is resolved against the cwd."""
    for given, resolved in ((".cache/tiny-model", tmp_path / ".cache" / "tiny-model"),
                            (str(tmp_path / "gone" / "model"), tmp_path / "gone" / "model")):
        out = subprocess.run([sys.executable, "-m", "app", "serve", "--model", given, "--port", "18999"],
                             cwd=tmp_path, capture_output=True, text=True, timeout=60,
                             env={**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1"})
        assert out.returncode == 2, out.stderr
        assert f"{given!r} is a local path" in out.stderr and f"resolved: {resolved}" in out.stderr, out.stderr
        assert "make-tiny-model" in out.stderr and "Traceback" not in out.stderr and "Repo id" not in out.stderr



def test_access_log_line_per_request_carries_the_client_request_id(core_server: Any, start_server: Any) -> None:
    srv = core_server
    body = {"model": "tiny", "prompt": "log me", "max_tokens": 3, "ignore_eos": True}
    r = httpx.post(srv.base_url + "/v1/completions", json=body, headers={"X-Request-Id": "trace-42"}, timeout=60)
    assert r.status_code == 200 and r.headers["x-request-id"] == "trace-42"
    bad = httpx.post(srv.base_url + "/v1/chat/completions", json={"model": "nope", "messages": []}, timeout=30,
                     headers={"X-Request-Id": "evil id <x>"})
    assert bad.status_code == 400 and bad.headers["x-request-id"] == "evil_id__x_"  # sanitised before use

    def lines() -> list[str]:
        return [ln for ln in srv.log_text().splitlines() if "app.access" in ln]

    wait_until(lambda: len(lines()) >= 2, 10, 0.1, "two access-log lines")
    ok = next(ln for ln in lines() if "trace-42" in ln)
    assert "completions model=tiny engine=transformers status=200" in ok
    assert "prompt_tokens=" in ok and "output_tokens=3" in ok and "latency_s=" in ok
    refused = next(ln for ln in lines() if "evil_id__x_" in ln)
    assert "chat model=- engine=- status=400 error=invalid_request_error" in refused

    quiet = start_server(env={"LLM_ACCESS_LOG": "false"})
    assert httpx.post(quiet.base_url + "/v1/completions", json=body, timeout=60).status_code == 200
    assert quiet.stop() == 0  # SIGTERM: drained and flushed
    assert "app.access" not in quiet.log_text() and "serving tiny" in quiet.log_text()


def test_default_model_id_is_the_folder_name_and_the_path_still_works(tmp_path: Path, tiny_model: Path) -> None:
    """`serve --model /some/dir/tiny` without --served-model-name: /v1/models lists `tiny` (as the Ray path names
    models), requests may send `tiny` or the path; other names are a 404 listing `tiny`."""
    srv = ServerProcess(["--model", str(tiny_model)], log_path=tmp_path / "server.log")
    try:
        srv.wait_ready()
        ids = [m["id"] for m in httpx.get(srv.base_url + "/v1/models", timeout=10).json()["data"]]
        assert ids == [tiny_model.name]
        for name in (tiny_model.name, str(tiny_model)):
            r = httpx.post(srv.base_url + "/v1/completions", json={"model": name, "prompt": "hi", "max_tokens": 2},
                           timeout=60)
            assert r.status_code == 200, r.text
        err = assert_openai_error(httpx.post(srv.base_url + "/v1/completions", json={
            "model": "other", "prompt": "hi", "max_tokens": 2}, timeout=30), 404)
        assert tiny_model.name in err["message"] and str(tiny_model) not in err["message"]
    finally:
        srv.stop()


def test_without_xgrammar_tools_and_response_format_name_the_fix_and_logprobs_still_work(
        start_server: Any, tmp_path: Path) -> None:
    """A plain `pip install` lacks xgrammar (the `structured` extra): the server serves, /readyz names the missing
    package and its install command, tools and response_format answer 501 naming it (never "invalid JSON
    schema"), and logprobs need nothing beyond the base install."""
    site = tmp_path / "no-xgrammar"
    site.mkdir()
    # the process sees xgrammar as absent: `import xgrammar` fails as for a package that is not installed
    (site / "sitecustomize.py").write_text("import sys\nsys.modules['xgrammar'] = None\n")
    env = {"PYTHONPATH": os.pathsep.join(filter(None, [str(site), os.environ.get("PYTHONPATH", "")]))}
    srv = start_server(env=env)
    ready = httpx.get(f"{srv.base_url}/readyz", timeout=10).json()
    [missing] = ready["missing_packages"]
    assert missing["package"] == "xgrammar" and "pip install" in missing["fix"]
    assert "response_format" in missing["needed_for"]

    schema = {"type": "object", "properties": {"q": {"type": "string"}}, "required": ["q"]}
    tool = {"type": "function", "function": {"name": "search", "parameters": schema}}
    chat = {"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}
    for extra, param in (({"response_format": {"type": "json_schema", "json_schema": {"name": "q", "schema": schema}}},
                          "response_format"), ({"tools": [tool], "tool_choice": "required"}, "tools")):
        r = httpx.post(f"{srv.base_url}/v1/chat/completions", json={**chat, **extra}, timeout=60)
        assert r.status_code == 501, r.text
        err = r.json()["error"]
        assert err["code"] == "missing_package" and "xgrammar" in err["message"] and "pip install" in err["message"]
        assert "invalid JSON schema" not in err["message"] and param in (err["param"] or "") + err["message"]

    r = httpx.post(f"{srv.base_url}/v1/chat/completions", json={**chat, "logprobs": True, "top_logprobs": 2},
                   timeout=60)
    assert r.status_code == 200, r.text
    entries = r.json()["choices"][0]["logprobs"]["content"]
    assert entries and all(len(e["top_logprobs"]) == 2 for e in entries)
    assert "xgrammar is not installed" in srv.log_text()
