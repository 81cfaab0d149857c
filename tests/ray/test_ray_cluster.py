"""Multi-"VM" Ray cluster in network namespaces, with the exact commands the containers run.

Head in one namespace, two workers in two others (10.77.X.1/.2/.3, random X):
`python -m app cluster head --block`, `... worker --block --address HEAD:6379`,
`... deploy`, `... status --json`. The tiny model is deployed with 2 replicas,
driven with the official `openai` client from inside a namespace, and then:
a replica process is SIGKILLed (failures at most the requests in flight,
replacement RUNNING within a bound) and a whole worker VM is killed (traffic
continues on the other). The scenario runs under `unshare --pid --fork
--kill-child --mount-proc --net`, so no process, namespace or link outlives it.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from tests.support.env import ROOT, need, need_binary, need_root
from tests.support.servers import wait_until

pytestmark = [pytest.mark.root, pytest.mark.slow]

CONFIG = """
model_loading_config: {{model_id: tiny, model_source: {src}}}
engine: transformers
deployment_config:
  name: tiny
  num_replicas: 2
  ray_actor_options: {{num_cpus: 1, resources: {{small-model-workers: 1}}}}
  max_ongoing_requests: 8
  max_queued_requests: 64
  health_check_period_s: 1
  health_check_timeout_s: 5
engine_kwargs: {{dtype: float32, device: cpu, max_num_seqs: 4}}
max_waiting: 16
"""

# the load generator, run inside the head namespace: the official client, bounded by a duration
CLIENT = r"""
import json, sys, threading, time, openai
url, seconds, threads, progress = sys.argv[1], float(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
client = openai.OpenAI(base_url=url, api_key="x", max_retries=0, timeout=25)
out, lock = [], threading.Lock()
def loop():
    end = time.time() + seconds
    while time.time() < end:
        t0 = time.time()
        try:
            r = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hi"}],
                                               max_tokens=24, extra_body={"min_tokens": 24})
            ok, err = r.usage.completion_tokens == 24, ""
        except Exception as exc:
            ok, err = False, f"{type(exc).__name__}:{getattr(exc, 'status_code', '')}"
        with lock:
            out.append({"start": t0, "end": time.time(), "ok": ok, "err": err})
            with open(progress, "a") as f:  # one line per finished request: the test waits on it
                f.write("ok\n" if ok else "fail\n")
ts = [threading.Thread(target=loop) for _ in range(threads)]
[t.start() for t in ts]
[t.join() for t in ts]
print(json.dumps(out))
"""


def test_multi_vm_cluster_in_namespaces(tiny_model: Path, tmp_path: Path) -> None:
    need_root()
    need_binary("ip", "unshare")
    need(Path(sys.executable).with_name("ray").exists(), "needs ray[serve]==2.60.0 in the venv")
    from tests.support.netns import run_isolated

    env = {**os.environ, "TINY_MODEL_DIR": str(tiny_model), "SCENARIO_DIR": str(tmp_path)}
    run_isolated(Path(__file__).resolve(), env, ROOT, timeout=540)


# ----------------------------------------------------------------------------- the scenario (in the unshare)


def _scenario() -> None:
    work = Path(os.environ["SCENARIO_DIR"])
    (work / "tiny.yaml").write_text(CONFIG.format(src=os.environ["TINY_MODEL_DIR"]))
    (work / "client.py").write_text(CLIENT)
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    env.update(HOME=str(work), HF_HUB_OFFLINE="1", RAY_AUTH_TOKEN=os.urandom(32).hex(), PYTHONUNBUFFERED="1",
               RAY_health_check_period_ms="1000", RAY_health_check_timeout_ms="1000",
               RAY_health_check_failure_threshold="3")
    py = sys.executable
    t_all = time.monotonic()
    short = Path(tempfile.mkdtemp(prefix="rc"))  # Ray's socket paths must stay under 107 bytes
    try:
        _run_scenario(work, short, env, py, t_all)
    finally:
        shutil.rmtree(short, ignore_errors=True)


def _run_scenario(work: Path, short: Path, env: dict[str, str], py: str, t_all: float) -> None:
    from tests.support.netns import NetnsVMs

    def log(msg: str) -> None:
        print(f"[{time.monotonic() - t_all:6.1f}s] {msg}", flush=True)

    with NetnsVMs(3) as vms:
        head_ip = vms.ips[0]
        address = f"{head_ip}:6379"
        logs = {name: work / f"{name}.log" for name in ("head", "w1", "w2")}

        def up(name: str) -> bool:
            return "node is up" in logs[name].read_text(errors="replace")

        head = vms.popen(0, [py, "-m", "app", "cluster", "head", "--block", "--node-ip", head_ip,
                             "--temp-dir", str(short / "rh"), "--object-store-mb", "100", "--num-cpus", "2"],
                         env, logs["head"], ROOT)
        wait_until(lambda: up("head") or head.poll() is not None, 120, 0.3, "head")
        assert up("head"), logs["head"].read_text()[-3000:]
        log("head up")
        for i, name in ((1, "w1"), (2, "w2")):
            vms.popen(i, [py, "-m", "app", "cluster", "worker", "--block", "--address", address, "--node-ip",
                          vms.ips[i], "--temp-dir", str(short / f"r{name}"), "--object-store-mb", "100",
                          "--num-cpus", "2", "--num-gpus", "0", "--tier-slots", "1"], env, logs[name], ROOT)
        for name in ("w1", "w2"):
            wait_until(lambda n=name: up(n), 120, 0.3, f"worker {name}")
        log("workers joined")

        # a worker without the token cannot join
        no_token = {k: v for k, v in env.items() if k != "RAY_AUTH_TOKEN"}
        bad = vms.run(1, [py, "-m", "app", "cluster", "worker", "--address", address, "--node-ip", vms.ips[1]],
                      no_token, ROOT, timeout=60)
        assert bad.returncode != 0 and "RAY_AUTH_TOKEN" in bad.stderr, bad.stderr

        dep = vms.run(0, [py, "-m", "app", "cluster", "deploy", str(work / "tiny.yaml"), "--address", address,
                          "--serve-port", "8000", "--http-host", head_ip, "--request-timeout", "20", "--wait", "240"],
                     env, ROOT, timeout=300)
        assert dep.returncode == 0, dep.stdout[-3000:] + dep.stderr[-3000:]
        log("deployed")

        def status() -> dict:
            st = vms.run(0, [py, "-m", "app", "cluster", "status", "--address", address, "--json"], env, ROOT,
                         timeout=90)
            assert st.returncode == 0, st.stderr[-2000:]
            return json.loads(st.stdout)

        st = status()
        replicas = [r for r in st["replicas"] if r["model"] == "tiny"]
        assert len(replicas) == 2, replicas
        assert {r["node_ip"] for r in replicas} == {vms.ips[1], vms.ips[2]}, "replicas must run on the workers only"
        assert all(r["engine"] == "transformers" and not r["node_head"] for r in replicas)
        head_node = next(n for n in st["nodes"] if n["head"])
        assert head_node["ip"] == head_ip and head_node["gpus"] == 0
        log(f"replicas on {sorted(r['node_ip'] for r in replicas)}")

        url = f"http://{head_ip}:8000/v1"

        loads = iter(range(1000))

        def load(seconds: float, threads: int) -> tuple[subprocess.Popen[str], Path]:
            progress = work / f"progress-{next(loads)}"
            proc = subprocess.Popen(["ip", "netns", "exec", vms.names[0], py, str(work / "client.py"), url,
                                     str(seconds), str(threads), str(progress)], env=env, cwd=ROOT,
                                    stdout=subprocess.PIPE, text=True)
            return proc, progress

        def steady(running: tuple[subprocess.Popen[str], Path], threads: int) -> None:
            """The load threads have finished 2 requests each on average, so requests are in flight now."""
            progress = running[1]
            wait_until(lambda: progress.exists() and progress.read_text().count("ok\n") >= 2 * threads, 60, 0.2,
                       "the load generator in steady state")

        def results(running: tuple[subprocess.Popen[str], Path]) -> list[dict]:
            out, _ = running[0].communicate(timeout=200)
            return json.loads(out)

        # baseline through the official client
        base = results(load(5, 2))
        assert base and all(r["ok"] for r in base), base[:3]
        log(f"baseline: {len(base)} requests ok")

        # fault 1: SIGKILL one replica process
        victim = replicas[0]
        threads = 4
        p = load(30, threads)
        steady(p, threads)
        t_kill = time.time()
        os.kill(int(victim["pid"]), 9)
        log(f"killed replica {victim['replica_id']} (pid {victim['pid']}) on {victim['node_ip']}")
        t0 = time.monotonic()

        def replaced() -> bool:
            reps = [r for r in status()["replicas"] if r["model"] == "tiny"]
            return len(reps) == 2 and victim["replica_id"] not in {r["replica_id"] for r in reps}

        wait_until(replaced, 90, 1, "a replacement replica RUNNING")
        log(f"replacement RUNNING after {time.monotonic() - t0:.1f}s")
        res = results(p)
        failed = [r for r in res if not r["ok"]]
        in_flight_at_kill = threads
        log(f"replica kill: {len(failed)} of {len(res)} requests failed ({Counter_(failed)})")
        assert len(failed) <= in_flight_at_kill, failed
        assert all(r["start"] <= t_kill + 1 for r in failed), "only requests in flight at the kill may fail"

        # fault 2: a whole worker VM dies
        reps = [r for r in status()["replicas"] if r["model"] == "tiny"]
        p = load(45, threads)
        steady(p, threads)
        t_kill = time.time()
        killed = vms.kill_vm(2)
        log(f"killed worker VM {vms.ips[2]} ({killed} processes)")
        res = results(p)
        failed = [r for r in res if not r["ok"]]
        after = [r for r in res if r["start"] > t_kill + 25]  # past the request timeout + node death detection
        log(f"worker kill: {len(failed)} of {len(res)} failed ({Counter_(failed)}); {len(after)} requests after "
            f"recovery, {sum(r['ok'] for r in after)} ok")
        assert after and all(r["ok"] for r in after), "traffic must continue on the surviving worker"
        assert len(failed) <= 3 * threads, failed
        survivors = {r["node_ip"] for r in status()["replicas"] if r["model"] == "tiny"}
        assert vms.ips[2] not in survivors and reps
        dead = [n for n in status()["nodes"] if n["ip"] == vms.ips[2]]
        assert dead and not dead[0]["alive"]
        log("done")


def Counter_(rows: list[dict]) -> dict[str, int]:
    out: dict[str, int] = {}
    for r in rows:
        out[r["err"] or "wrong_length"] = out.get(r["err"] or "wrong_length", 0) + 1
    return out


if __name__ == "__main__":
    assert shutil.which("ip")
    _scenario()
