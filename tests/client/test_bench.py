"""Benchmark harness smoke (CI): `python -m app bench` and `bench/compare_layers.py` for a few seconds each
against the real tiny-model server / engine, with the output schema checked. The full comparison is a
documented command (bench/README.md), not part of CI.
"""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
from pathlib import Path
from typing import Any

from app.client.loadgen import SCHEMA, synthetic_prompt
from app.client.stats import percentile
from tests.support.env import ROOT

DIST_KEYS = {"p50", "p95", "p99", "mean", "max"}
LEVEL_KEYS = {"concurrency", "requests", "ok", "failed", "wall_s", "req_per_s", "output_tokens",
              "output_tokens_per_s", "mean_output_tokens", "ttft_s", "itl_s", "e2e_s", "errors"}


def check_distribution(d: dict[str, Any]) -> None:
    assert set(d) == DIST_KEYS
    assert all(isinstance(d[k], float | int) and d[k] >= 0 for k in DIST_KEYS)
    assert d["p50"] <= d["p95"] <= d["p99"] <= d["max"]


def check_report(report: dict[str, Any], levels: list[int], max_tokens: int, cpu_share: bool = False) -> None:
    assert report["schema"] == SCHEMA
    assert {"date", "machine", "target", "config", "levels", "seed_targets"} <= set(report)
    assert report["config"]["max_tokens"] == max_tokens and report["config"]["ignore_eos"] is True
    assert [lv["concurrency"] for lv in report["levels"]] == levels
    for lv in report["levels"]:
        assert set(lv) == LEVEL_KEYS | ({"cpu_share"} if cpu_share else set())
        if cpu_share:  # bench/cpu_share.py: cores busy per process role; this process drives the load
            assert lv["cpu_share"]["load generator"] > 0
        assert lv["ok"] >= 1 and lv["failed"] == 0 and lv["requests"] == lv["ok"]
        assert lv["mean_output_tokens"] == max_tokens  # fixed length through ignore_eos + min_tokens
        assert lv["req_per_s"] > 0 and lv["output_tokens_per_s"] > 0
        for key in ("ttft_s", "itl_s", "e2e_s"):
            check_distribution(lv[key])
        assert lv["ttft_s"]["p50"] <= lv["e2e_s"]["p50"]
    st = report["seed_targets"]
    assert st["min_req_per_s"] == 10 and st["max_p95_e2e_s"] == 3 and isinstance(st["met"], bool)
    assert [r["concurrency"] for r in st["levels"]] == levels


def test_bench_smoke_schema(core_server: Any, tmp_path: Path) -> None:
    res = subprocess.run(
        [sys.executable, "-m", "app", "bench", "-e", core_server.base_url, "--levels", "1,3", "--duration", "1.5",
         "--max-tokens", "8", "--prompt-words", "6", "--out", str(tmp_path), "--name", "smoke"],
        cwd=ROOT, capture_output=True, text=True, timeout=180)
    assert res.returncode == 0, res.stderr
    report = json.loads((tmp_path / "smoke.json").read_text())
    check_report(report, [1, 3], 8)
    assert report["target"] == {"kind": "http", "endpoint": core_server.base_url, "model": "tiny",
                                "api": "completions"}
    md = (tmp_path / "smoke.md").read_text()
    assert md == res.stdout.rstrip("\n") + "\n"
    table = [line for line in md.splitlines() if line.startswith("| ")]
    assert table[0].startswith("| concurrency | req/s | output tok/s | TTFT p50 / p95 / p99")
    assert [line.split("|")[1].strip() for line in table[1:]] == ["1", "3"]
    assert "Seed targets" in md


def test_compare_layers_smoke(tmp_path: Path, tiny_model: Path) -> None:
    res = subprocess.run(
        [sys.executable, "-m", "bench.compare_layers", "--layers", "engine,standalone", "--levels", "2",
         "--duration", "1", "--max-tokens", "8", "--model", str(tiny_model), "--out", str(tmp_path),
         "--split-cores"],
        cwd=ROOT, capture_output=True, text=True, timeout=400)
    assert res.returncode == 0, res.stderr[-3000:]
    result = json.loads((tmp_path / "compare.json").read_text())
    assert result["errors"] == {}
    rows = {r["layer"]: r for r in result["rows"]}
    assert list(rows) == ["engine", "standalone"]
    assert rows["engine"]["below"] is None and rows["standalone"]["below"] == "engine"
    assert rows["standalone"]["req_per_s_vs_below"] > 0 and rows["standalone"]["e2e_p50_vs_below"] > 0
    for layer in ("engine", "standalone"):
        check_report(json.loads((tmp_path / f"layer-{layer}.json").read_text()), [2], 8, cpu_share=True)
    assert rows["standalone"]["cpu_share"]["standalone server"] > 0
    assert "| standalone | 2 |" in (tmp_path / "compare.md").read_text()
    # --split-cores: the standalone server on the upper half of the cores, the load generator on the rest
    cores = sorted(os.sched_getaffinity(0))
    split = result["config"]["split_cores"]
    assert split["worker"] == cores[len(cores) - max(1, len(cores) // 2):] and split["head"] + split["worker"] == cores
    assert f"Ray model replica) on cores {split['worker']}" in (tmp_path / "compare.md").read_text()
    assert "split cores: model process" in res.stderr


def test_prompts_share_no_prefix() -> None:
    rng = random.Random(0)
    prompts = [synthetic_prompt("abcd", i, 12, rng) for i in range(200)]
    assert len(set(prompts)) == 200
    heads = {p.split("]")[0] for p in prompts}  # unique within the first few characters
    assert len(heads) == 200


def test_percentile() -> None:
    assert percentile([], 50) is None
    assert percentile([5.0], 99) == 5.0
    data = [float(i) for i in range(1, 101)]
    assert percentile(data, 50) == 50.5
    assert percentile(data, 0) == 1.0 and percentile(data, 100) == 100.0
    assert abs(percentile(data, 95) - 95.05) < 1e-9


def test_compare_engines_gives_both_engines_the_same_settings(tmp_path: Path, tiny_model: Path) -> None:
    """bench/compare_engines.py: the two configs differ only in engine-specific keys (the run itself needs vLLM)."""
    from app.models.config import load_model_config
    from bench.compare_engines import engine_config
    from bench.engine_settings import EngineSettings

    settings = EngineSettings(max_num_seqs=16, max_waiting=64)
    specs = {e: load_model_config(engine_config(e, tiny_model, settings, tmp_path)).engine_spec()
             for e in ("transformers", "vllm")}
    assert {s.engine for s in specs.values()} == {"transformers", "vllm"}
    for key in ("max_num_seqs", "max_model_len", "dtype", "device"):
        assert specs["transformers"].engine_kwargs[key] == specs["vllm"].engine_kwargs[key], key
    assert specs["vllm"].engine_kwargs["enforce_eager"] is True
    assert specs["vllm"].engine_kwargs["kv_cache_memory_bytes"] == 2**30
    assert {s.model_source for s in specs.values()} == {str(tiny_model)}
    assert {s.max_waiting for s in specs.values()} == {64}
    # vLLM's own server gets the same values on its command line
    argv = settings.vllm_server_args(tiny_model)
    assert argv[argv.index("--max-num-seqs") + 1] == "16" and "--enforce-eager" in argv
    assert argv[argv.index("--max-model-len") + 1] == str(specs["vllm"].engine_kwargs["max_model_len"])


def test_api_overhead_reports_cpu_per_streamed_token() -> None:
    """bench/api_overhead.py streams through the real API app (FakeEngine underneath) and counts every event."""
    res = subprocess.run([sys.executable, "-m", "bench.api_overhead", "--streams", "3", "--tokens", "20",
                          "--repeats", "2", "--json"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr[-3000:]
    out = json.loads(res.stdout.strip().splitlines()[-1])
    assert out["events_per_round"] == 3 * 21  # 20 token events + the finish event per stream
    assert out["cpu_us_per_token"] > 0


def test_ray_floor_serves_both_ways(tmp_path: Path) -> None:
    """bench/ray_floor.py: the bare server and the model-less Ray Serve app both answer every request."""
    res = subprocess.run([sys.executable, "-m", "bench.ray_floor", "--levels", "2", "--duration", "1", "--messages",
                          "3", "--out", str(tmp_path)], cwd=ROOT, capture_output=True, text=True, timeout=400)
    assert res.returncode == 0, (res.stdout + res.stderr)[-3000:]
    result = json.loads((tmp_path / "ray-floor.json").read_text())
    assert set(result["servers"]) == {"bare", "ray"}
    for kind, (level,) in result["servers"].items():
        assert level["c"] == 2 and level["ok"] > 0 and level["failed"] == 0, (kind, level)
    ray_cpu = result["servers"]["ray"][0]["cpu"]
    assert any(role.startswith("ray replica ") for role in ray_cpu) and "ray proxy" in ray_cpu, ray_cpu
    assert "| ray | 2 |" in (tmp_path / "ray-floor.md").read_text()


def test_batch_service_bench_smoke(core_server: Any, tmp_path: Path) -> None:
    res = subprocess.run([sys.executable, "-m", "bench.batch_service", "--endpoint", core_server.base_url,
                          "--lines", "12", "--concurrency", "3", "--max-tokens", "2", "--probes", "2",
                          "--out", str(tmp_path)], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    report = json.loads((tmp_path / "batch-service.json").read_text())
    assert report["client"]["ok"] == report["service"]["ok"] == 12
    assert report["ratio_service_to_client"] > 0 and report["ttft_p50_ms"]["idle"] > 0
    assert "batch service" in (tmp_path / "batch-service.md").read_text()
