"""Two emulated VMs for the DeepSpeed tests: network namespaces, a veth pair, one sshd each.

`TwoVMs` builds (all names/addresses random per run, removed in every outcome):
- namespaces `dsv<sfx>a` / `dsv<sfx>b` joined by a veth pair renamed `dsnet0` inside
  both (so one DS_NET_IFNAME fits both "VMs"), addresses 10.78.X.1 and 10.78.X.2;
- a test-generated client key, host key and ssh_config under a temp dir, sshds started with
  `python -m app deepspeed sshd` (the command the rank containers run), and an `ssh`
  wrapper first on PATH that points ssh (and so pdsh) at that config.

`launch()` starts `python -m app deepspeed launch` inside namespace A under
`unshare --pid --fork --kill-child --mount-proc` together with both sshds, so the
DeepSpeed launcher's `pkill -f` on signals can only see this group's processes, and
killing the unshare process ends every process of the group. Clients reach rank 0
from a thread that entered namespace A (`NetnsPool`): no traffic leaves the namespaces.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import random
import shutil
import signal
import subprocess
import sys
import textwrap
import time
import uuid
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tests.support.env import ROOT

CLONE_NEWNET = 0x40000000
IFNAME = "dsnet0"


def _sh(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return subprocess.run(list(args), check=check, capture_output=True, text=True, timeout=60)


def _enter_netns(ns: str) -> None:
    """Move the calling thread (only it) into network namespace `ns`."""
    libc = ctypes.CDLL(None, use_errno=True)
    fd = os.open(f"/run/netns/{ns}", os.O_RDONLY)
    try:
        if libc.setns(fd, CLONE_NEWNET) != 0:
            err = ctypes.get_errno()
            raise OSError(err, f"setns({ns}): {os.strerror(err)}")
    finally:
        os.close(fd)


class NetnsPool:
    """Worker threads living in one network namespace: run client code there."""

    def __init__(self, ns: str, workers: int = 4):
        self._pool = ThreadPoolExecutor(max_workers=workers, initializer=_enter_netns, initargs=(ns,),
                                        thread_name_prefix=f"netns-{ns}")

    def submit(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        return self._pool.submit(fn, *args, **kwargs)

    def run(self, fn: Callable[..., Any], *args: Any, timeout: float = 120.0, **kwargs: Any) -> Any:
        return self._pool.submit(fn, *args, **kwargs).result(timeout)

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)


@dataclass
class Group:
    """One launched tensor-parallel group (`deepspeed launch` + both sshds in one PID namespace)."""

    proc: subprocess.Popen[bytes]
    log_path: Path
    vms: TwoVMs
    started: float = field(default_factory=time.monotonic)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def rank_pid(self, rank_ns: str) -> int | None:
        """Host PID of the `python -u -m app deepspeed serve` process in namespace `rank_ns`."""
        out = _sh("ip", "netns", "pids", rank_ns, check=False).stdout.split()
        for pid in out:
            try:
                argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
            except OSError:
                continue
            if [a.decode(errors="replace") for a in argv[1:6]] == ["-u", "-m", "app", "deepspeed", "serve"]:
                return int(pid)
        return None

    def kill(self) -> None:
        """End the whole group: SIGKILL to unshare kills its PID namespace's init, hence everything in it."""
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(30)


class TwoVMs:
    def __init__(self, tmp: Path):
        self.tmp = tmp
        sfx = uuid.uuid4().hex[:6]
        self.ns_a, self.ns_b = f"dsv{sfx}a", f"dsv{sfx}b"
        self.veth_a, self.veth_b = f"vds{sfx}a", f"vds{sfx}b"
        self.octet = random.randint(1, 254)
        self.ip_a, self.ip_b = f"10.78.{self.octet}.1", f"10.78.{self.octet}.2"
        self.bin_dir = tmp / "bin"
        self.key = tmp / "id_ed25519"
        self._created: list[str] = []

    # ------------------------------------------------------------------ setup / teardown
    def setup(self) -> None:
        for ns in (self.ns_a, self.ns_b):
            _sh("ip", "netns", "add", ns)
            self._created.append(ns)
        _sh("ip", "link", "add", self.veth_a, "type", "veth", "peer", "name", self.veth_b)
        try:
            for ns, veth, ip in ((self.ns_a, self.veth_a, self.ip_a), (self.ns_b, self.veth_b, self.ip_b)):
                _sh("ip", "link", "set", veth, "netns", ns)
                _sh("ip", "-n", ns, "link", "set", veth, "name", IFNAME)
                _sh("ip", "-n", ns, "addr", "add", f"{ip}/24", "dev", IFNAME)
                _sh("ip", "-n", ns, "link", "set", IFNAME, "up")
                _sh("ip", "-n", ns, "link", "set", "lo", "up")
        finally:
            _sh("ip", "link", "del", self.veth_a, check=False)  # only if it is still in the root namespace
        self._write_ssh_files()

    def teardown(self) -> None:
        for ns in self._created:
            for pid in _sh("ip", "netns", "pids", ns, check=False).stdout.split():
                with contextlib.suppress(ProcessLookupError, ValueError):
                    os.kill(int(pid), signal.SIGKILL)
            _sh("ip", "netns", "del", ns, check=False)
        self._created.clear()

    def _write_ssh_files(self) -> None:
        t = self.tmp
        _sh("ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(self.key))
        _sh("ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(t / "host_key"))
        (t / "authorized_keys").write_text((t / "id_ed25519.pub").read_text())
        known = "".join(f"{ip} {(t / 'host_key.pub').read_text()}" for ip in (self.ip_a, self.ip_b))
        (t / "known_hosts").write_text(known)
        (t / "ssh_config").write_text(textwrap.dedent(f"""\
            Host *
              User root
              IdentityFile {self.key}
              IdentitiesOnly yes
              UserKnownHostsFile {t / 'known_hosts'}
              StrictHostKeyChecking yes
              BatchMode yes
              LogLevel ERROR
            """))
        self.bin_dir.mkdir()
        wrapper = self.bin_dir / "ssh"
        wrapper.write_text(f"#!/bin/sh\nexec {shutil.which('ssh')} -F {t / 'ssh_config'} \"$@\"\n")
        wrapper.chmod(0o755)

    # ------------------------------------------------------------------ launch
    def launch_env(self, model: Path, **extra: str) -> dict[str, str]:
        venv_bin = str(Path(sys.executable).parent)
        env = {
            **os.environ,
            "PATH": f"{self.bin_dir}:{venv_bin}:{os.environ.get('PATH', '/usr/bin:/bin')}",
            "DS_HOSTS": f"{self.ip_a},{self.ip_b}",
            "DS_NET_IFNAME": IFNAME,
            "DS_MODEL": str(model),
            "DS_SERVED_MODEL_NAME": "tiny",
            "DS_HOST": self.ip_a,
            "DS_PORT": "8002",
            "DS_MASTER_PORT": "29500",
            "DS_SSH_KEY": str(self.key),
            "DS_COLLECTIVE_TIMEOUT_S": "6",
            "DS_HEARTBEAT_S": "1",
            "DS_LAUNCH_DEADLINE_S": "240",
            "DS_EXIT_GRACE_S": "5",
            "DS_DEAD_LINGER_S": "8",
            "DS_MAX_NUM_SEQS": "2",
            "DS_MAX_WAITING": "1",
            "TORCH_EXTENSIONS_DIR": str(self.tmp / "torch_extensions"),
            "HF_HUB_OFFLINE": "1",
            "PYTHONUNBUFFERED": "1",
        }
        env.pop("PYTHONPATH", None)
        env.update(extra)
        return env

    def launch(self, model: Path, *launch_args: str, name: str = "group", **extra_env: str) -> Group:
        """Start both sshds and the launcher in one fresh PID namespace; returns at once."""
        t = self.tmp
        python = sys.executable
        args = " ".join(launch_args)
        script = t / f"{name}.sh"
        script.write_text(textwrap.dedent(f"""\
            #!/bin/bash
            # PID 1 of the group's PID namespace: both "VMs'" sshds, then the launcher on VM A
            mkdir -p /run/sshd
            cd {ROOT}
            for vm in a:{self.ns_a}:{self.ip_a} b:{self.ns_b}:{self.ip_b}; do
              IFS=: read -r n ns ip <<< "$vm"
              ip netns exec "$ns" {python} -m app deepspeed sshd --listen "$ip" --port 22 \
                --authorized-keys {t / 'authorized_keys'} --host-key {t / 'host_key'} --state-dir {t}/sshd_"$n" &
            done
            for ip in {self.ip_a} {self.ip_b}; do
              ns={self.ns_a}; [ "$ip" = {self.ip_b} ] && ns={self.ns_b}
              for _ in $(seq 300); do
                ip netns exec "$ns" bash -c "exec 3<>/dev/tcp/$ip/22" 2>/dev/null && break
                sleep 0.1
              done
            done
            cd {ROOT}
            ip netns exec {self.ns_a} {python} -m app deepspeed launch --run-dir {t / name} {args}
            rc=$?
            echo "launcher exited with $rc"
            exit $rc
            """))
        log_path = t / f"{name}.log"
        with open(log_path, "wb") as log:
            proc = subprocess.Popen(
                ["unshare", "--pid", "--fork", "--kill-child", "--mount-proc", "bash", str(script)],
                cwd=ROOT, env=self.launch_env(model, **extra_env), stdout=log, stderr=subprocess.STDOUT,
            )
        return Group(proc, log_path, self)


@contextlib.contextmanager
def two_vms(tmp: Path) -> Iterator[TwoVMs]:
    vms = TwoVMs(tmp)
    try:
        vms.setup()
        yield vms
    finally:
        vms.teardown()


def wait_ready(group: Group, pool: NetnsPool, timeout: float = 240.0) -> None:
    """Poll rank 0's /readyz from inside namespace A until 200; fail at once if the group exits."""
    import httpx

    url = f"http://{group.vms.ip_a}:8002/readyz"
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if group.proc.poll() is not None:
            raise AssertionError(f"group exited with {group.proc.returncode}:\n{group.log()[-6000:]}")
        try:
            if pool.run(lambda: httpx.get(url, timeout=2, trust_env=False).status_code, timeout=10) == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise AssertionError(f"rank 0 not ready within {timeout}s:\n{group.log()[-6000:]}")


def greedy_reference(model: Path, prompts: list[str], chats: list[list[dict[str, str]]],
                     n_tokens: int) -> dict[str, str]:
    """Greedy output of the unsharded model in one process (plain transformers `generate`), exactly `n_tokens` long:
    prompt -> text for each prompt, `chat<i>` -> text for each chat (rendered with the model's chat template)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model)
    lm = AutoModelForCausalLM.from_pretrained(model, dtype=torch.float32).eval()
    out: dict[str, str] = {}

    def run(key: str, ids: list[int]) -> None:
        with torch.inference_mode():
            gen = lm.generate(torch.tensor([ids]), do_sample=False, max_new_tokens=n_tokens, min_new_tokens=n_tokens,
                              pad_token_id=tok.eos_token_id)
        out[key] = tok.decode(gen[0, len(ids):], skip_special_tokens=True)

    for p in prompts:
        run(p, tok(p)["input_ids"])
    for i, messages in enumerate(chats):
        text = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        run(f"chat{i}", tok(text, add_special_tokens=False)["input_ids"])
    return out
