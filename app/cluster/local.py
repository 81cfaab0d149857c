"""No-Docker local mode: one Ray node on 127.0.0.1 carrying the worker tier, Serve on 127.0.0.1:SERVE_PORT.

`local-up` runs `python -m app cluster head --block` (the same entrypoint the
head container runs) as a background process on loopback with the worker
tier's resource, deploys the configs through the normal deploy path, records
its state under `.run/` and prints where to send requests. `local-down` stops
exactly that process tree by PID: SIGTERM to the node (Ray drains), then SIGKILL
to anything of ours still alive (found by our private temp dir and process group).
It also runs the batch service (`python -m app batch-server` on 127.0.0.1:BATCH_PORT, state in `.run/batch`,
its runner sending to Serve's port), as the compose head does behind nginx.
"""

from __future__ import annotations

import hashlib
import json
import os
import secrets
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from app.cluster.node import ClusterError, apply_env, ray_env

RUN_DIR = Path(".run")
STATE = RUN_DIR / "local.json"
TOKEN_FILE = RUN_DIR / "ray_auth_token"
TINY_DIR = Path(".cache/tiny-model")
TINY_CONFIG = Path(__file__).resolve().parents[1] / "configs" / "tiny.yaml"


@dataclass
class LocalState:
    pid: int
    temp_dir: str
    gcs_port: int
    serve_port: int
    metrics_export_port: int
    log: str
    models: list[str]
    proxy_port: int | None = None  # Serve's proxy when the ingress serves serve_port itself (direct ingress)
    batch_pid: int | None = None  # the batch service (OpenAI Batch API)
    batch_port: int | None = None


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:  # a zombie child counts as gone
        return Path(f"/proc/{pid}/stat").read_text().split(") ")[1][0] != "Z"
    except (OSError, IndexError):
        return True


def read_state() -> LocalState | None:
    if not STATE.exists():
        return None
    return LocalState(**json.loads(STATE.read_text()))


def _token() -> str:
    token = os.environ.get("RAY_AUTH_TOKEN", "").strip()
    if not token:
        token = TOKEN_FILE.read_text().strip() if TOKEN_FILE.exists() else secrets.token_hex(32)
    TOKEN_FILE.write_text(token + "\n")
    TOKEN_FILE.chmod(0o600)
    return token


def ensure_tiny_model() -> None:
    if (TINY_DIR / "config.json").exists():
        return
    print(f"building the tiny offline model in {TINY_DIR} ...", flush=True)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from app.models.tiny import build_tiny_model

    build_tiny_model(TINY_DIR)


def local_up(configs: list[Path], *, gcs_port: int, serve_port: int, proxy_port: int | None,
             metrics_export_port: int, tier: str, tier_slots: float, num_cpus: int | None, object_store_mb: int,
             wait_s: float, api_keys: list[str], batch_port: int | None = None, keys_file: str = "",
             usage_db: str = "") -> LocalState:
    """`proxy_port` None: Serve's proxy serves `serve_port`; else the ingress replica does (direct ingress)."""
    from app.cluster.deploy import DeployOptions, deploy
    from app.models.config import load_model_configs

    RUN_DIR.mkdir(exist_ok=True)
    old = read_state()
    if old and _alive(old.pid):
        raise ClusterError(f"a local cluster is already running (pid {old.pid}); stop it with: "
                           f"python -m app cluster local-down")
    if not configs:
        ensure_tiny_model()
        configs = [TINY_CONFIG]
    env = ray_env("127.0.0.1", _token())
    # local-down stops this one-node cluster at once: on SIGTERM Ray would first drain the node for 30 s, for a
    # node that never drains (Serve's controller lives on it) and no other node to move replicas to
    env.setdefault("RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S", "0")
    apply_env(env)  # before the configs are checked: that imports Ray, which reads these at import time
    parsed = load_model_configs(configs)  # config errors before starting anything
    # Ray's Unix socket paths must stay under 107 bytes: keep the session dir short
    tag = hashlib.sha1(str(Path.cwd()).encode()).hexdigest()[:8]
    temp_dir = str(Path(tempfile.gettempdir()) / f"llmkit-ray-{gcs_port}-{tag}")
    log_path = RUN_DIR / "head.log"
    cmd = [sys.executable, "-m", "app", "cluster", "head", "--block", "--node-ip", "127.0.0.1",
           "--gcs-port", str(gcs_port), "--metrics-export-port", str(metrics_export_port),
           "--any-ports", "--temp-dir", temp_dir, "--object-store-mb", str(object_store_mb),
           "--resources", json.dumps({tier: tier_slots}), "--serve-port", str(serve_port),
           "--direct-ingress" if proxy_port is not None else "--no-direct-ingress"]
    if num_cpus is not None:
        cmd += ["--num-cpus", str(num_cpus)]
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    state = LocalState(pid=proc.pid, temp_dir=temp_dir, gcs_port=gcs_port, serve_port=serve_port,
                       metrics_export_port=metrics_export_port, log=str(log_path),
                       models=[c.model_id for c in parsed], proxy_port=proxy_port)
    STATE.write_text(json.dumps(asdict(state), indent=2))
    deadline = time.monotonic() + 120
    while "node is up" not in log_path.read_text(errors="replace"):
        if proc.poll() is not None or time.monotonic() > deadline:
            tail = log_path.read_text(errors="replace")[-3000:]
            local_down(quiet=True)
            raise ClusterError(f"the local Ray node did not start; log {log_path}:\n{tail}")
        time.sleep(0.3)
    try:
        deploy(configs, DeployOptions(address=f"127.0.0.1:{gcs_port}", http_host="127.0.0.1", http_port=serve_port,
                                      proxy_port=proxy_port, wait_s=wait_s, api_keys=api_keys,
                                      keys_file=keys_file, usage_db=usage_db), configs=parsed)
        if batch_port:
            state.batch_pid, state.batch_port = _start_batch(batch_port, serve_port, api_keys), batch_port
            STATE.write_text(json.dumps(asdict(state), indent=2))
    except BaseException:
        local_down(quiet=True)
        raise
    return state


def _start_batch(port: int, serve_port: int, api_keys: list[str]) -> int:
    """Start the batch service on 127.0.0.1:`port` (its runner targets Serve) and wait for /healthz."""
    import httpx

    log_path = RUN_DIR / "batch.log"
    env = {**os.environ, "API_KEYS": ",".join(api_keys)}
    cmd = [sys.executable, "-m", "app", "batch-server", "--host", "127.0.0.1", "--port", str(port),
           "--data-dir", str(RUN_DIR / "batch"), "--target-url", f"http://127.0.0.1:{serve_port}"]
    with open(log_path, "ab") as log:
        proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    deadline = time.monotonic() + 60
    while True:
        try:
            if httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=2).status_code == 200:
                return proc.pid
        except httpx.TransportError:
            pass
        if proc.poll() is not None or time.monotonic() > deadline:
            raise ClusterError(f"the batch service did not start; log {log_path}:\n"
                               f"{log_path.read_text(errors='replace')[-2000:]}")
        time.sleep(0.3)


def _our_pids(temp_dir: str, pgid: int) -> list[int]:
    """Processes of this local cluster: in its process group or naming its private temp dir."""
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            in_group = os.getpgid(int(entry.name)) == pgid
        except (OSError, ProcessLookupError):
            continue
        if in_group or temp_dir in cmdline:
            pids.append(int(entry.name))
    return pids


def local_down(quiet: bool = False, timeout_s: float = 45.0) -> bool:
    """Stop the local cluster started by local-up. Returns False when none was recorded."""
    state = read_state()
    if state is None:
        if not quiet:
            print("no local cluster recorded in .run/local.json")
        return False
    if state.batch_pid and _alive(state.batch_pid):
        os.kill(state.batch_pid, signal.SIGTERM)  # its lines in flight are resent by the next local-up
    if _alive(state.pid):
        os.kill(state.pid, signal.SIGTERM)  # the head wrapper forwards it to `ray start --block`
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline and _our_pids(state.temp_dir, state.pid):
        time.sleep(0.5)
    for pid in [*_our_pids(state.temp_dir, state.pid), *([state.batch_pid] if state.batch_pid else [])]:
        if not _alive(pid):
            continue
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    STATE.unlink(missing_ok=True)
    if not quiet:
        print(f"local cluster stopped (pid {state.pid})")
    return True
