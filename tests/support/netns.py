"""Network-namespace "VMs" for multi-node tests: a bridge, one namespace + veth per VM.

Names carry a random suffix and the subnet a random third octet (10.77.X.0/24),
so runs never collide with each other or with leftovers; `close()` kills every
process in the namespaces (by PID, from `ip netns pids`) and deletes them.
Run it inside `unshare --pid --fork --kill-child --mount-proc --net` (as the
Ray cluster test does) so that nothing can outlive the test even on a crash.
"""

from __future__ import annotations

import os
import random
import re
import signal
import subprocess
import sys
from pathlib import Path


def run_isolated(script: Path, env: dict[str, str], cwd: Path, timeout: float) -> None:
    """Run `script` (a scenario file's `__main__`) under `unshare --pid --fork --kill-child --mount-proc --net`.

    Nothing it starts (processes, namespaces, links) can outlive it; its output is printed, and a non-zero
    exit fails the calling test with the tails of stdout and stderr.
    """
    before = _netns_names()
    module = ".".join(script.resolve().relative_to(cwd.resolve()).with_suffix("").parts)  # run as `-m`: the
    # repository root (cwd) is then on sys.path, so the scenario imports `tests.support` as the suites do
    try:
        proc = subprocess.run(["unshare", "--pid", "--fork", "--kill-child", "--mount-proc", "--net", sys.executable,
                               "-m", module], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    finally:
        _remove_leftovers(before)
    print(proc.stdout[-6000:])
    assert proc.returncode == 0, f"scenario failed:\n{proc.stdout[-4000:]}\n{proc.stderr[-6000:]}"


NETNS_DIR = Path("/run/netns")
_OURS = re.compile(r"^[a-z]{2}[0-9a-f]{6}-\d+$")  # NetnsVMs names: prefix, random suffix, VM index


def _netns_names() -> set[str]:
    return set(os.listdir(NETNS_DIR)) if NETNS_DIR.is_dir() else set()


def _remove_leftovers(before: set[str]) -> None:
    """Namespaces a scenario made and could not delete: its private mount namespace holds the bind mounts
    `ip netns add` makes, so a scenario killed (timeout, crash) before `close()` leaves their empty files
    in /run/netns, and `ip netns list` keeps showing them. Only names of ours that are new are removed."""
    for name in sorted(_netns_names() - before):
        if _OURS.match(name):
            subprocess.run(["ip", "netns", "del", name], capture_output=True, timeout=30)
            (NETNS_DIR / name).unlink(missing_ok=True)


def _ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True, timeout=30)


class NetnsVMs:
    """`ifname`: the name of each VM's private NIC inside its namespace (default: the veth's own, unique name); one
    name on every VM, as cloud VMs of one image have (`ens5`), lets a setting such as DS_NET_IFNAME fit them all."""

    def __init__(self, count: int, prefix: str = "rt", ifname: str | None = None):
        self.ifname = ifname
        self.suffix = os.urandom(3).hex()
        self.octet = random.randint(1, 254)
        self.bridge = f"br{prefix}{self.suffix}"
        self.names = [f"{prefix}{self.suffix}-{i}" for i in range(count)]
        self.ips = [f"10.77.{self.octet}.{i + 1}" for i in range(count)]
        self._made: list[str] = []

    def __enter__(self) -> NetnsVMs:
        try:
            _ip("link", "add", self.bridge, "type", "bridge")
            _ip("link", "set", self.bridge, "up")
            for i, (ns, addr) in enumerate(zip(self.names, self.ips, strict=True)):
                host_end, ns_end = f"v{self.suffix}{i}", f"e{self.suffix}{i}"
                _ip("netns", "add", ns)
                self._made.append(ns)
                _ip("link", "add", host_end, "type", "veth", "peer", "name", ns_end)
                _ip("link", "set", ns_end, "netns", ns)
                _ip("link", "set", host_end, "master", self.bridge)
                _ip("link", "set", host_end, "up")
                if self.ifname:
                    _ip("-n", ns, "link", "set", ns_end, "name", self.ifname)
                    ns_end = self.ifname
                _ip("-n", ns, "addr", "add", f"{addr}/24", "dev", ns_end)
                _ip("-n", ns, "link", "set", ns_end, "up")
                _ip("-n", ns, "link", "set", "lo", "up")
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def popen(self, i: int, cmd: list[str], env: dict[str, str], log: Path, cwd: Path) -> subprocess.Popen[bytes]:
        with open(log, "ab") as out:
            return subprocess.Popen(["ip", "netns", "exec", self.names[i], *cmd], env=env, cwd=cwd, stdout=out,
                                    stderr=subprocess.STDOUT)

    def run(self, i: int, cmd: list[str], env: dict[str, str], cwd: Path,
            timeout: float = 120) -> subprocess.CompletedProcess[str]:
        return subprocess.run(["ip", "netns", "exec", self.names[i], *cmd], env=env, cwd=cwd, capture_output=True,
                              text=True, timeout=timeout)

    def pids(self, i: int) -> list[int]:
        out = subprocess.run(["ip", "netns", "pids", self.names[i]], capture_output=True, text=True, timeout=30)
        return [int(p) for p in out.stdout.split()]

    def kill_vm(self, i: int) -> int:
        """SIGKILL every process in VM `i` (a VM crash). Returns how many were killed."""
        pids = self.pids(i)
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        return len(pids)

    def close(self) -> None:
        for i in range(len(self._made)):
            self.kill_vm(i)
        for ns in self._made:
            subprocess.run(["ip", "netns", "del", ns], capture_output=True, timeout=30)
        self._made.clear()
        subprocess.run(["ip", "link", "del", self.bridge], capture_output=True, timeout=30)
