"""Smoke test of the GPU check script (`bench/gpu_check.py`) in its CPU mode: real engine, real files.

On a CUDA machine the same script serves the Qwen2.5-0.5B-shaped model; here `--device cpu --small` runs
the tiny model through the transformers engine in a child process and must write the JSON and markdown.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from bench.gpu_check import QWEN25_05B_SHAPE, _pad_tokenizer, installed_engines
from tests.support.env import ROOT


def test_gpu_check_cpu_smoke(tmp_path: Path) -> None:
    out = tmp_path / "out"
    proc = subprocess.run(
        [sys.executable, "-m", "bench.gpu_check", "--device", "cpu", "--small", "--concurrency", "1,2",
         "--rounds", "2", "--max-tokens", "6", "--prompt-words", "12", "--out", str(out)],
        cwd=ROOT, capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads((out / "gpu_check.json").read_text())
    assert report["device"] == "cpu" and report["model"]["name"] == "tiny (--small)"
    assert [r["engine"] for r in report["results"]] == installed_engines("cpu") == ["transformers"]
    (res,) = report["results"]
    assert res["engine_reason"] == "configured: engine=transformers"
    assert [lv["concurrency"] for lv in res["levels"]] == [1, 2]
    for lv in res["levels"]:
        assert lv["requests"] == 2 * lv["concurrency"]
        assert lv["output_tokens"] == lv["requests"] * 6  # ignore_eos: every request yields exactly max_tokens
        assert lv["tokens_per_s"] > 0 and 0 < lv["ttft_p50_ms"] <= lv["ttft_p95_ms"]
    assert res["peak_torch_allocated_mib"] is None and res["peak_rss_mib"] > 0
    md = (out / "gpu_check.md").read_text()
    assert "| transformers | 2 | 4 |" in md and md in proc.stdout


def test_gpu_check_refuses_cuda_without_a_gpu(tmp_path: Path) -> None:
    import torch

    if torch.cuda.is_available():  # pragma: no cover - GPU machines run the real check instead
        return
    proc = subprocess.run([sys.executable, "-m", "bench.gpu_check", "--out", str(tmp_path)], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert "no CUDA device is visible" in proc.stderr


def test_tokenizer_padding_reaches_the_model_vocab(tmp_path: Path) -> None:
    from transformers import AutoTokenizer

    from app.models.tiny import build_tokenizer

    build_tokenizer(tmp_path, vocab_size=1024)
    _pad_tokenizer(tmp_path, QWEN25_05B_SHAPE["vocab_size"])
    tok = AutoTokenizer.from_pretrained(tmp_path)
    assert len(tok) == QWEN25_05B_SHAPE["vocab_size"]
    last = QWEN25_05B_SHAPE["vocab_size"] - 1
    assert tok.decode([last]).startswith("<") and tok.decode([5, last]) != tok.decode([5])
    assert max(tok("hello world, the model serves")["input_ids"]) < 1024  # fillers are never produced by BPE
