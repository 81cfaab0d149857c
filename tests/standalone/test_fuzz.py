"""Schema-driven fuzzing (schemathesis, every check) of the standalone server and of the front door.

The server's `/openapi.json` documents the real error responses (400/401/404/405/413/429/503 in the
OpenAI error shape, no 422), so schemathesis can hold each answer to it: no 5xx, no response that the
schema does not describe, no valid request refused, no invalid one accepted. Examples are bounded
(`-n`, fixed seed) so each run takes well under a minute; the server must still answer afterwards.
Rules that need the whole request or the server (token budget within the context, tool messages answering a
call, a named tool_choice among the tools) are 400s a schema-valid body may earn: tests/support/fuzz_hooks.py allows
exactly those in the "valid data is accepted" check.
Through nginx the schema is read from the server itself (the edge does not expose /openapi.json).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.support.env import ROOT
from tests.support.front_door import FrontDoorProcess
from tests.support.servers import ServerProcess, spawn_server

MAX_EXAMPLES = 20  # per operation and phase: ~900 requests per run


@pytest.fixture(scope="module")
def fuzzed(tmp_path_factory: pytest.TempPathFactory, tiny_model: Path) -> Iterator[ServerProcess]:
    srv = spawn_server(tmp_path_factory.mktemp("fuzzed"), tiny_model, env={"LLM_MAX_WAITING": "64"})
    yield srv
    srv.stop()


def _schemathesis(schema_url: str, base_url: str, report: Path) -> subprocess.CompletedProcess[str]:
    exe = Path(sys.executable).with_name("schemathesis")
    cmd = [str(exe if exe.exists() else shutil.which("schemathesis")), "run", schema_url, "--url", base_url,
           # every check; "valid data is accepted" as tests/support/fuzz_hooks.py refines it for the server-side rules
           "--checks", "all", "--exclude-checks", "positive_data_acceptance",
           "-n", str(MAX_EXAMPLES), "--seed", "1", "--generation-database", "none",
           # one worker: CPython < 3.11.8 raises a spurious SystemError from ast.parse in threads (gh-106905),
           # which hypothesis calls while describing strategies
           "-w", "1", "--request-timeout", "60",
           # the request schema's cross-field rules (anyOf/allOf) make hypothesis filter many draws
           "--suppress-health-check", "filter_too_much",
           # every warning but validation_mismatch: its 4xx share counts the negative cases of a request model
           # with many refusable fields (the checks above judge each answer)
           "--warnings", "missing_auth,missing_test_data,missing_deserializer,unused_openapi_auth,method_not_allowed",
           "--report", "junit", "--report-dir", str(report)]
    # tests/support/fuzz_hooks.py: the check that allows exactly the server-side rules' 400s to valid-looking bodies
    env = {**os.environ, "SCHEMATHESIS_HOOKS": "tests.support.fuzz_hooks",
           "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    # cwd: schemathesis keeps a crash cache (.schemathesis/) in its working folder, not in the checkout
    return subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=report, env=env)


def _assert_clean(res: subprocess.CompletedProcess[str], srv: ServerProcess) -> None:
    summary = res.stdout[-4000:]
    print(summary)
    assert res.returncode == 0, summary + res.stderr[-2000:]
    assert "No issues found" in res.stdout, summary
    assert httpx.get(srv.base_url + "/health", timeout=10).status_code == 200  # alive after the fuzz
    assert httpx.post(srv.base_url + "/v1/completions", json={"model": "tiny", "prompt": "hi", "max_tokens": 2},
                      timeout=60).status_code == 200


def test_fuzz_standalone_server(fuzzed: ServerProcess, tmp_path: Path) -> None:
    _assert_clean(_schemathesis(fuzzed.base_url + "/openapi.json", fuzzed.base_url, tmp_path), fuzzed)


def test_fuzz_through_the_front_door(fuzzed: ServerProcess, tmp_path: Path) -> None:
    addr = f"127.0.0.1:{fuzzed.port}"
    door = FrontDoorProcess(tmp_path / "door", addr, addr).wait_up()
    try:
        _assert_clean(_schemathesis(fuzzed.base_url + "/openapi.json", door.base_url, tmp_path), fuzzed)
    finally:
        assert door.stop() == 0
