"""Deploy the Serve application (ingress + one LLM server per model config) onto a running cluster.

A short-lived driver: validates the configs first (errors name file and key),
connects with the cluster token, starts Serve's HTTP proxy on the head only,
submits the app without blocking, then polls `serve.status()` until every
deployment is RUNNING, failing with Serve's message on DEPLOY_FAILED or after
the deadline. The app keeps running after the driver exits.

With direct ingress (the default, `proxy_port` set) the ingress replica, pinned
to the head, serves `http_port` itself and Serve's proxy moves to `proxy_port`;
the head's Ray processes carry the port (`cluster head` exports
`compat.serve_direct_ingress_env`), so once RUNNING the driver checks that the
ingress answers there and otherwise names the mismatch.
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from app import compat
from app.cluster.node import LOOPBACK, ClusterError, apply_env, ray_env, wait_tcp
from app.models.config import ModelConfig, load_model_configs
from app.ray_serve.ingress import APP_NAME


@dataclass
class DeployOptions:
    address: str  # HEAD_IP:GCS_PORT
    http_host: str
    http_port: int = 8000
    proxy_port: int | None = None  # None: Serve's proxy serves http_port; else the ingress does (direct ingress)
    request_timeout_s: float = 300.0
    wait_s: float = 900.0
    api_keys: list[str] | None = None
    keys_file: str = ""  # KEYS_FILE: read by the ingress replica on the head
    usage_db: str = ""  # LLM_USAGE_DB: the ingress's per-key usage (the head-state volume in compose)
    max_body_bytes: int = 4 * 1024 * 1024
    expected_workers: int = 0


def config_dir() -> Path:
    """Folder relative model config paths are looked up in (the compose kit mounts MODEL_CONFIG_DIR there)."""
    return Path(os.environ.get("MODEL_CONFIG_DIR") or "app/configs")


def resolve_configs(paths: list[Path] | list[str]) -> list[Path]:
    """Relative paths: MODEL_CONFIG_DIR first, then the current folder; a missing file names both."""
    out = []
    for raw in paths:
        p = Path(raw)
        if p.is_absolute():
            out.append(p)
            continue
        candidates = [config_dir() / p, p]
        found = next((c for c in candidates if c.is_file()), None)
        if found is None:
            raise ClusterError(f"model config {str(raw)!r} not found (looked in {config_dir()}/ and the current "
                               f"folder {Path.cwd()}); put it in MODEL_CONFIG_DIR")
        out.append(found)
    return out


def wait_for_workers(expected: int, wait_s: float) -> None:
    """Block until `expected` worker nodes (non-head) are alive; ClusterError after `wait_s`."""
    import ray

    deadline = time.monotonic() + wait_s
    last = -1
    while True:
        alive = [n for n in ray.nodes() if n.get("Alive") and "node:__internal_head__" not in n.get("Resources", {})]
        if len(alive) != last:
            print(f"  {len(alive)} of {expected} expected worker node(s) alive", flush=True)
            last = len(alive)
        if len(alive) >= expected:
            return
        if time.monotonic() > deadline:
            raise ClusterError(f"only {len(alive)} of RAY_EXPECTED_WORKERS={expected} worker nodes joined within "
                               f"{wait_s:g}s; start `./deploy-ray.sh all` on the missing worker VMs")
        time.sleep(1.0)


def connect(address: str, timeout_s: float = 60.0) -> None:
    """Connect this process to the cluster as a driver (token from RAY_AUTH_TOKEN)."""
    host, _, port = address.rpartition(":")
    if not host or not port.isdigit():
        raise ClusterError(f"the cluster address must be HEAD_IP:PORT, got {address!r}")
    apply_env(ray_env(host))  # before `import ray` (see export_ray_env)
    import ray

    if host in LOOPBACK:
        compat.ray_keep_loopback()  # else Ray rewrites 127.0.0.1 to the host's routable address
    if ray.is_initialized():
        return
    wait_tcp(host, int(port), timeout_s)  # ray.init would wait ~forever on an unreachable head
    try:
        ray.init(address=address, namespace="serve", logging_level=logging.WARNING, log_to_driver=False)
    except Exception as exc:
        raise ClusterError(f"cannot connect to the Ray cluster at {address}: {type(exc).__name__}: {exc}") from None


def _summary(status: Any) -> str:
    app = status.applications.get(APP_NAME)
    if app is None:
        return "application not created yet"
    parts = [f"app {app.status.value}"]
    for name, dep in sorted(app.deployments.items()):
        states = ", ".join(f"{k}={v}" for k, v in sorted(dep.replica_states.items())) or "no replicas"
        parts.append(f"{name}: {dep.status.value} ({states})")
    return "; ".join(parts)


def export_ray_env(address: str) -> None:
    """Put the token/loopback variables into this process before anything imports Ray (it reads them at import;
    validating configs imports Ray Serve's schema). Without a token nothing is exported: `connect` says so."""
    host = address.rpartition(":")[0]
    try:
        apply_env(ray_env(host))
    except ClusterError:
        pass


def deploy(config_paths: list[Path] | list[str], opts: DeployOptions, configs: list[ModelConfig] | None = None) -> None:
    if configs is None:
        export_ray_env(opts.address)
        configs = load_model_configs(config_paths)  # ConfigError before touching the cluster
    connect(opts.address)
    from ray import serve

    if opts.expected_workers > 0:
        wait_for_workers(opts.expected_workers, opts.wait_s)

    from app.ray_serve.application import application, builder, http_options

    serve.start(http_options={**http_options(opts.http_host, opts.proxy_port or opts.http_port,
                                             opts.request_timeout_s), "location": "HeadOnly"})
    # the same entry a RayService's serveConfigV2 carries (app.k8s): Serve's builder, called here in the driver
    entry = application(config_paths, api_keys=opts.api_keys or [], max_body_bytes=opts.max_body_bytes,
                        keys_file=opts.keys_file, usage_db=opts.usage_db)
    compat.serve_run_nonblocking(builder(entry["args"]), name=entry["name"], route_prefix=entry["route_prefix"])
    print(f"deploying {', '.join(c.model_id for c in configs)} ...", flush=True)
    deadline = time.monotonic() + opts.wait_s
    last = ""
    while True:
        st = serve.status()
        line = _summary(st)
        if line != last:
            print(f"  {line}", flush=True)
            last = line
        app = st.applications.get(APP_NAME)
        if app is not None and app.status.value == "RUNNING":
            break
        if app is not None and app.status.value in ("DEPLOY_FAILED", "UNHEALTHY"):
            raise ClusterError(f"deployment failed: {app.message or line}")
        if time.monotonic() > deadline:
            raise ClusterError(f"the application was not RUNNING within {opts.wait_s:g}s: {line}")
        time.sleep(1.0)
    if opts.proxy_port is not None:
        wait_ingress(opts.http_host, opts.http_port, min(60.0, opts.wait_s))
    print(f"serving {', '.join(c.model_id for c in configs)} at http://{opts.http_host}:{opts.http_port}/v1",
          flush=True)


def wait_ingress(host: str, port: int, timeout_s: float) -> None:
    """Return once the ingress replica lists the app's route on host:port (the head's health check, which the
    ingress itself answers under direct ingress); ClusterError naming the likely cause after `timeout_s`."""
    from app.cluster.health import serve_routes_problem

    deadline = time.monotonic() + timeout_s
    problem = serve_routes_problem(host, port)
    while problem and time.monotonic() < deadline:
        time.sleep(0.5)
        problem = serve_routes_problem(host, port)
    if problem:
        raise ClusterError(f"the app is RUNNING but {problem}: the head's Ray processes get the ingress port at "
                           f"start, so start the head with the same SERVE_PORT={port} and SERVE_DIRECT_INGRESS as "
                           "this deploy (one .env), or deploy with --no-direct-ingress")
