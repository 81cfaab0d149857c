"""Ray Serve on one local node (127.0.0.1), started with the real `cluster local-up`: routing by model,
404 listing ids, streaming, 429 with Retry-After, client disconnect, Ray-exported metrics, status, token
auth refusal, autoscaling up and down, LoRA adapters routed by Serve's multiplexing to the replica that holds
them (two replicas of `tiny-lora`), the keys file enforced by the ingress (KEYS_FILE beside API_KEYS), and
`local-down` leaving nothing behind.

One cluster start-up serves every test in this module (the suite's time budget is minutes).
"""

from __future__ import annotations

import concurrent.futures as cf
import json
import os
import shutil
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
import yaml

from app.tenants.keyfile import KeyEntry, KeysFile, hash_key, save
from tests.support.env import ROOT, need
from tests.support.servers import free_port, wait_until

pytestmark = pytest.mark.slow

PLAIN_KEY = "unused"  # API_KEYS: the anonymous key the other tests send
AUTH = {"Authorization": f"Bearer {PLAIN_KEY}"}
LIMITED_KEY, REVOKED_KEY = "sk-ray-limited-" + os.urandom(8).hex(), "sk-ray-revoked-" + os.urandom(8).hex()

TINY = """
model_loading_config: {{model_id: tiny, model_source: {src}}}
engine: transformers
deployment_config:
  name: tiny
  ray_actor_options: {{num_cpus: 0.5, resources: {{small-model-workers: 0.5}}}}
  autoscaling_config: {{min_replicas: 1, max_replicas: 3, target_ongoing_requests: 1,
                       upscale_delay_s: 1, downscale_delay_s: 4, metrics_interval_s: 0.5, look_back_period_s: 2}}
  max_ongoing_requests: 4
  max_queued_requests: 32
engine_kwargs: {{dtype: float32, device: cpu, max_num_seqs: 4}}
max_waiting: 8
"""
TINY_B = """
model_loading_config: {{model_id: tiny-b, model_source: {src}}}
engine: transformers
deployment_config:
  name: tiny-b
  num_replicas: 1
  ray_actor_options: {{num_cpus: 0.5, resources: {{small-model-workers: 0.5}}}}
  max_ongoing_requests: 2
  max_queued_requests: 1
engine_kwargs: {{dtype: float32, device: cpu, max_num_seqs: 1}}
max_waiting: 1
"""
# two replicas, each holding at most one adapter: routing to the holder, and eviction, are both visible
TINY_LORA = """
model_loading_config: {{model_id: tiny-lora, model_source: {src}}}
engine: transformers
deployment_config:
  name: tiny-lora
  num_replicas: 2
  ray_actor_options: {{num_cpus: 0.5, resources: {{small-model-workers: 0.5}}}}
engine_kwargs: {{dtype: float32, device: cpu, max_num_seqs: 4, engine_process: false}}
lora_config: {{dynamic_lora_loading_path: {adapters}, max_num_adapters_per_replica: 1}}
"""


class Local:
    def __init__(self, cwd: Path, gcs: int, serve: int, metrics: int, env: dict[str, str]):
        self.cwd, self.gcs, self.serve, self.metrics, self.env = cwd, gcs, serve, metrics, env
        self.base = f"http://127.0.0.1:{serve}"
        self.up_output = ""
        self.batch = 0  # the batch service's port

    def app(self, *args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "app", *args], cwd=self.cwd, env=self.env, text=True,
                              capture_output=True, timeout=timeout)

    def status(self) -> dict:
        proc = self.app("cluster", "status", "--address", f"127.0.0.1:{self.gcs}", "--json")
        assert proc.returncode == 0, proc.stderr[-2000:]
        return json.loads(proc.stdout)

    def client(self) -> openai.OpenAI:
        return openai.OpenAI(base_url=self.base + "/v1", api_key=PLAIN_KEY, max_retries=0, timeout=60)


def _our_processes(marker: str) -> list[int]:
    out = []
    for p in Path("/proc").iterdir():
        if p.name.isdigit():
            try:
                if marker.encode() in (p / "cmdline").read_bytes():
                    out.append(int(p.name))
            except OSError:
                pass
    return out


@pytest.fixture(scope="module")
def local(tmp_path_factory: pytest.TempPathFactory, tiny_model: Path, tiny_loras: Path) -> Iterator[Local]:
    need(os.path.exists(Path(sys.executable).with_name("ray")), "needs ray[serve]==2.60.0 in the venv")
    cwd = tmp_path_factory.mktemp("local")
    (cwd / "tiny.yaml").write_text(TINY.format(src=tiny_model))
    (cwd / "tiny-b.yaml").write_text(TINY_B.format(src=tiny_model))
    shutil.copytree(tiny_loras, cwd / "adapters")
    (cwd / "tiny-lora.yaml").write_text(TINY_LORA.format(src=tiny_model, adapters=cwd / "adapters"))
    keys = KeysFile(keys=[KeyEntry(name="ray-limited", hash=hash_key(LIMITED_KEY), models=("tiny",), rpm=3),
                          KeyEntry(name="ray-revoked", hash=hash_key(REVOKED_KEY))])
    save(cwd / "keys.yaml", keys)
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    env.update(HOME=str(cwd), HF_HUB_OFFLINE="1", RAY_AUTH_TOKEN=os.urandom(32).hex(), PYTHONPATH=str(ROOT),
               API_KEYS=PLAIN_KEY, KEYS_FILE=str(cwd / "keys.yaml"), LLM_USAGE_DB=str(cwd / "usage.sqlite"))
    lc = Local(cwd, free_port(), free_port(), free_port(), env)
    lc.batch = free_port()
    t0 = time.monotonic()
    try:
        up = lc.app("cluster", "local-up", "--config", "tiny.yaml", "--config", "tiny-b.yaml",
                    "--config", "tiny-lora.yaml",
                    "--gcs-port", str(lc.gcs), "--serve-port", str(lc.serve), "--metrics-export-port", str(lc.metrics),
                    "--batch-port", str(lc.batch),
                    "--num-cpus", "4", "--object-store-mb", "128", "--wait", "300", timeout=420)
        lc.up_output = up.stdout + up.stderr
        assert up.returncode == 0, lc.up_output[-4000:]
        print(f"local-up took {time.monotonic() - t0:.1f}s")
        yield lc
    finally:
        state = cwd / ".run" / "local.json"
        recorded = json.loads(state.read_text()) if state.exists() else {}
        marker = recorded.get("temp_dir") or str(cwd / ".run")
        down = lc.app("cluster", "local-down", timeout=120)
        assert down.returncode == 0, down.stderr
        leftovers = _our_processes(marker) + ([recorded["batch_pid"]] if recorded.get("batch_pid") and
                                              Path(f"/proc/{recorded['batch_pid']}").exists() else [])
        assert not leftovers, f"processes outlived local-down: {leftovers}"
        head_log = (cwd / ".run" / "head.log").read_text(errors="replace")
        assert "Draining for up to" not in head_log, "local-down waited for Ray's SIGTERM drain: " + head_log[-1500:]


def test_local_up_says_where_to_send_requests(local: Local) -> None:
    assert f"curl http://127.0.0.1:{local.serve}/v1/chat/completions" in local.up_output
    assert "local-down" in local.up_output
    assert httpx.get(local.base + "/readyz", timeout=30).status_code == 200


def test_local_up_serves_the_batch_api(local: Local) -> None:
    """`deploy-ray.sh local` runs the batch service too: a batch through it is answered by Ray Serve."""
    assert f"--endpoint http://127.0.0.1:{local.batch}" in local.up_output
    client = openai.OpenAI(base_url=f"http://127.0.0.1:{local.batch}/v1", api_key="unused", max_retries=0)
    rows = [{"custom_id": f"l{i}", "method": "POST", "url": "/v1/completions",
             "body": {"model": "tiny", "prompt": f"hi {i}", "max_tokens": 2}} for i in range(3)]
    f = client.files.create(file=("in.jsonl", "".join(json.dumps(r) + "\n" for r in rows).encode()),
                            purpose="batch")
    batch = client.batches.create(input_file_id=f.id, endpoint="/v1/completions", completion_window="24h")
    deadline = time.monotonic() + 120
    while (batch := client.batches.retrieve(batch.id)).status not in ("completed", "failed", "expired", "cancelled"):
        assert time.monotonic() < deadline, batch
        time.sleep(0.2)
    assert batch.status == "completed" and batch.request_counts.completed == 3, batch
    out = [json.loads(x) for x in client.files.content(batch.output_file_id).text.splitlines()]
    assert sorted(r["custom_id"] for r in out) == ["l0", "l1", "l2"]


def test_the_ingress_enforces_the_keys_file(local: Local) -> None:
    """The keys file reaches the ingress replica on the head: limits with OpenAI's headers, model allowance,
    per-key usage, and a revoke without a redeploy."""
    limited = {"Authorization": f"Bearer {LIMITED_KEY}"}
    body = {"model": "tiny", "prompt": "x", "max_tokens": 1}
    with httpx.Client(base_url=local.base + "/v1", timeout=60, headers=limited) as h:
        assert [m["id"] for m in h.get("/models").json()["data"]] == ["tiny"]
        other = h.post("/completions", json={**body, "model": "tiny-b"})  # takes one of the minute's 3
        assert other.status_code == 404 and other.json()["error"]["code"] == "model_not_found"
        statuses = [h.post("/completions", json=body) for _ in range(3)]
        assert [r.status_code for r in statuses] == [200, 200, 429], [r.text for r in statuses]
        assert statuses[0].headers["x-ratelimit-limit-requests"] == "3"
        assert int(statuses[2].headers["retry-after"]) >= 1 and statuses[2].json()["error"]["code"] == \
            "rate_limit_exceeded"
        usage = h.get("/usage").json()
        assert usage["key"] == "ray-limited" and sum(r["requests"] for r in usage["data"]) == 4
    revoked = {"Authorization": f"Bearer {REVOKED_KEY}"}
    assert httpx.get(local.base + "/v1/models", headers=revoked, timeout=30).status_code == 200
    keys_file = local.cwd / "keys.yaml"
    save(keys_file, KeysFile(keys=[e for e in KeysFile.model_validate(yaml.safe_load(keys_file.read_text())).keys
                                   if e.name != "ray-revoked"]))
    wait_until(lambda: httpx.get(local.base + "/v1/models", headers=revoked, timeout=30).status_code == 401, 2.0,
               0.05, "401 for the revoked key")


def _listener(port: int) -> int | None:
    """PID of the process holding the TCP socket that listens on `port` (from /proc: no `ss` needed)."""
    inodes = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            f = line.split()
            if f[3] == "0A" and int(f[1].rsplit(":", 1)[1], 16) == port:  # 0A = LISTEN
                inodes.add(f"socket:[{f[9]}]")
    for pid in Path("/proc").iterdir():
        if not pid.name.isdigit():
            continue
        try:
            if any(os.readlink(fd) in inodes for fd in (pid / "fd").iterdir()):
                return int(pid.name)
        except OSError:
            continue
    return None


def test_the_ingress_replica_serves_the_serve_port_itself(local: Local) -> None:
    """Direct ingress (the default): SERVE_PORT is the ingress replica's own socket, so a request does not cross
    Serve's proxy actor; the proxy Serve always starts listens on the recorded proxy port and serves the same app."""
    pid = _listener(local.serve)
    assert pid is not None
    assert Path(f"/proc/{pid}/cmdline").read_bytes().startswith(b"ray::ServeReplica:llm:ingress"), pid
    proxy_port = json.loads((local.cwd / ".run" / "local.json").read_text())["proxy_port"]
    proxy_pid = _listener(proxy_port)
    assert proxy_pid is not None and Path(f"/proc/{proxy_pid}/cmdline").read_bytes().startswith(b"ray::ProxyActor")
    for port in (local.serve, proxy_port):
        r = httpx.post(f"http://127.0.0.1:{port}/v1/completions", headers=AUTH, timeout=60,
                       json={"model": "tiny", "prompt": "x", "max_tokens": 2})
        assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 2, (port, r.text)
    assert httpx.get(local.base + "/-/routes", timeout=30).json() == {"/": "llm"}  # the head's health check reads it


def test_routes_by_model_and_404_lists_ids(local: Local) -> None:
    c = local.client()
    for model in ("tiny", "tiny-b"):
        r = c.chat.completions.create(model=model, messages=[{"role": "user", "content": "hi"}], max_tokens=5,
                                      extra_body={"min_tokens": 5})
        assert r.model == model and r.usage.completion_tokens == 5
    cards = {m.id: m for m in c.models.list().data}
    assert set(cards) == {"tiny", "tiny-b", "tiny-lora", "tiny-lora:A", "tiny-lora:B", "tiny-lora:C"}
    assert cards["tiny-lora:A"].model_extra["parent"] == "tiny-lora"
    assert cards["tiny"].model_extra["engine"] == "transformers"
    r = httpx.post(local.base + "/v1/completions", headers=AUTH, json={"model": "nope", "prompt": "x"}, timeout=30)
    assert r.status_code == 404
    assert "tiny" in r.json()["error"]["message"] and "tiny-b" in r.json()["error"]["message"]


def test_engine_info_crosses_ray_unchanged(local: Local) -> None:
    """max_parallel reaches the ingress: a fan-out above it is the standalone server's 400 naming the limit."""
    card = httpx.get(local.base + "/v1/models/tiny-b", headers=AUTH, timeout=30).json()
    assert card["engine_info"]["max_parallel"] == 2  # max_num_seqs 1 + max_waiting 1
    assert card["engine_info"]["engine"] == "transformers" and card["engine_info"]["model_id"] == "tiny-b"
    ready = httpx.get(local.base + "/readyz", headers=AUTH, timeout=30).json()["models"]["tiny-b"]
    assert ready["max_parallel"] == 2 and ready["node_ip"] == "127.0.0.1" and ready["replica_id"]
    body = {"model": "tiny-b", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2, "n": 3}
    r = httpx.post(local.base + "/v1/chat/completions", headers=AUTH, json=body, timeout=60)
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["param"] == "n" and "needs 3" in err["message"] and "admits at most 2" in err["message"]
    # the serving path, as the replica stamped it: engine@node/replica (tiny: tiny-b's one queue place
    # in Serve's router, max_queued_requests 1, may refuse a second generation while both are routed)
    ok = httpx.post(local.base + "/v1/chat/completions", headers=AUTH, json={**body, "model": "tiny", "n": 2},
                    timeout=60)
    assert ok.status_code == 200, ok.text
    replicas = {r["replica_id"] for r in local.status()["replicas"] if r["model"] == "tiny"}
    for served_by in ok.headers["x-served-by"].split(", "):  # the two choices may run on two replicas
        engine, _, where = served_by.partition("@")
        node, _, replica = where.partition("/")
        assert engine == "transformers" and node == "127.0.0.1" and replica in replicas, served_by


def test_access_log_lines_land_in_the_ingress_replica_log(local: Local) -> None:
    rid = f"ray-trace-{os.getpid()}"
    r = httpx.post(local.base + "/v1/completions", headers={**AUTH, "X-Request-Id": rid}, timeout=60,
                   json={"model": "tiny", "prompt": "log me", "max_tokens": 3, "ignore_eos": True})
    assert r.status_code == 200 and r.headers.get_list("x-request-id") == [rid]  # once: Serve's proxy echoes it
    made = httpx.get(local.base + "/v1/models", headers=AUTH, timeout=30).headers.get_list("x-request-id")
    assert len(made) == 1 and made[0]  # none sent: one is made up and echoed once
    temp_dir = Path(json.loads((local.cwd / ".run" / "local.json").read_text())["temp_dir"])
    logs = temp_dir / "session_latest" / "logs" / "serve"

    def ours() -> list[str]:
        return [ln for f in logs.glob("replica_*ingress*.log") for ln in f.read_text(errors="replace").splitlines()
                if rid in ln and "status=200" in ln]

    # Serve buffers replica log records (MemoryHandler) and flushes them in batches: wait, bounded
    lines = wait_until(ours, 60, 0.5, "our access line in the ingress replica log")
    assert "completions model=tiny engine=transformers status=200" in lines[0] and "output_tokens=3" in lines[0]


def test_streaming_through_the_ingress(local: Local) -> None:
    stream = local.client().chat.completions.create(
        model="tiny", messages=[{"role": "user", "content": "hi"}], max_tokens=16, stream=True,
        extra_body={"min_tokens": 16})
    chunks = list(stream)
    assert len(chunks) >= 3
    assert chunks[-1].choices[0].finish_reason == "length"
    # the replica coalesces chunks (stream_coalesce_ms): the streamed text is the unstreamed one, in order
    kw: dict[str, Any] = {"model": "tiny", "prompt": "coalesced stream", "max_tokens": 40, "temperature": 0,
                          "extra_body": {"ignore_eos": True}}
    whole = local.client().completions.create(**kw)
    parts = [c.choices[0].text for c in local.client().completions.create(stream=True, **kw) if c.choices]
    assert "".join(parts) == whole.choices[0].text and len(parts) > 1


def test_tools_structured_output_and_logprobs_cross_ray(local: Local) -> None:
    """Grammar specs, tool definitions and logprob entries are plain data: the ingress parses the tool calls of a
    replica's constrained output, streaming and not, and logprobs arrive per token (issue 14)."""
    import jsonschema

    params = {"type": "object", "properties": {"q": {"type": "string", "maxLength": 8}}, "required": ["q"]}
    tool = {"type": "function", "function": {"name": "search", "parameters": params}}
    c = local.client()
    kw: dict = {"model": "tiny", "messages": [{"role": "user", "content": "find"}], "tools": [tool],
                "tool_choice": "required", "parallel_tool_calls": False, "max_tokens": 200, "seed": 3,
                "temperature": 0.9}
    whole = c.chat.completions.create(**kw).choices[0]
    assert whole.finish_reason == "tool_calls" and whole.message.content is None
    [call] = whole.message.tool_calls or []
    jsonschema.validate(json.loads(call.function.arguments), params)
    args = "".join(d.function.arguments or "" for chunk in c.chat.completions.create(stream=True, **kw)
                   for ch in chunk.choices for d in ch.delta.tool_calls or [] if d.function)
    assert args == call.function.arguments  # same seed, same replica engine: the same call, as deltas
    fmt = {"type": "json_schema", "json_schema": {"name": "q", "schema": params}}
    out = c.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "json"}], max_tokens=200,
                                    response_format=fmt, logprobs=True, top_logprobs=2, seed=1)  # type: ignore[arg-type]
    choice = out.choices[0]
    jsonschema.validate(json.loads(choice.message.content or ""), params)
    entries = choice.logprobs.content if choice.logprobs else []
    assert entries and len(entries) == out.usage.completion_tokens and all(len(e.top_logprobs) == 2 for e in entries)


def test_queue_full_is_429_with_retry_after(local: Local) -> None:
    body = {"model": "tiny-b", "prompt": "x", "max_tokens": 200, "min_tokens": 200}

    def one(_: int) -> httpx.Response:
        return httpx.post(local.base + "/v1/completions", headers=AUTH, json=body, timeout=120)

    with cf.ThreadPoolExecutor(10) as ex:
        results = list(ex.map(one, range(10)))
    codes = Counter(r.status_code for r in results)
    assert codes[200] >= 1 and codes[429] >= 1, codes
    assert set(codes) <= {200, 429}, [r.text for r in results if r.status_code not in (200, 429)]
    assert all(r.headers.get("retry-after") for r in results if r.status_code == 429)


def _metric(local: Local, name: str, model: str) -> float:
    text = httpx.get(f"http://127.0.0.1:{local.metrics}/metrics", timeout=10).text
    total = 0.0
    for line in text.splitlines():
        if line.startswith(name + "{") and f'model="{model}"' in line:
            total += float(line.rsplit(" ", 1)[1])
    return total


def test_client_disconnect_cancels_generation(local: Local) -> None:
    before = _metric(local, "ray_llm_requests_aborted_total", "tiny-b")
    body = {"model": "tiny-b", "prompt": "x", "max_tokens": 1800, "min_tokens": 1800, "stream": True}
    with httpx.stream("POST", local.base + "/v1/completions", headers=AUTH, json=body, timeout=60) as r:
        assert r.status_code == 200
        for i, _ in enumerate(r.iter_lines()):
            if i > 3:
                break  # leave mid-stream: closing the connection must abort the replica's generation
    wait_until(lambda: _metric(local, "ray_llm_requests_aborted_total", "tiny-b") > before, 60, 1,
               "the aborted counter on Ray's metrics port")
    # the one generation slot of tiny-b is free again
    r = httpx.post(local.base + "/v1/completions", headers=AUTH,
                   json={"model": "tiny-b", "prompt": "x", "max_tokens": 2},
                   timeout=60)
    assert r.status_code == 200


def test_metrics_exported_by_ray_with_our_names(local: Local) -> None:
    from app.metrics import exported_series_names

    def names() -> set[str]:
        text = httpx.get(f"http://127.0.0.1:{local.metrics}/metrics", timeout=10).text
        return {ln.split("{")[0].split(" ")[0] for ln in text.splitlines() if ln.startswith("ray_llm_")}

    expected = {"ray_" + n for n in exported_series_names()}
    got = wait_until(lambda: names() if len(names() & expected) >= 10 else None, 60, 1, "Ray metrics export")
    print("Ray exports:", sorted(got))
    assert {"ray_llm_requests_total", "ray_llm_time_to_first_token_seconds_bucket", "ray_llm_output_tokens_total",
            "ray_llm_queue_depth", "ray_llm_request_latency_seconds_bucket"} <= got
    assert got <= expected  # nothing under our prefix that the one metrics module does not declare


def test_status_shows_nodes_deployments_replicas_engines(local: Local) -> None:
    data = local.status()
    assert len(data["nodes"]) == 1 and data["nodes"][0]["ip"] == "127.0.0.1"
    deps = data["applications"]["llm"]["deployments"]
    assert {"ingress", "tiny", "tiny-b", "tiny-lora"} <= set(deps)
    assert {r["model"] for r in data["replicas"]} == {"tiny", "tiny-b", "tiny-lora"}
    assert all(r["engine"] == "transformers" and r["node_ip"] == "127.0.0.1" for r in data["replicas"])
    text = local.app("cluster", "status", "--address", f"127.0.0.1:{local.gcs}")
    assert "engine=transformers" in text.stdout and "Model replicas:" in text.stdout


def test_driver_without_token_is_refused(local: Local, tmp_path: Path) -> None:
    env = {k: v for k, v in local.env.items() if k != "RAY_AUTH_TOKEN"}
    env.update(HOME=str(tmp_path), RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0", RAY_gcs_server_port_wait_time_s="2")
    code = f"import ray; ray.init(address='127.0.0.1:{local.gcs}'); print('CONNECTED')"
    proc = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode != 0 and "CONNECTED" not in proc.stdout
    assert "auth" in (proc.stdout + proc.stderr).lower()
    wrong = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env={**env, "RAY_AUTH_TOKEN": "00" * 16},
                           capture_output=True, text=True, timeout=120)
    assert wrong.returncode != 0 and "CONNECTED" not in wrong.stdout
    # our CLI says what is missing instead of a stack trace
    st = subprocess.run([sys.executable, "-m", "app", "cluster", "status", "--address", f"127.0.0.1:{local.gcs}"],
                        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=60)
    assert st.returncode != 0 and "RAY_AUTH_TOKEN" in st.stderr


def test_autoscaling_up_under_load_and_back_down(local: Local) -> None:
    def running() -> int:
        return local.status()["applications"]["llm"]["deployments"]["tiny"]["replica_states"].get("RUNNING", 0)

    assert running() == 1
    stop = threading.Event()
    body = {"model": "tiny", "prompt": "x", "max_tokens": 300, "min_tokens": 300}

    def load() -> None:
        deadline = time.monotonic() + 240  # bounded even if the test fails
        with httpx.Client(timeout=120, headers=AUTH) as h:
            while not stop.is_set() and time.monotonic() < deadline:
                h.post(local.base + "/v1/completions", json=body)

    threads = [threading.Thread(target=load, daemon=True) for _ in range(6)]
    for t in threads:
        t.start()
    try:
        t0 = time.monotonic()
        peak = wait_until(lambda: running() if running() > 1 else None, 180, 1, "tiny to scale above 1 replica")
        print(f"scaled 1 -> {peak} replicas in {time.monotonic() - t0:.1f}s")
    finally:
        stop.set()
        for t in threads:
            t.join(150)
    t0 = time.monotonic()
    wait_until(lambda: running() == 1, 180, 2, "tiny to scale back to 1 replica")
    print(f"scaled back to 1 replica in {time.monotonic() - t0:.1f}s after load stopped")


def test_serve_hops_reads_this_ray_versions_access_logs(local: Local) -> None:
    """bench/serve_hops.py matches the ingress's and the model replica's access lines of the same requests in the
    logs of the pinned Ray version (the benchmark's "Inside Ray Serve" table); under direct ingress no proxy
    handled them, so there is no proxy hop."""
    from bench.serve_hops import hops

    t0 = time.time()
    for i in range(4):
        local.client().completions.create(model="tiny", prompt=f"hops {i}", max_tokens=4)
    logs = Path(json.loads((local.cwd / ".run" / "local.json").read_text())["temp_dir"]) / "session_latest" / "logs"
    found: dict[str, Any] = {}

    def counted() -> bool:
        found.update(hops(logs / "serve", t0 - 1, time.time() + 1) or {})
        return found.get("requests", 0) >= 4

    wait_until(counted, 30, 0.5, "Serve's access lines of the 4 requests")
    assert found["replica_ms"] > 0 and found["ingress_added_ms"] > 0, found
    assert "proxy_added_ms" not in found, found


def test_a_killed_ingress_replica_is_replaced_and_serves_the_port_again(local: Local) -> None:
    """The ingress replica SIGKILLed with keep-alive connections open (they leave SERVE_PORT in TIME_WAIT): Serve
    starts a new one, which binds SERVE_PORT again (compat.serve_direct_ingress_reuse_port) and serves."""
    old = _listener(local.serve)
    assert old is not None
    with httpx.Client(base_url=local.base, timeout=60, headers=AUTH) as client:
        for i in range(3):
            assert client.post("/v1/completions", json={"model": "tiny", "prompt": f"k{i}", "max_tokens": 2}
                               ).status_code == 200
        os.kill(old, 9)
        wait_until(lambda: _listener(local.serve) != old, 30, 0.2, "the killed ingress's socket gone")

    def served() -> bool:
        pid = _listener(local.serve)
        return pid not in (None, old) and httpx.post(
            local.base + "/v1/completions", headers=AUTH,
            json={"model": "tiny", "prompt": "back", "max_tokens": 2},
            timeout=30).status_code == 200

    wait_until(served, 180, 1.0, "a new ingress replica serving SERVE_PORT")
    assert Path(f"/proc/{_listener(local.serve)}/cmdline").read_bytes().startswith(b"ray::ServeReplica:llm:ingress")


def _lora_metric(local: Local, name: str, adapter: str | None = None) -> dict[str, float]:
    """Per replica: the sum of `name`'s samples of model tiny-lora (and `adapter`)."""
    text = httpx.get(f"http://127.0.0.1:{local.metrics}/metrics", timeout=10).text
    out: dict[str, float] = {}
    for line in text.splitlines():
        if line.startswith(name + "{") and 'model="tiny-lora"' in line and (
                adapter is None or f'adapter="{adapter}"' in line):
            replica = line.split('replica="', 1)[1].split('"', 1)[0]
            out[replica] = out.get(replica, 0.0) + float(line.rsplit(" ", 1)[1])
    return out


def _lora_chat(local: Local, adapter: str) -> httpx.Response:
    body = {"model": f"tiny-lora:{adapter}", "messages": [{"role": "user", "content": "hello world"}],
            "max_tokens": 6, "temperature": 0, "ignore_eos": True}
    r = httpx.post(local.base + "/v1/chat/completions", json=body, headers=AUTH, timeout=60)
    assert r.status_code == 200, r.text
    return r


def test_lora_requests_go_to_the_replica_holding_the_adapter(local: Local) -> None:
    """Serve's multiplexing: an adapter's requests land on the replica that loaded it, which loads it once while it
    holds it; at one adapter per replica a third adapter evicts one; a folder copied in is served at once."""
    first = [_lora_chat(local, "A") for _ in range(6)]
    assert len({r.headers["x-served-by"] for r in first}) == 1  # one replica served every request for A
    assert len({r.json()["choices"][0]["message"]["content"] for r in first}) == 1
    wait_until(lambda: sum(_lora_metric(local, "ray_llm_lora_requests_total", "A").values()) >= 6, 60, 1,
               "per-adapter request metric")
    loads = _lora_metric(local, "ray_llm_lora_adapter_loads_total", "A")
    assert sum(loads.values()) == 1, loads  # loaded once, on one replica
    holder = next(iter(loads))
    assert first[0].headers["x-served-by"].endswith("/" + holder)  # the replica that loaded A served it
    for adapter in ("B", "C", "B", "C", "A"):  # three adapters, two replicas holding one each: evictions
        _lora_chat(local, adapter)
    wait_until(lambda: sum(_lora_metric(local, "ray_llm_lora_adapter_evictions_total").values()) >= 1, 60, 1,
               "an eviction at max_num_adapters_per_replica")
    held = _lora_metric(local, "ray_llm_lora_adapters_loaded")
    assert held and all(v <= 1 for v in held.values()), held
    shutil.copytree(local.cwd / "adapters" / "A", local.cwd / "adapters" / "D")  # no redeploy
    again = _lora_chat(local, "D")
    assert again.json()["choices"][0]["message"]["content"] == first[0].json()["choices"][0]["message"]["content"]
    r = httpx.post(local.base + "/v1/chat/completions", headers=AUTH, timeout=60, json={
        "model": "tiny-lora:nope", "messages": [{"role": "user", "content": "hi"}]})
    assert r.status_code == 404 and r.json()["error"]["code"] == "model_not_found", r.text
    r = httpx.post(local.base + "/v1/chat/completions", headers=AUTH, timeout=60, json={
        "model": "tiny-lora:../A", "messages": [{"role": "user", "content": "hi"}]})
    assert r.status_code == 400 and "an adapter name is a folder name" in r.json()["error"]["message"], r.text
    assert _lora_chat(local, "A").status_code == 200
