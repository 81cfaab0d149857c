"""vLLM-CPU replicas on a worker "VM" of a Ray cluster in network namespaces: serving, metrics, EngineCore death.

Head in one namespace, one worker in another (10.77.X.1/.2, random X), started with the commands the
containers run (`python -m app cluster head|worker --block`, `deploy`, `status --json`), all from .venv-vllm.
The tiny model is deployed with `engine: vllm` (app/configs/tiny-vllm.yaml, one replica on the worker) and:
1. `cluster status` shows the replica on the worker with engine=vllm, device=cpu; the official `openai`
   client is served through Ray Serve from inside the head namespace;
2. a real Prometheus (the shipped config's ray-nodes job, head + worker metrics ports) stores vLLM's own
   metrics, exported by vLLM's RayPrometheusStatLogger through Ray, under `vllm:*`, and every expression
   of the Grafana vLLM row returns data;
3. under load, the replica's vLLM EngineCore process is SIGKILLed: requests then in flight get a retryable
   503 (with Retry-After), the replica turns unhealthy and Serve replaces it, and requests after that
   succeed. The recovery time (kill -> replacement RUNNING, kill -> first answered request) is measured
   and printed;
4. the replacement replica's actor process is SIGKILLed (the OOM killer's way): its EngineCore and workers
   exit with it (our parent watchdog plugin) instead of living on, re-parented, holding their memory.
The scenario runs under `unshare --pid --fork --kill-child --mount-proc --net`, so nothing outlives it.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.support.env import ROOT, need, need_binary, need_root
from tests.support.vllm_cpu import VLLM_ENV, need_vllm

pytestmark = [pytest.mark.vllm, pytest.mark.root, pytest.mark.slow]

# the load generator, run inside the head namespace: the official client, honouring Retry-After on 503
CLIENT = r"""
import json, os, sys, threading, time, openai
url, seconds, threads, progress = sys.argv[1], float(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
stop = progress + ".stop"  # the test creates it once it has seen what it waits for
client = openai.OpenAI(base_url=url, api_key="x", max_retries=0, timeout=150)
out, lock = [], threading.Lock()
def loop():
    end = time.time() + seconds
    while time.time() < end and not os.path.exists(stop):
        t0, wait = time.time(), 0.0
        try:
            r = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hi"}],
                                               max_tokens=24, extra_body={"min_tokens": 24})
            ok, status, err = r.usage.completion_tokens == 24, 200, ""
        except openai.APIStatusError as exc:
            ok, status, err = False, exc.status_code, exc.message[:200]
            wait = float(exc.response.headers.get("retry-after") or 0)
        except Exception as exc:
            ok, status, err = False, 0, f"{type(exc).__name__}"
        with lock:
            out.append({"start": t0, "end": time.time(), "ok": ok, "status": status, "err": err,
                        "retry_after": wait})
            with open(progress, "a") as f:
                f.write("ok\n" if ok else "fail\n")
        time.sleep(wait)
ts = [threading.Thread(target=loop) for _ in range(threads)]
[t.start() for t in ts]
[t.join() for t in ts]
print(json.dumps(out))
"""

# run inside the head namespace: wait until every Grafana vLLM-row expression has data (sending traffic)
PROM_CHECK = r"""
import json, math, sys, time, httpx
prom, serve, exprs = sys.argv[1], sys.argv[2], json.loads(sys.argv[3])
def finite(expr):
    r = httpx.get(prom + "/api/v1/query", params={"query": expr}, timeout=10).json()["data"]["result"]
    return any(math.isfinite(float(x["value"][1])) for x in r)
ready_by = time.time() + 60  # Prometheus was just started: poll its readiness before the first query
while True:
    try:
        if httpx.get(prom + "/-/ready", timeout=2).status_code == 200:
            break
    except httpx.HTTPError:
        pass
    if time.time() > ready_by:
        sys.exit("Prometheus did not become ready within 60 s")
    time.sleep(0.2)
pending, deadline = dict(exprs), time.time() + 150
with httpx.Client(timeout=60) as http:
    while pending and time.time() < deadline:
        r = http.post(serve + "/v1/completions", json={"model": "tiny", "prompt": "m", "max_tokens": 8,
                                                       "ignore_eos": True})
        assert r.status_code == 200, r.text
        pending = {k: e for k, e in pending.items() if not finite(e)}
        time.sleep(0.5)
    names = httpx.get(prom + "/api/v1/query", params={"query": '{job="ray-nodes", __name__=~"vllm.*"}'},
                      timeout=10).json()["data"]["result"]
print(json.dumps({"pending": pending, "names": sorted({n["metric"]["__name__"] for n in names})}))
"""


@pytest.mark.timeout(960)
def test_vllm_replicas_on_a_worker_vm(tiny_model: Path, tmp_path: Path) -> None:
    need_root()
    need_vllm()
    need_binary("ip", "unshare", "prometheus")
    need(Path(sys.executable).with_name("ray").exists(), "needs ray[serve]==2.60.0 in the vLLM venv")
    from tests.support.netns import run_isolated

    env = {**os.environ, "TINY_MODEL_DIR": str(tiny_model), "SCENARIO_DIR": str(tmp_path), "PYTHONPATH": str(ROOT)}
    run_isolated(Path(__file__).resolve(), env, ROOT, timeout=900)


# ----------------------------------------------------------------------------- the scenario (in the unshare)


def _scenario() -> None:
    work = Path(os.environ["SCENARIO_DIR"])
    cfg = (ROOT / "app" / "configs" / "tiny-vllm.yaml").read_text().replace(
        "./.cache/tiny-model", os.environ["TINY_MODEL_DIR"])
    (work / "tiny-vllm.yaml").write_text(cfg.replace("health_check_period_s: 2", "health_check_period_s: 1"))
    (work / "client.py").write_text(CLIENT)
    (work / "prom_check.py").write_text(PROM_CHECK)
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    env.update(VLLM_ENV, HOME=str(work), HF_HUB_OFFLINE="1", RAY_AUTH_TOKEN=os.urandom(32).hex(),
               PYTHONUNBUFFERED="1", RAY_USAGE_STATS_ENABLED="0")  # node health checks: the head's defaults
    short = Path(tempfile.mkdtemp(prefix="rv"))  # Ray's socket paths must stay under 107 bytes
    try:
        _run(work, short, env, time.monotonic())
    finally:
        shutil.rmtree(short, ignore_errors=True)


def _engine_core_pid(replica_pid: int, why: Callable[[], str]) -> int:
    from tests.support.vllm_cpu import process_tree, vllm_processes

    cores = [pid for pid, cmd in vllm_processes(replica_pid).items() if cmd.startswith("VLLM::EngineCore")]
    assert len(cores) == 1, (f"expected one VLLM::EngineCore below the replica (pid {replica_pid}, "
                             f"{'alive' if Path(f'/proc/{replica_pid}').exists() else 'gone'}): {cores}; its "
                             f"processes: {process_tree(replica_pid)}\n{why()}")
    return cores[0]


def _serve_log_tail(short: Path, replica_id: str) -> str:
    """What Serve and the GCS logged about `replica_id` and dead nodes (the evidence when it was replaced)."""
    lines: list[str] = []
    logs = [*short.glob("*/session_latest/logs/serve/*.log"), *short.glob("*/session_latest/logs/gcs_server.*")]
    for log in sorted(logs):
        hits = [ln for ln in log.read_text(errors="replace").splitlines()
                if replica_id in ln or any(w in ln.lower() for w in ("health", "error", "dead"))]
        if hits:
            lines += [f"--- {log.name}", *hits[-15:]]
    return "\n".join(lines[-80:])


def _run(work: Path, short: Path, env: dict[str, str], t_all: float) -> None:
    from app.ops.prometheus import PrometheusSettings, render_prometheus
    from tests.support.dashboards import vllm_row_exprs
    from tests.support.netns import NetnsVMs
    from tests.support.servers import wait_until

    py = sys.executable

    def log(msg: str) -> None:
        print(f"[{time.monotonic() - t_all:6.1f}s] {msg}", flush=True)

    with NetnsVMs(2, prefix="rv") as vms:
        head_ip, worker_ip = vms.ips
        address = f"{head_ip}:6379"
        logs = {name: work / f"{name}.log" for name in ("head", "worker")}

        def up(name: str) -> bool:
            return "node is up" in logs[name].read_text(errors="replace")

        head = vms.popen(0, [py, "-m", "app", "cluster", "head", "--block", "--node-ip", head_ip, "--temp-dir",
                             str(short / "h"), "--object-store-mb", "100", "--num-cpus", "2"], env, logs["head"], ROOT)
        wait_until(lambda: up("head") or head.poll() is not None, 120, 0.3, "head")
        assert up("head"), logs["head"].read_text()[-3000:]
        vms.popen(1, [py, "-m", "app", "cluster", "worker", "--block", "--address", address, "--node-ip", worker_ip,
                      "--temp-dir", str(short / "w"), "--object-store-mb", "100", "--num-cpus", "2", "--num-gpus",
                      "0", "--tier-slots", "1"], env, logs["worker"], ROOT)
        wait_until(lambda: up("worker"), 120, 0.3, "worker")
        log("head and worker up")

        t0 = time.monotonic()
        dep = vms.run(0, [py, "-m", "app", "cluster", "deploy", str(work / "tiny-vllm.yaml"), "--address", address,
                          "--serve-port", "8000", "--http-host", head_ip, "--request-timeout", "150",
                          "--wait", "420"], env, ROOT, timeout=480)
        assert dep.returncode == 0, dep.stdout[-3000:] + dep.stderr[-3000:]
        log(f"deployed the vLLM replica in {time.monotonic() - t0:.1f}s")

        def replicas() -> list[dict]:
            st = vms.run(0, [py, "-m", "app", "cluster", "status", "--address", address, "--json"], env, ROOT,
                         timeout=90)
            assert st.returncode == 0, st.stderr[-2000:]
            return [r for r in json.loads(st.stdout)["replicas"] if r["model"] == "tiny"]

        (rep,) = replicas()
        assert (rep["engine"], rep["device"], rep["node_ip"]) == ("vllm", "cpu", worker_ip), rep
        human = vms.run(0, [py, "-m", "app", "cluster", "status", "--address", address], env, ROOT, timeout=90)
        assert "engine=vllm device=cpu" in human.stdout, human.stdout
        log(f"status: replica {rep['replica_id']} on {worker_ip}, engine=vllm")

        url = f"http://{head_ip}:8000/v1"
        loads = iter(range(100))

        def load(seconds: float, threads: int) -> tuple[subprocess.Popen[str], Path]:
            progress = work / f"progress-{next(loads)}"
            p = subprocess.Popen(["ip", "netns", "exec", vms.names[0], py, str(work / "client.py"), url, str(seconds),
                                  str(threads), str(progress)], env=env, cwd=ROOT, stdout=subprocess.PIPE, text=True)
            return p, progress

        def results(running: tuple[subprocess.Popen[str], Path]) -> list[dict]:
            out, _ = running[0].communicate(timeout=400)
            return json.loads(out)

        base = results(load(4, 2))
        assert base and all(r["ok"] for r in base), base[:3]
        log(f"baseline through the openai client: {len(base)} requests ok")

        # vLLM's metrics through Ray into Prometheus (shipped config, ray-nodes job on both nodes)
        conf = render_prometheus(work / "prom", PrometheusSettings(
            prometheus_scrape_interval="1s", prometheus_eval_interval="1s", head_ip=head_ip,
            ray_metrics_export_port=8090, ray_node_targets=f"{head_ip}:8090,{worker_ip}:8090",
            fallback_port="8001", nginx_exporter_targets=f"{head_ip}:9113", ray_sd_file=str(work / "no-sd.json")))
        vms.popen(0, ["prometheus", f"--config.file={conf}", f"--storage.tsdb.path={work / 'tsdb'}",
                      f"--web.listen-address={head_ip}:9090", "--log.level=warn"], env, work / "prometheus.log", ROOT)
        exprs = dict(vllm_row_exprs())
        chk = vms.run(0, [py, str(work / "prom_check.py"), f"http://{head_ip}:9090", f"http://{head_ip}:8000",
                          json.dumps(exprs)], env, ROOT, timeout=240)
        assert chk.returncode == 0, chk.stdout[-2000:] + chk.stderr[-3000:]
        prom = json.loads(chk.stdout.strip().splitlines()[-1])
        assert not prom["pending"], f"Grafana vLLM-row expressions without data: {prom['pending']}"
        assert {"vllm:num_requests_running", "vllm:kv_cache_usage_perc", "vllm:time_to_first_token_seconds_bucket",
                "vllm:generation_tokens_total"} <= set(prom["names"]), prom["names"]
        assert not [n for n in prom["names"] if not n.startswith("vllm:")], prom["names"]
        log(f"Prometheus: {len(prom['names'])} vllm:* series names from Ray; {len(exprs)} Grafana vLLM-row "
            "expressions return data")

        # fault: SIGKILL the EngineCore of the serving replica, under load
        now = replicas()
        assert [r["replica_id"] for r in now] == [rep["replica_id"]], (
            f"Serve replaced replica {rep['replica_id']} before any fault was injected: {now}\n"
            + _serve_log_tail(short, rep["replica_id"]))
        core = _engine_core_pid(int(rep["pid"]), lambda: _serve_log_tail(short, rep["replica_id"]))
        threads = 4
        running = load(300, threads)  # until the test has seen the replacement serve (stop file)
        wait_until(lambda: running[1].exists() and running[1].read_text().count("ok\n") >= 2 * threads, 60, 0.2,
                   "the load generator in steady state")
        t_kill = time.time()
        os.kill(core, 9)
        log(f"SIGKILLed vLLM EngineCore pid {core} of replica {rep['replica_id']} (pid {rep['pid']})")
        tk = time.monotonic()

        def replaced() -> bool:
            now = replicas()
            return len(now) == 1 and now[0]["replica_id"] != rep["replica_id"]

        wait_until(replaced, 420, 1, "Serve to replace the replica whose engine died")
        replace_s = time.monotonic() - tk
        log(f"replacement replica RUNNING {replace_s:.1f}s after the kill")
        ok_at_replacement = running[1].read_text().count("ok\n")
        wait_until(lambda: running[1].read_text().count("ok\n") >= ok_at_replacement + 4 * threads, 120, 0.2,
                   "requests served by the replacement")
        Path(f"{running[1]}.stop").touch()
        res = results(running)
        failed = [r for r in res if not r["ok"]]
        served_after = [r for r in res if r["ok"] and r["start"] > t_kill]
        first_ok_s = min(r["end"] for r in served_after) - t_kill if served_after else float("nan")
        codes: dict[str, int] = {}
        for r in failed:
            codes[str(r["status"])] = codes.get(str(r["status"]), 0) + 1
        last_fail_s = max(r["end"] for r in failed) - t_kill if failed else float("nan")
        log(f"EngineCore kill: {len(failed)} of {len(res)} requests failed {codes}, the last {last_fail_s:.1f}s after "
            f"the kill; RECOVERY: kill -> replacement RUNNING {replace_s:.1f}s, kill -> first request started after "
            f"the kill answered {first_ok_s:.1f}s")
        assert failed, "the kill must have hit requests in flight"
        assert all(r["status"] == 503 and r["retry_after"] > 0 for r in failed), failed[:5]
        assert any("died" in r["err"] or "dead" in r["err"] for r in failed), failed[:5]
        assert all(r["start"] < t_kill + replace_s for r in failed), "a request failed after the replacement"
        after = [r for r in res if r["start"] > t_kill + replace_s]
        assert after and all(r["ok"] for r in after), "requests after the replacement must succeed"
        (new,) = replicas()
        assert new["engine"] == "vllm" and new["node_ip"] == worker_ip

        # the replica actor's process SIGKILLed: vLLM's processes below it must not outlive it
        from tests.support.vllm_cpu import start_time, survivors, vllm_processes

        children = vllm_processes(int(new["pid"]))
        assert any(cmd.startswith("VLLM::EngineCore") for cmd in children.values()), children
        snapshot = {pid: start_time(pid) for pid in children}
        os.kill(int(new["pid"]), 9)
        tk = time.monotonic()
        wait_until(lambda: not survivors(snapshot), 30, 0.2,
                   f"vLLM's processes {children} to exit after their replica was SIGKILLed")
        log(f"replica pid {new['pid']} SIGKILLed: its {len(children)} vLLM processes exited within "
            f"{time.monotonic() - tk:.1f}s")
        log("done")


if __name__ == "__main__":
    _scenario()
