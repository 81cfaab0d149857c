"""`ray start` wrappers for the head and worker nodes, with fixed ports, token auth and deadlines.

Every port is fixed (so a firewall can be written), the object store is
bounded, the head advertises no GPU (it hosts no model replica), a worker
advertises its GPU tier as a custom resource that model configs request. Both
never hang: a worker first checks that the head's GCS port answers, and `ray
start` gets a deadline; with `--block` the node's `ray start` runs as our child
(killed with us via PDEATHSIG), we report readiness once Ray prints that the
runtime started, and its exit code becomes ours.
"""

from __future__ import annotations

import ctypes
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

READY_MARKER = "Ray runtime started"
LOOPBACK = ("127.0.0.1", "localhost")
# Where the head's Serve ingress (or proxy) listens unless SERVE_HOST says otherwise; nginx's primary upstream and
# `deploy-ray.sh test` read the same variable (one source for the address).
DEFAULT_SERVE_HOST = "127.0.0.1"


class ClusterError(RuntimeError):
    """A cluster command failed; the message says what to fix."""


@dataclass
class NodeConfig:
    node_ip: str
    gcs_port: int = 6379
    client_port: int = 10001
    dashboard: bool = False
    dashboard_port: int = 8265
    metrics_export_port: int | None = 8090
    object_manager_port: int | None = 8076
    node_manager_port: int | None = 8077
    min_worker_port: int | None = 10002
    max_worker_port: int | None = 10100
    object_store_mb: int = 1024
    num_cpus: int | None = None
    num_gpus: int | None = None
    resources: dict[str, float] = field(default_factory=dict)
    temp_dir: str | None = None
    dashboard_agent_port: int | None = None
    dashboard_agent_grpc_port: int | None = None
    runtime_env_agent_port: int | None = None


def ray_executable() -> str:
    local = Path(sys.executable).with_name("ray")
    found = str(local) if local.exists() else shutil.which("ray")
    if not found:
        raise ClusterError("the `ray` command is not installed: pip install 'ray[serve]==2.60.0'")
    return found


def find_auth_token() -> str | None:
    """RAY_AUTH_TOKEN from the environment, else the token local-up wrote under .run/."""
    token = os.environ.get("RAY_AUTH_TOKEN", "").strip()
    if token:
        return token
    saved = Path(".run/ray_auth_token")
    if saved.exists():
        return saved.read_text().strip() or None
    return None


def ray_env(node_ip: str | None = None, token: str | None = None) -> dict[str, str]:
    """Environment for every Ray process and driver: token auth on, loopback kept on loopback."""
    token = token or find_auth_token()
    if not token:
        raise ClusterError(
            "RAY_AUTH_TOKEN is not set; every node and driver needs the same token "
            "(make one with: python -c 'import secrets; print(secrets.token_hex(32))' and put it in .env)"
        )
    env = {**os.environ, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": token}
    env.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    if node_ip in LOOPBACK:
        # keeps Ray on 127.0.0.1 instead of the host's routable address (single-node local mode only)
        env["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
    return env


def apply_env(env: dict[str, str]) -> None:
    """Export the Ray variables into this process (for an in-process driver)."""
    for key in ("RAY_AUTH_MODE", "RAY_AUTH_TOKEN", "RAY_USAGE_STATS_ENABLED", "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"):
        if key in env:
            os.environ[key] = env[key]


def _common_args(cfg: NodeConfig) -> list[str]:
    args = [f"--node-ip-address={cfg.node_ip}", f"--object-store-memory={cfg.object_store_mb * 1024 * 1024}",
            "--disable-usage-stats"]
    for flag, value in (
        ("--metrics-export-port", cfg.metrics_export_port),
        ("--object-manager-port", cfg.object_manager_port),
        ("--node-manager-port", cfg.node_manager_port),
        ("--min-worker-port", cfg.min_worker_port),
        ("--max-worker-port", cfg.max_worker_port),
        ("--num-cpus", cfg.num_cpus),
        ("--num-gpus", cfg.num_gpus),
        ("--temp-dir", cfg.temp_dir),
        ("--dashboard-agent-listen-port", cfg.dashboard_agent_port),
        ("--dashboard-agent-grpc-port", cfg.dashboard_agent_grpc_port),
        ("--runtime-env-agent-port", cfg.runtime_env_agent_port),
    ):
        if value is not None:
            args.append(f"{flag}={value}")
    if cfg.resources:
        args.append(f"--resources={json.dumps(cfg.resources)}")
    return args


def head_command(cfg: NodeConfig, block: bool) -> list[str]:
    cmd = [ray_executable(), "start", "--head", f"--port={cfg.gcs_port}",
           f"--ray-client-server-port={cfg.client_port}", *_common_args(cfg)]
    if cfg.dashboard:
        cmd += ["--include-dashboard=true", "--dashboard-host=127.0.0.1", f"--dashboard-port={cfg.dashboard_port}"]
    else:
        cmd += ["--include-dashboard=false"]
    return [*cmd, "--block"] if block else cmd


def worker_command(cfg: NodeConfig, address: str, block: bool) -> list[str]:
    cmd = [ray_executable(), "start", f"--address={address}", *_common_args(cfg)]
    return [*cmd, "--block"] if block else cmd


def wait_tcp(host: str, port: int, timeout_s: float) -> None:
    """Return once host:port accepts a TCP connection; ClusterError after `timeout_s`."""
    deadline = time.monotonic() + timeout_s
    last: Exception | None = None
    while time.monotonic() < deadline:
        try:
            with socket.create_connection((host, port), timeout=min(2.0, timeout_s)):
                return
        except OSError as exc:
            last = exc
            time.sleep(0.5)
    raise ClusterError(
        f"cannot reach the Ray head at {host}:{port} within {timeout_s:g}s ({last}); check HEAD_IP, that the head "
        f"is running, and that the firewall allows this port from this VM"
    )


def _die_with_parent() -> None:  # pragma: no cover - runs in the child
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except OSError:
        pass


def spawn_child(cmd: list[str]) -> subprocess.Popen[bytes]:
    """A helper process that dies with us (PDEATHSIG), its output on ours."""
    return subprocess.Popen(cmd, preexec_fn=_die_with_parent)


def run_ray_start(cmd: list[str], env: dict[str, str], block: bool, timeout_s: float, what: str,
                  on_up: Callable[[], None] | None = None) -> int:
    """Run `ray start`; never wait longer than `timeout_s` for the node to come up; `on_up` once it is."""
    print(f"{what}: {' '.join(cmd)}", flush=True)
    if not block:
        try:
            proc = subprocess.run(cmd, env=env, timeout=timeout_s, check=False)
        except subprocess.TimeoutExpired:
            raise ClusterError(f"{what}: `ray start` did not finish within {timeout_s:g}s") from None
        if proc.returncode != 0:
            raise ClusterError(f"{what}: `ray start` failed with exit code {proc.returncode} (see its output above)")
        print(f"{what}: node is up", flush=True)
        return 0

    child = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                             bufsize=1, preexec_fn=_die_with_parent)
    started = threading.Event()

    def pump() -> None:
        assert child.stdout is not None
        for line in child.stdout:
            sys.stdout.write(line)
            sys.stdout.flush()
            if READY_MARKER in line:
                started.set()

    reader = threading.Thread(target=pump, daemon=True)
    reader.start()

    def forward(signum: int, _frame: object) -> None:
        if child.poll() is None:
            child.send_signal(signum)

    signal.signal(signal.SIGTERM, forward)
    signal.signal(signal.SIGINT, forward)
    deadline = time.monotonic() + timeout_s
    while not started.is_set():
        if child.poll() is not None:
            reader.join(5)
            raise ClusterError(f"{what}: `ray start` exited with code {child.returncode} before the node came up")
        if time.monotonic() > deadline:
            child.kill()
            child.wait(10)
            raise ClusterError(f"{what}: the node did not come up within {timeout_s:g}s")
        started.wait(0.2)
    print(f"{what}: node is up (ray start pid {child.pid})", flush=True)
    if on_up is not None:
        on_up()
    rc = child.wait()
    reader.join(5)
    return rc
