"""The rendered RayService, run for real: its serveConfigV2, as is, on a two-"VM" Ray cluster in network namespaces.

`k8s render` is run on a tiny-model config of the `cpu` tier. The head and the worker are started with the `ray
start` lines KubeRay makes of their groups' rayStartParams (`app.k8s.ray.ray_start_line`: the worker carries the
tier's custom resource from its quoted JSON, num-gpus 0 on the head), plus only what KubeRay itself adds in a
pod (node address, num-cpus from the container's limits) and what namespaces on one box need (temp dir). The
ConfigMap's files are written where its mount path says (a temp dir stands in for /etc/llmkit/models), the API
keys reach both nodes as the Secret reference gives them (API_KEYS). The serve config is applied the way KubeRay's
`PUT /api/serve/applications/` does it in the dashboard (serve_start with its options, then deploy_apps): Serve's
controller imports the import path and calls the builder with the args. The replica must land on the worker (the
only node with the tier's resource) and a chat request through Serve's proxy on the head must answer.

Runs under `unshare --pid --fork --kill-child --mount-proc --net` (tests/netns.py): nothing outlives it.
"""

from __future__ import annotations

import json
import os
import shlex
import shutil
import sys
import tempfile
import time
from pathlib import Path

import pytest

from tests.support.env import ROOT, need, need_binary, need_root
from tests.support.servers import wait_until

pytestmark = [pytest.mark.root, pytest.mark.slow]

CONFIG = """
model_loading_config: {{model_id: tiny-k8s, model_source: {src}}}
engine: transformers
deployment_config:
  name: tiny-k8s
  num_replicas: 1
  ray_actor_options: {{num_cpus: 1, num_gpus: 0, resources: {{cpu-workers: 1}}}}
  max_ongoing_requests: 8
  health_check_period_s: 2
engine_kwargs: {{dtype: float32, device: cpu, max_num_seqs: 4}}
max_waiting: 4
"""

# the driver KubeRay's dashboard call amounts to (ray/dashboard/modules/serve/serve_head.py, put_all_applications);
# the dashboard is off here (it is on in a RayService head), so the same two calls run in a driver on the head
DRIVER = r"""
import json, sys, time, ray, yaml
from ray import serve
from ray.serve._private.api import serve_start
from ray.serve.schema import ServeDeploySchema
address, config_file, deadline = sys.argv[1], sys.argv[2], time.monotonic() + float(sys.argv[3])
config = ServeDeploySchema.model_validate(yaml.safe_load(open(config_file)))
ray.init(address=address, logging_level="WARNING", log_to_driver=False)
client = serve_start(http_options=config.http_options.model_dump(), proxy_location=config.proxy_location,
                     grpc_options=config.grpc_options.model_dump(), global_logging_config=config.logging_config,
                     controller_options=config.controller_options)
client.deploy_apps(config)
while True:
    app = serve.status().applications.get("llm")
    state = app.status.value if app else "absent"
    if state == "RUNNING":
        break
    if state in ("DEPLOY_FAILED", "UNHEALTHY") or time.monotonic() > deadline:
        sys.exit(f"app {state}: {app.message if app else ''}")
    time.sleep(0.5)
print("RUNNING", flush=True)
"""


def test_rendered_serve_config_runs_on_the_tier_worker(tiny_model: Path, tmp_path: Path) -> None:
    need_root()
    need_binary("ip", "unshare")
    need(Path(sys.executable).with_name("ray").exists(), "needs ray[serve]==2.60.0 in the venv")
    from tests.support.netns import run_isolated

    env = {**os.environ, "TINY_MODEL_DIR": str(tiny_model), "SCENARIO_DIR": str(tmp_path)}
    run_isolated(Path(__file__).resolve(), env, ROOT, timeout=420)


# ----------------------------------------------------------------------------- the scenario (in the unshare)


def _scenario() -> None:
    work = Path(os.environ["SCENARIO_DIR"])
    short = Path(tempfile.mkdtemp(prefix="rk"))  # Ray's socket paths must stay under 107 bytes
    try:
        _run(work, short)
    finally:
        shutil.rmtree(short, ignore_errors=True)


def _run(work: Path, short: Path) -> None:
    import yaml

    from app.k8s.ray import ray_start_line
    from app.k8s.render import gather, render_objects
    from tests.support.netns import NetnsVMs

    t0 = time.monotonic()

    def log(msg: str) -> None:
        print(f"[{time.monotonic() - t0:6.1f}s] {msg}", flush=True)

    config = work / "tiny-k8s.yaml"
    config.write_text(CONFIG.format(src=os.environ["TINY_MODEL_DIR"]))
    mount = work / "etc-llmkit-models"  # stands in for the ConfigMap's mount path in the pods
    inp = gather({"FALLBACK_MODEL": "tiny", "RAY_OBJECT_STORE_MB": "100", "SERVE_REQUEST_TIMEOUT_S": "30"},
                 configs=[config], config_mount=str(mount))
    objs = render_objects(inp)
    ray = next(o for o in objs if o["kind"] == "RayService")["spec"]
    config_map = next(o for o in objs if o["metadata"]["name"] == "llmkit-model-configs")
    mount.mkdir()
    for name, text in config_map["data"].items():  # what the kubelet does with the ConfigMap volume
        (mount / name).write_text(text)
    (work / "serve.yaml").write_text(ray["serveConfigV2"])
    (work / "driver.py").write_text(DRIVER)
    [group] = ray["rayClusterConfig"]["workerGroupSpecs"]
    assert group["groupName"] == "cpu", group["groupName"]
    serve_port = yaml.safe_load(ray["serveConfigV2"])["http_options"]["port"]

    key = "k8s-" + os.urandom(8).hex()
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    # authOptions mode token (both pods), the Secret's API_KEYS (both pods: the builder runs on either)
    env.update(HOME=str(work), HF_HUB_OFFLINE="1", PYTHONUNBUFFERED="1", RAY_AUTH_MODE="token",
               RAY_AUTH_TOKEN=os.urandom(32).hex(), RAY_USAGE_STATS_ENABLED="0", API_KEYS=key)
    ray_bin = str(Path(sys.executable).with_name("ray"))
    with NetnsVMs(2, prefix="rk") as vms:
        head_ip, worker_ip = vms.ips
        address = f"{head_ip}:6379"

        def start(i: int, line: str, name: str) -> Path:
            argv = shlex.split(line)  # the shell KubeRay's container runs: one level of quoting goes
            assert argv[0] == "ray"
            pod = [f"--node-ip-address={vms.ips[i]}", "--num-cpus=2", f"--temp-dir={short / name}"]
            if i == 0:
                pod += ["--port=6379", "--include-dashboard=false"]
            logf = work / f"{name}.log"
            vms.popen(i, [ray_bin, *argv[1:-1], *pod, argv[-1]], env, logf, ROOT)
            return logf

        head_log = start(0, ray_start_line(ray["rayClusterConfig"]["headGroupSpec"]["rayStartParams"], head=True),
                         "head")
        wait_until(lambda: "Ray runtime started" in head_log.read_text(errors="replace"), 120, 0.3, "head")
        log("head up")
        worker_log = start(1, ray_start_line(group["rayStartParams"], head=False, address=address), "worker")
        wait_until(lambda: "Ray runtime started" in worker_log.read_text(errors="replace"), 120, 0.3, "worker")
        log("worker joined")

        dep = vms.run(0, [sys.executable, str(work / "driver.py"), address, str(work / "serve.yaml"), "240"], env,
                      ROOT, timeout=300)
        assert dep.returncode == 0 and "RUNNING" in dep.stdout, dep.stdout[-3000:] + dep.stderr[-3000:]
        log("serveConfigV2 applied: RUNNING")

        st = vms.run(0, [sys.executable, "-m", "app", "cluster", "status", "--address", address, "--json"], env,
                     ROOT, timeout=120)
        assert st.returncode == 0, st.stderr[-2000:]
        status = json.loads(st.stdout)
        worker = next(n for n in status["nodes"] if n["ip"] == worker_ip)
        head = next(n for n in status["nodes"] if n["head"])
        assert worker["resources"].get("cpu-workers") == 1 and worker["gpus"] == 0, worker  # from rayStartParams
        assert "cpu-workers" not in head["resources"] and head["gpus"] == 0, head
        replicas = [r for r in status["replicas"] if r["model"] == "tiny-k8s"]
        assert [r["node_ip"] for r in replicas] == [worker_ip], replicas
        log(f"replica on the cpu worker {worker_ip}")

        url = f"http://{head_ip}:{serve_port}/v1/chat/completions"
        body = {"model": "tiny-k8s", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 8,
                "min_tokens": 8}
        probe = ("import httpx, json, sys; r = httpx.post(sys.argv[1], json=json.loads(sys.argv[2]), timeout=60, "
                 "headers={'Authorization': 'Bearer ' + sys.argv[3]} if sys.argv[3] else {}); "
                 "print(json.dumps({'status': r.status_code, 'body': r.json()}))")
        answers = {}
        for name, bearer in (("with key", key), ("without key", "")):
            out = vms.run(0, [sys.executable, "-c", probe, url, json.dumps(body), bearer], env, ROOT, timeout=90)
            assert out.returncode == 0, out.stderr[-2000:]
            answers[name] = json.loads(out.stdout)
        ok = answers["with key"]
        assert ok["status"] == 200, ok
        assert ok["body"]["usage"]["completion_tokens"] == 8 and ok["body"]["model"] == "tiny-k8s", ok
        assert answers["without key"]["status"] == 401, answers["without key"]
        log("chat answered (and 401 without the Secret's key)")


if __name__ == "__main__":
    assert shutil.which("ip")
    _scenario()
