"""bench/rounds.py and the layer grammar of bench/compare_layers.py, on made-up reports (no process, no model):
which systems are paired, and that medians, ranges and same-round ratios come out of the rounds as stated."""

from __future__ import annotations

from typing import Any

import pytest

from bench.compare_layers import below_of, order_layers, pairs_of, parse_layer
from bench.rounds import markdown, summarize


def report(rps: dict[int, float], load: float = 1.0) -> dict[str, Any]:
    levels = [{"concurrency": c, "req_per_s": r, "ok": 10, "failed": 0, "ttft_s": {"p50": 0.01},
               "e2e_s": {"p50": 0.1, "p95": 0.2}, "cpu_share": {"vllm engine core": r / 10}} for c, r in rps.items()]
    return {"levels": levels, "machine": {"loadavg_1m": load}, "target": {"threads_chosen": None},
            "threads": {"vllm engine core": {"processes": 1, "os_threads": 5, "omp_num_threads": "1"}}}


def test_layer_grammar_and_pairs() -> None:
    layers = [parse_layer(x, "vllm") for x in ("standalone", "vllm-server", "vllm-server-omp1", "ray",
                                               "ray-serve-llm", "engine@transformers", "standalone@transformers")]
    order = [x.name for unit in order_layers(layers) for x in unit]
    assert order == ["engine@transformers", "standalone@transformers", "vllm-server", "vllm-server-omp1",
                     "ray-serve-llm", "standalone", "ray"]
    below = below_of(layers)
    assert below["standalone@transformers"] == "engine@transformers" and below["ray"] == "standalone"
    assert below["vllm-server"] is None and below["engine@transformers"] is None
    pairs = pairs_of(layers, below)
    for pair in [("standalone", "vllm-server"), ("standalone", "vllm-server-omp1"), ("ray", "ray-serve-llm"),
                 ("vllm-server-omp1", "vllm-server"), ("standalone@transformers", "engine@transformers")]:
        assert pair in pairs
    assert ("standalone@transformers", "vllm-server") not in pairs  # anchors answer for the vLLM engine only
    with pytest.raises(ValueError, match="unknown layer"):
        parse_layer("vllm-sever", "vllm")
    with pytest.raises(ValueError, match="anchors serve vLLM only"):
        parse_layer("vllm-server@transformers", "vllm")
    with pytest.raises(ValueError, match="-omp1"):
        parse_layer("engine-omp1", "vllm")
    assert parse_layer("standalone-omp1@vllm", "transformers").omp1


def test_medians_ranges_and_same_round_ratios() -> None:
    rounds = [{"standalone": report({1: 10.0, 8: 40.0}), "vllm-server": report({1: 5.0, 8: 20.0})},
              {"standalone": report({1: 6.0, 8: 30.0}), "vllm-server": report({1: 6.0, 8: 10.0})},
              {"standalone": report({1: 9.0, 8: 36.0}), "vllm-server": report({1: 3.0, 8: 36.0}, load=3.0)}]
    s = summarize(rounds, ["vllm-server", "standalone"], [("standalone", "vllm-server")])
    c1 = s["layers"]["standalone"][0]
    assert c1["req_per_s"] == {"median": 9.0, "min": 6.0, "max": 10.0, "n": 3}
    (pair,) = s["ratios"]
    ratio1, ratio8 = pair["levels"]
    assert ratio1["per_round"] == [2.0, 1.0, 3.0] and ratio1["median"] == 2.0  # not 9.0 / 5.0
    assert ratio8["per_round"] == [2.0, 3.0, 1.0] and (ratio8["min"], ratio8["max"]) == (1.0, 3.0)
    assert s["loadavg_1m"]["vllm-server"] == [1.0, 1.0, 3.0]
    assert s["threads"]["standalone"]["vllm engine core"]["omp_num_threads"] == "1"
    md = "\n".join(markdown(s, [1, 8]))
    assert "| standalone ÷ vllm-server | **2.00** (1.00-3.00) | **2.00** (1.00-3.00) |" in md
    assert "| standalone | 9.0 (6.0-10.0) | 36.0 (30.0-40.0) |" in md


def test_a_round_missing_a_system_leaves_that_round_out_of_its_ratios() -> None:
    rounds = [{"ray": report({1: 4.0}), "ray-serve-llm": report({1: 2.0})}, {"ray": report({1: 4.0})}]
    s = summarize(rounds, ["ray-serve-llm", "ray"], [("ray", "ray-serve-llm")])
    assert s["ratios"][0]["levels"][0]["per_round"] == [2.0]
    assert s["layers"]["ray"][0]["req_per_s"]["n"] == 2


def test_one_thread_layers_pair_with_the_one_thread_anchor_only() -> None:
    layers = [parse_layer(x, "vllm") for x in ("vllm-server", "vllm-server-omp1", "standalone", "standalone-omp1")]
    pairs = pairs_of(layers, below_of(layers))
    assert ("standalone-omp1", "vllm-server-omp1") in pairs and ("standalone-omp1", "vllm-server") not in pairs
