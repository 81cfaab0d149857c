"""The README recipe end to end: batch through an SSH tunnel (`ssh -N -L ...`) with failover between two
forwarded ports when the server behind the first one dies mid-batch.

A private sshd (own config, host key and authorized key under the test's temp dir) listens on 127.0.0.1;
`ssh -N -L` forwards two local ports to two real tiny-model servers. Behind a tunnel a dead server does not
refuse the connection: ssh accepts it locally and closes it when the remote connect fails, which the client
must treat as a transient error and fail over.
"""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import sys
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.support.env import ROOT, need, need_binary, need_root
from tests.support.servers import free_port, stop_process, wait_until

SSHD = shutil.which("sshd") or "/usr/sbin/sshd"


@pytest.fixture
def sshd(tmp_path: Path) -> Iterator[dict[str, Any]]:
    need_root()
    need(Path(SSHD).exists(), "needs sshd (openssh-server, installed by tests/run.sh)")
    need_binary("ssh", "ssh-keygen")
    d = tmp_path / "ssh"
    d.mkdir()
    for name in ("host_key", "id_ed25519"):
        subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(d / name)], check=True)
    (d / "authorized_keys").write_text((d / "id_ed25519.pub").read_text())
    port = free_port()
    (d / "sshd_config").write_text(
        f"Port {port}\nListenAddress 127.0.0.1\nHostKey {d / 'host_key'}\nPidFile {d / 'sshd.pid'}\n"
        f"AuthorizedKeysFile {d / 'authorized_keys'}\nStrictModes no\nUsePAM no\nPasswordAuthentication no\n"
        "KbdInteractiveAuthentication no\nPermitRootLogin prohibit-password\nAllowTcpForwarding yes\n"
        "PermitOpen any\n")
    (d / "known_hosts").write_text(f"[127.0.0.1]:{port} {(d / 'host_key.pub').read_text()}")
    Path("/run/sshd").mkdir(exist_ok=True)  # privilege separation directory
    proc = subprocess.Popen([SSHD, "-D", "-e", "-f", str(d / "sshd_config")], stdout=subprocess.DEVNULL,
                            stderr=open(d / "sshd.log", "wb"))
    try:
        wait_until(lambda: proc.poll() is None and b"listening" in (d / "sshd.log").read_bytes(), 30, 0.1,
                   "sshd listening")
        yield {"dir": d, "port": port}
    finally:
        stop_process(proc, timeout=10)


def test_batch_through_ssh_tunnel_with_failover(sshd: dict[str, Any], start_server: Any, tmp_path: Path) -> None:
    front, second = start_server(), start_server()  # stand-ins for nginx :8080 and Ray Serve :8000 on the head
    d = sshd["dir"]
    local_front, local_second = free_port(), free_port()
    tunnel = subprocess.Popen(
        ["ssh", "-N", "-p", str(sshd["port"]), "-i", str(d / "id_ed25519"), "-o", "IdentitiesOnly=yes",
         "-o", f"UserKnownHostsFile={d / 'known_hosts'}", "-o", "StrictHostKeyChecking=yes", "-o", "BatchMode=yes",
         "-o", "ExitOnForwardFailure=yes", "-o", "LogLevel=ERROR",
         "-L", f"{local_front}:127.0.0.1:{front.port}", "-L", f"{local_second}:127.0.0.1:{second.port}",
         "root@127.0.0.1"],
        stdout=subprocess.DEVNULL, stderr=open(tmp_path / "ssh.log", "wb"))
    try:
        ep_front, ep_second = f"http://127.0.0.1:{local_front}", f"http://127.0.0.1:{local_second}"

        def tunnel_up() -> bool:
            if tunnel.poll() is not None:
                raise RuntimeError(f"ssh exited: {(tmp_path / 'ssh.log').read_text()}")
            return all(httpx.get(u + "/readyz", timeout=2).status_code == 200 for u in (ep_front, ep_second))

        wait_until(tunnel_up, 60, 0.2, "both tunnels forwarding")
        rows = [{"id": f"t{i}", "messages": [{"role": "user", "content": f"tunnel {i}"}], "max_tokens": 48,
                 "min_tokens": 48, "ignore_eos": True} for i in range(40)]
        inp = tmp_path / "in.jsonl"
        inp.write_text("".join(json.dumps(r) + "\n" for r in rows))
        out = tmp_path / "out.jsonl"
        proc = subprocess.Popen(
            [sys.executable, "-m", "app", "batch", str(inp), "-o", str(out), "--endpoint", ep_front,
             "--endpoint", ep_second, "--concurrency", "4", "--stream", "--no-progress", "--backoff", "0.05",
             "--cooldown", "0.5"], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        try:
            wait_until(lambda: out.exists() and out.read_text().count("\n") >= 8, 120, 0.05, "first results")
            front.stop(signal.SIGKILL)  # the server behind the first tunnel dies; the tunnel itself stays up
            stdout, _ = proc.communicate(timeout=240)
        finally:
            if proc.poll() is None:
                proc.kill()
        assert proc.returncode == 0, stdout
        recs = [json.loads(line) for line in out.read_text().splitlines()]
        ids = Counter(r["id"] for r in recs)
        assert set(ids) == {r["id"] for r in rows} and max(ids.values()) == 1
        assert all(r["ok"] and r["ttft_s"] > 0 for r in recs)
        used = Counter(r["endpoint"] for r in recs)
        assert used[ep_front] >= 1 and used[ep_second] >= 1 and recs[-1]["endpoint"] == ep_second
    finally:
        stop_process(tunnel, timeout=10)
