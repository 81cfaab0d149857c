"""The DeepSpeed profile as executed: docker-compose-ray.yml's deepspeed services on two emulated VMs.

The README's DeepSpeed steps with the operator's own files and commands, on the compose harness (tests/composevm):
each VM's `.env` (the DS_* values, the same ssh key pair at DS_SSH_KEY_FILE, the model folder at DS_MODEL_DIR, one
private NIC name), then `./deploy-ray.sh deepspeed` on the second VM and on the first one last (it also starts the
launcher). The test builds no launch argument: the launcher, pdsh, both sshds and the ranks run with the commands,
environment, user and volumes the compose model gives them (tests/support/ds_cluster.py hand-builds them instead,
for the fault-timing tests of tests/deepspeed/test_deepspeed_tp.py, whose tuning knobs the shipped file does not
expose). Then:
1. rank 0 serves the API on the shipped default address (127.0.0.1:DS_PORT of the first VM) as a TP=2 group over
   both VMs, greedy output equal to the unsharded model's, and the `deepspeed` service's healthcheck turns healthy;
2. the second VM's deepspeed-node crashes (SIGKILL): rank 0 answers 503, the launcher exits non-zero, and the
   services' restart policies start a fresh group that serves the same answers again, nobody running deploy-ray.sh.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.composevm.cluster import NIC, ComposeVMs, env_file
from tests.support.ds_cluster import greedy_reference
from tests.support.env import need_binary, need_root

pytestmark = [pytest.mark.root, pytest.mark.slow, pytest.mark.timeout(900)]

VMS = ["ds0", "ds1"]  # DS_HOSTS order: ds0 runs rank 0 and the launcher
PROMPTS = ["hello world", "nginx upstream failover"]
N_TOKENS = 12

# from inside a VM: /readyz status and one greedy completion per prompt from rank 0 (shipped default address)
ASK = r"""
import json, sys, httpx
base, prompts, n = "http://127.0.0.1:8002", json.loads(sys.argv[1]), int(sys.argv[2])
out = {"texts": {}}
try:
    r = httpx.get(base + "/readyz", timeout=5, trust_env=False)
    out["readyz"] = r.status_code
    model = r.json().get("models", {}).get("tiny", {}) if r.status_code == 200 else {}
    out["engine"], out["reason"] = model.get("engine"), model.get("reason")
    if r.status_code == 200:
        for p in prompts:
            body = {"model": "tiny", "prompt": p, "max_tokens": n, "temperature": 0, "ignore_eos": True}
            c = httpx.post(base + "/v1/completions", json=body, timeout=60, trust_env=False)
            out["texts"][p] = c.json()["choices"][0]["text"] if c.status_code == 200 else c.status_code
except httpx.HTTPError as exc:
    out["error"] = f"{type(exc).__name__}: {exc}"
print(json.dumps(out))
"""


class DSKit:
    """Two emulated VMs with the operator's DeepSpeed files: one .env each, the key pair, the model folder."""

    def __init__(self, vms: ComposeVMs, work: Path, tiny: Path):
        self.vms = vms
        key = work / "ssh" / "ds_ssh_key"
        key.parent.mkdir()
        subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(key)], check=True, timeout=60)
        hosts = ",".join(vms.ips[vm] for vm in VMS)
        token = os.urandom(32).hex()
        self.env: dict[str, Path] = {}
        for vm in VMS:
            shutil.copytree(tiny, work / vm / "models" / "tiny")  # "the same model path on every VM"
            self.env[vm] = env_file(
                work / f"{vm}.env", HEAD_IP=vms.ips[VMS[0]], NODE_IP=vms.ips[vm], RAY_AUTH_TOKEN=token,
                NUM_GPUS="0", HF_CACHE_DIR=str(work / vm / "hf"), HF_HUB_OFFLINE="1",
                DS_HOSTS=hosts, DS_NET_IFNAME=NIC, DS_MODEL="/models/tiny", DS_SERVED_MODEL_NAME="tiny",
                DS_MODEL_DIR=str(work / vm / "models"), DS_SSH_KEY_FILE=str(key), DS_DEVICE="cpu",
                DS_DTYPE="float32", DS_LAUNCH_DEADLINE_S="300",
                # a dead peer is seen at once; these only bound how long rank 0 lingers and the rest may take
                DS_COLLECTIVE_TIMEOUT_S="10", DS_DEAD_LINGER_S="2", DS_EXIT_GRACE_S="10")

    def deploy(self, vm: str, *args: str) -> subprocess.CompletedProcess[str]:
        res = self.vms.deploy(vm, *args, env_file=self.env[vm], timeout=300)
        print(f"$ ./deploy-ray.sh {' '.join(args)}  (on {vm}: rc {res.returncode})\n{res.stdout[-2000:]}"
              f"\n{res.stderr[-2000:]}")
        return res

    def ask(self) -> dict[str, Any]:
        import json

        self.last_answer: dict[str, Any] = self.vms.python(VMS[0], ASK, json.dumps(PROMPTS), str(N_TOKENS),
                                                           timeout=180)
        return self.last_answer

    def logs(self) -> str:
        return "\n".join(f"--- {vm}/{svc}:\n{self.vms.log(vm, svc)[-2500:]}"
                         for vm, svc in (("ds0", "deepspeed"), ("ds0", "deepspeed-node"), ("ds1", "deepspeed-node")))

    def wait(self, predicate: Any, timeout: float, what: str, interval: float = 2.0) -> Any:
        deadline = time.monotonic() + timeout
        last: Any = None
        while time.monotonic() < deadline:
            last = predicate()
            if last:
                return last
            time.sleep(interval)
        raise AssertionError(f"timed out after {timeout}s waiting for {what} (last: {last}; rank 0's last answer: "
                             f"{getattr(self, 'last_answer', None)})\n{self.logs()}")


@pytest.fixture(scope="module")
def kit(tmp_path_factory: pytest.TempPathFactory, tiny_model: Path) -> Iterator[DSKit]:
    need_root()
    need_binary("ip", "unshare", "nsenter", "pdsh", "sshd", "ssh", "ssh-keygen")
    work = tmp_path_factory.mktemp("compose-ds")
    with ComposeVMs(work / "vms", VMS) as vms:
        yield DSKit(vms, work, tiny_model)


@pytest.fixture(scope="module")
def reference(tiny_model: Path) -> dict[str, str]:
    return greedy_reference(tiny_model, PROMPTS, [], N_TOKENS)


def _serving(kit: DSKit, reference: dict[str, str]) -> dict[str, Any] | None:
    out = kit.ask()
    return out if out.get("readyz") == 200 and out["texts"] == reference else None


def test_deepspeed_profile_serves_tp2_across_the_vms(kit: DSKit, reference: dict[str, str]) -> None:
    t0 = time.monotonic()
    assert kit.deploy("ds1", "deepspeed").returncode == 0
    assert set(kit.vms.ps("ds1")) == {"deepspeed-node"}, "a VM that is not first in DS_HOSTS runs no launcher"
    assert kit.deploy("ds0", "deepspeed").returncode == 0
    assert set(kit.vms.ps("ds0")) == {"deepspeed-node", "deepspeed"}
    out = kit.wait(lambda: _serving(kit, reference), 300, "rank 0 serving the greedy reference")
    assert out["engine"] == "deepspeed" and "over 2 ranks" in (out["reason"] or ""), out  # one rank per VM
    print(f"deepspeed profile: TP=2 group serving {time.monotonic() - t0:.0f}s after the first deploy-ray.sh")
    kit.vms.wait_health("ds0", "deepspeed", "healthy", 120)
    log = kit.vms.log("ds0", "deepspeed")
    assert log.count("rank 0 ready after") == 1 and "--launcher pdsh" in log, log[-3000:]


def test_crashed_peer_vm_service_restarts_the_group_by_itself(kit: DSKit, reference: dict[str, str]) -> None:
    assert kit.ask().get("readyz") == 200, "the group of the previous test serves"
    kit.vms.crash("ds1", "deepspeed-node")  # SIGKILL of the service: its sshd and rank 1 die with it
    t0 = time.monotonic()
    down = kit.wait(lambda: (lambda o: o if o.get("readyz") != 200 else None)(kit.ask()), 60,
                    "rank 0 to stop being ready after its peer died", interval=0.5)
    t_down = time.monotonic() - t0
    assert down.get("readyz") == 503 or "error" in down, down  # 503 while lingering, then the launcher is gone
    kit.wait(lambda: kit.vms.log("ds0", "deepspeed").count("rank 0 ready after") >= 2, 300,
             "the restarted launcher's fresh group to be ready", interval=3)
    assert "DeepSpeed launcher exited with" in kit.vms.log("ds0", "deepspeed")
    assert kit.wait(lambda: _serving(kit, reference), 60, "the fresh group serving the greedy reference")
    print(f"peer crash: rank 0 not ready after {t_down:.1f}s; fresh group serving after "
          f"{time.monotonic() - t0:.0f}s, no deploy-ray.sh run")
    kit.vms.wait_health("ds0", "deepspeed", "healthy", 120)

