"""The transformers engine's model in a process of its own (app/engines/hf/engine_process.py), as the server runs it.

- `python -m app serve` runs the model and its batch scheduler in a child `python -m app.engines.hf.engine_process`:
  answers, the decode-batch metric observed there and /readyz come through it; `engine_kwargs.engine_process:
  false` keeps the model in the server's process;
- the same requests (greedy with logprobs, seeded sampling, a stop string) give identical output from a
  child and in-process;
- the child killed: a stream in flight ends with an `engine_dead` error event and [DONE], /readyz turns 503
  naming the exit, new requests get 503; the server killed: its child exits by itself.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
from pathlib import Path
from typing import Any

import httpx

from app.engines.base import EngineSpec, GenerationRequest
from app.engines.select import start_engine
from app.metrics import PrometheusSink
from bench.pinning import descendants
from tests.support.openai_errors import assert_openai_error
from tests.support.servers import ServerProcess, spawn_server, wait_until

CHILD = "app.engines.hf.engine_process"


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
    except OSError:
        return ""


def _engine_children(srv: ServerProcess) -> list[int]:
    return [pid for pid in descendants(srv.proc.pid) if CHILD in _cmdline(pid)]


def _gone(pid: int) -> bool:
    """Exited (or a zombie nobody has reaped yet)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
    except OSError:
        return True


def _metric(text: str, name: str) -> float:
    values = [float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith(name)]
    assert values, f"{name} not in /metrics"
    return sum(values)


def test_server_engine_runs_in_its_own_process_until_it_dies(tmp_path: Path, tiny_model: Path) -> None:
    srv = spawn_server(tmp_path, tiny_model)
    try:
        children = _engine_children(srv)
        assert len(children) == 1, [(p, _cmdline(p)) for p in descendants(srv.proc.pid)]
        child = children[0]
        r = httpx.post(srv.base_url + "/v1/chat/completions", timeout=60, json={
            "model": "tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 5,
            "temperature": 0, "logprobs": True, "top_logprobs": 2})
        assert r.status_code == 200, r.text
        body = r.json()
        assert body["usage"]["completion_tokens"] == 5
        assert len(body["choices"][0]["logprobs"]["content"]) == 5
        metrics = httpx.get(srv.base_url + "/metrics", timeout=10).text
        # the batch size each decode step had in the child, exported by the server
        assert _metric(metrics, "llm_decode_batch_size_count") >= 4
        assert _metric(metrics, 'llm_model_ready{engine="transformers",model="tiny"}') == 1

        # a stream in flight when the engine process dies ends with an error event, not a hang
        events: list[str] = []
        with httpx.stream("POST", srv.base_url + "/v1/completions", timeout=60, json={
                "model": "tiny", "prompt": "count", "max_tokens": 900, "ignore_eos": True,
                "stream": True}) as resp:
            assert resp.status_code == 200
            for line in resp.iter_lines():
                if not line.startswith("data: "):
                    continue
                events.append(line[6:])
                if len(events) == 1:
                    os.kill(child, signal.SIGKILL)
        assert events[-1] == "[DONE]"
        error = json.loads(events[-2])["error"]
        assert error["code"] == "engine_dead", error
        assert len(events) < 900

        ready = httpx.get(srv.base_url + "/readyz", timeout=10)
        assert ready.status_code == 503
        assert "engine process exited" in ready.text, ready.text
        r = httpx.post(srv.base_url + "/v1/completions", timeout=30,
                       json={"model": "tiny", "prompt": "x", "max_tokens": 2})
        err = assert_openai_error(r, 503)
        assert err["code"] == "engine_dead"
        assert srv.proc.poll() is None, "the server stays up (out of rotation) when its engine dies"
    finally:
        srv.stop()


def test_child_exits_when_the_server_is_killed(tmp_path: Path, tiny_model: Path) -> None:
    srv = spawn_server(tmp_path, tiny_model)
    try:
        (child,) = _engine_children(srv)
    finally:
        srv.stop(signal.SIGKILL)
    wait_until(lambda: _gone(child), 30, 0.1, f"engine process {child} to exit after its server was killed")


def test_engine_process_false_serves_in_the_server_process(tmp_path: Path, tiny_model: Path) -> None:
    config = tmp_path / "tiny.yaml"
    config.write_text(f"""model_loading_config: {{model_id: tiny, model_source: {tiny_model}}}
engine: transformers
engine_kwargs: {{device: cpu, dtype: float32, max_model_len: 512, engine_process: false}}
""")
    srv = ServerProcess(["--config", str(config)], log_path=tmp_path / "server.log").wait_ready()
    try:
        assert _engine_children(srv) == []
        r = httpx.post(srv.base_url + "/v1/completions", timeout=60,
                       json={"model": "tiny", "prompt": "x", "max_tokens": 3})
        assert r.status_code == 200, r.text
    finally:
        srv.stop()


def _requests() -> list[GenerationRequest]:
    return [
        GenerationRequest(prompt="the quick brown fox", max_tokens=12, temperature=0, logprobs=3),
        GenerationRequest(messages=[{"role": "user", "content": "hello"}], max_tokens=16, temperature=0.9,
                          top_p=0.8, seed=7),
        GenerationRequest(prompt="a b c", max_tokens=20, temperature=0, stop=["e"], ignore_eos=True),
    ]


async def _outputs(model: Path, own_process: bool) -> list[tuple[Any, ...]]:
    spec = EngineSpec(model_id="tiny", model_source=str(model), engine="transformers",
                      engine_kwargs={"device": "cpu", "dtype": "float32", "max_model_len": 512,
                                     "engine_process": own_process})
    engine = await start_engine(spec, PrometheusSink())
    try:
        assert (getattr(engine, "process_pid", None) is not None) == own_process
        out = []
        for request in _requests():
            chunks = [c async for c in engine.generate(request)]
            out.append(("".join(c.text for c in chunks), chunks[-1].finish_reason, chunks[-1].completion_tokens,
                        [e for c in chunks for e in c.logprobs or ()]))
        return out
    finally:
        await engine.shutdown()


def test_same_output_in_a_child_and_in_process(tiny_model: Path) -> None:
    in_child = asyncio.run(_outputs(tiny_model, True))
    in_process = asyncio.run(_outputs(tiny_model, False))
    assert in_child == in_process
    assert len(in_child[0][3]) == 12 and all(len(e.top) == 3 for e in in_child[0][3])


def test_a_stopped_server_stops_its_engine_process_without_killing_it(tmp_path: Path, tiny_model: Path) -> None:
    """SIGTERM to the server (what `docker compose stop` sends): its engine process ends when told to, so the
    server's shutdown completes without its kill fallback."""
    srv = spawn_server(tmp_path, tiny_model)
    (child,) = _engine_children(srv)
    r = httpx.post(srv.base_url + "/v1/completions", timeout=60, json={"model": "tiny", "prompt": "x", "max_tokens": 3})
    assert r.status_code == 200, r.text
    assert srv.stop(signal.SIGTERM) == 0
    log = srv.log_text()
    assert "Application shutdown complete" in log, log[-2000:]
    assert "did not stop" not in log, log[-2000:]
    assert _gone(child)
