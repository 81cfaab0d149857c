"""`python -m app cluster ...`: head, worker, deploy, status, local-up, local-down.

Options fall back to the `.env` names the compose kit documents (HEAD_IP,
NODE_IP, RAY_*_PORT, WORKER_TIER, NUM_GPUS, MODEL_CONFIGS, SERVE_PORT, ...).
Ray is imported inside the commands only, so `python -m app --help` works
without it.
"""

from __future__ import annotations

import json
import os
import socket
import sys
from pathlib import Path
from typing import Annotated

import typer

from app import compat
from app.cluster.node import DEFAULT_SERVE_HOST
from app.console import fail

cluster = typer.Typer(help="Ray cluster: head/worker nodes, deploy the Serve app, status, local mode.",
                      no_args_is_help=True)

Port = int


NodeIp = Annotated[str, typer.Option("--node-ip", envvar="NODE_IP", help="This VM's private address.")]
GcsPort = Annotated[Port, typer.Option(envvar="RAY_GCS_PORT", help="Head GCS port.")]
MetricsPort = Annotated[Port, typer.Option(envvar="RAY_METRICS_EXPORT_PORT", help="Ray metrics export port.")]
ObjMgrPort = Annotated[Port, typer.Option(envvar="RAY_OBJECT_MANAGER_PORT")]
NodeMgrPort = Annotated[Port, typer.Option(envvar="RAY_NODE_MANAGER_PORT")]
MinWorkerPort = Annotated[Port, typer.Option(envvar="RAY_MIN_WORKER_PORT")]
MaxWorkerPort = Annotated[Port, typer.Option(envvar="RAY_MAX_WORKER_PORT")]
ObjectStoreMb = Annotated[int, typer.Option(envvar="RAY_OBJECT_STORE_MB", help="Object store size per node (MB).")]
TempDir = Annotated[str | None, typer.Option(envvar="RAY_TEMP_DIR", help="Ray's temp/session dir for this node.")]
AgentPort = Annotated[Port, typer.Option(envvar="RAY_DASHBOARD_AGENT_LISTEN_PORT", help="Dashboard agent HTTP.")]
AgentGrpcPort = Annotated[Port, typer.Option(envvar="RAY_DASHBOARD_AGENT_GRPC_PORT", help="Dashboard agent gRPC.")]
RuntimeEnvAgentPort = Annotated[Port, typer.Option(envvar="RAY_RUNTIME_ENV_AGENT_PORT", help="Runtime env agent.")]
Block = Annotated[bool, typer.Option("--block/--no-block", help="Stay in the foreground (containers).")]
ServePort = Annotated[Port, typer.Option(envvar="SERVE_PORT", help="Where the Serve app answers HTTP on the head.")]
DirectIngress = Annotated[bool, typer.Option(
    envvar="SERVE_DIRECT_INGRESS", help="The ingress replica serves SERVE_PORT itself (Serve's direct ingress, no "
    "proxy hop); --no-direct-ingress puts Serve's proxy there. The head and `deploy` must agree (one .env).")]
ProxyPort = Annotated[Port, typer.Option(envvar="SERVE_PROXY_PORT", help="Serve's proxy on the head when the "
                                         "ingress serves SERVE_PORT itself (Serve always starts one).")]
Timeout = Annotated[float, typer.Option(help="Seconds to wait for the node to come up.")]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run(fn: object, *args: object, **kwargs: object) -> object:
    from app.cluster.node import ClusterError
    from app.models.config import ConfigError

    try:
        return fn(*args, **kwargs)  # type: ignore[operator]
    except (ClusterError, ConfigError) as exc:
        raise fail(str(exc), code=1) from None


@cluster.command()
def head(
    node_ip: NodeIp = "127.0.0.1",
    gcs_port: GcsPort = 6379,
    client_port: Annotated[Port, typer.Option(envvar="RAY_CLIENT_PORT")] = 10001,
    dashboard: Annotated[bool, typer.Option(help="Start the dashboard (bound to 127.0.0.1).")] = False,
    dashboard_port: Annotated[Port, typer.Option(envvar="RAY_DASHBOARD_PORT")] = 8265,
    metrics_export_port: MetricsPort = 8090,
    object_manager_port: ObjMgrPort = 8076,
    node_manager_port: NodeMgrPort = 8077,
    min_worker_port: MinWorkerPort = 10002,
    max_worker_port: MaxWorkerPort = 10100,
    object_store_mb: ObjectStoreMb = 1024,
    num_cpus: Annotated[int | None, typer.Option(help="CPUs the head advertises (default: detected).")] = None,
    resources: Annotated[str, typer.Option(help="Extra custom resources as JSON (the head has none).")] = "{}",
    any_ports: Annotated[bool, typer.Option(help="Let Ray pick the object/node manager, client and worker ports.")]
    = False,
    agent_port: AgentPort = 52365,
    agent_grpc_port: AgentGrpcPort = 8078,
    runtime_env_agent_port: RuntimeEnvAgentPort = 8079,
    temp_dir: TempDir = None,
    serve_port: ServePort = 8000,
    direct_ingress: DirectIngress = True,
    block: Block = False,
    redeploy: Annotated[bool, typer.Option(help="With --block: once up, redeploy the Serve app `cluster deploy` "
                                           "last applied (its record in LLM_STATE_DIR).")] = True,
    timeout: Timeout = 120.0,
) -> None:
    """Start the Ray head: no GPU advertised, no model replica; GCS, metrics and ports fixed."""
    from app.cluster import record
    from app.cluster.node import NodeConfig, head_command, ray_env, run_ray_start, spawn_child

    cfg = NodeConfig(
        node_ip=node_ip, gcs_port=gcs_port, client_port=_free_port() if any_ports else client_port,
        dashboard=dashboard, dashboard_port=dashboard_port, metrics_export_port=metrics_export_port,
        object_manager_port=None if any_ports else object_manager_port,
        node_manager_port=None if any_ports else node_manager_port,
        min_worker_port=None if any_ports else min_worker_port, max_worker_port=None if any_ports else max_worker_port,
        object_store_mb=object_store_mb, num_cpus=num_cpus, num_gpus=0, resources=json.loads(resources),
        temp_dir=temp_dir, dashboard_agent_port=_free_port() if any_ports else agent_port,
        dashboard_agent_grpc_port=_free_port() if any_ports else agent_grpc_port,
        runtime_env_agent_port=_free_port() if any_ports else runtime_env_agent_port,
    )

    def redeploy_recorded() -> None:
        rec = record.load()
        if rec is None or not redeploy:
            return
        print(f"head: redeploying the recorded Serve app ({', '.join(rec.configs)})", flush=True)
        spawn_child([sys.executable, "-m", "app", "cluster", "deploy", "--from-record"])

    def start() -> int:
        env = ray_env(node_ip)
        if direct_ingress:  # the controller on this node allocates the ingress replica's port
            env.update(compat.serve_direct_ingress_env(serve_port))
        # detect dead worker nodes in ~6 s instead of ~30 s (override with the same variables)
        env.setdefault("RAY_health_check_period_ms", "2000")
        env.setdefault("RAY_health_check_timeout_ms", "2000")
        env.setdefault("RAY_health_check_failure_threshold", "3")
        return run_ray_start(head_command(cfg, block), env, block, timeout, f"head {node_ip}:{gcs_port}",
                             on_up=redeploy_recorded)

    rc = _run(start)
    raise typer.Exit(int(rc or 0))  # type: ignore[call-overload]


@cluster.command()
def worker(
    address: Annotated[str, typer.Option(help="HEAD_IP:GCS_PORT of the head.")] = "",
    node_ip: NodeIp = "",
    metrics_export_port: MetricsPort = 8090,
    object_manager_port: ObjMgrPort = 8076,
    node_manager_port: NodeMgrPort = 8077,
    min_worker_port: MinWorkerPort = 10002,
    max_worker_port: MaxWorkerPort = 10100,
    object_store_mb: ObjectStoreMb = 1024,
    num_gpus: Annotated[int | None, typer.Option(envvar="NUM_GPUS", help="GPUs to advertise (default: detect).")]
    = None,
    num_cpus: Annotated[int | None, typer.Option(help="CPUs to advertise (default: detected).")] = None,
    worker_tier: Annotated[str, typer.Option(envvar="WORKER_TIER", help="Custom resource naming the GPU tier.")]
    = "small-model-workers",
    tier_slots: Annotated[float | None, typer.Option(envvar="WORKER_TIER_SLOTS",
                                                     help="Amount of the tier resource (default: NUM_GPUS or 1).")]
    = None,
    agent_port: AgentPort = 52365,
    agent_grpc_port: AgentGrpcPort = 8078,
    runtime_env_agent_port: RuntimeEnvAgentPort = 8079,
    temp_dir: TempDir = None,
    block: Block = False,
    timeout: Timeout = 120.0,
) -> None:
    """Join a worker node to the head; advertises its GPUs and its tier resource."""
    from app.cluster.node import ClusterError, NodeConfig, ray_env, run_ray_start, wait_tcp, worker_command

    if not address:
        head_ip = os.environ.get("HEAD_IP", "")
        if not head_ip:
            raise fail("no head address: pass --address HEAD_IP:6379 (or set HEAD_IP)")
        address = f"{head_ip}:{os.environ.get('RAY_GCS_PORT', '6379')}"
    if not node_ip:
        raise fail("no node address: pass --node-ip (or set NODE_IP) to this VM's private address")
    slots = tier_slots if tier_slots is not None else float(num_gpus or 1)
    cfg = NodeConfig(
        node_ip=node_ip, metrics_export_port=metrics_export_port, object_manager_port=object_manager_port,
        node_manager_port=node_manager_port, min_worker_port=min_worker_port, max_worker_port=max_worker_port,
        object_store_mb=object_store_mb, num_cpus=num_cpus, num_gpus=num_gpus, resources={worker_tier: slots},
        temp_dir=temp_dir, dashboard_agent_port=agent_port, dashboard_agent_grpc_port=agent_grpc_port,
        runtime_env_agent_port=runtime_env_agent_port,
    )

    def start() -> int:
        host, _, port = address.rpartition(":")
        if not host or not port.isdigit():
            raise ClusterError(f"--address must be HEAD_IP:PORT, got {address!r}")
        env = ray_env(node_ip)
        wait_tcp(host, int(port), timeout)
        return run_ray_start(worker_command(cfg, address, block), env, block, timeout, f"worker {node_ip}")

    rc = _run(start)
    raise typer.Exit(int(rc or 0))  # type: ignore[call-overload]


def _default_address() -> str:
    return f"{os.environ.get('HEAD_IP', '127.0.0.1')}:{os.environ.get('RAY_GCS_PORT', '6379')}"


@cluster.command()
def deploy(
    configs: Annotated[list[Path] | None, typer.Argument(help="Model config YAML files (default: MODEL_CONFIGS).")]
    = None,
    address: Annotated[str, typer.Option(help="HEAD_IP:GCS_PORT (default from HEAD_IP, RAY_GCS_PORT).")] = "",
    http_host: Annotated[str, typer.Option(envvar="SERVE_HOST", help="Where Ray Serve binds (ingress and proxy).")]
    = DEFAULT_SERVE_HOST,
    serve_port: ServePort = 8000,
    proxy_port: ProxyPort = 8004,
    direct_ingress: DirectIngress = True,
    request_timeout: Annotated[float, typer.Option(envvar="SERVE_REQUEST_TIMEOUT_S", help="Per-request limit (s).")]
    = 300.0,
    wait: Annotated[float, typer.Option(help="Seconds to wait for the workers and for every deployment.")] = 900.0,
    expected_workers: Annotated[int, typer.Option(envvar="RAY_EXPECTED_WORKERS", help="Wait until this many "
                                                  "worker nodes are alive before deploying (0: do not wait).")] = 0,
    from_record: Annotated[bool, typer.Option(help="Redeploy what the last deploy applied (LLM_STATE_DIR).")]
    = False,
) -> None:
    """Deploy the ingress + one LLM server deployment per model config, and wait until RUNNING.

    Relative config paths are looked up in MODEL_CONFIG_DIR (default app/configs), then in the current folder."""
    from app.cluster import record
    from app.cluster.deploy import DeployOptions, resolve_configs
    from app.cluster.deploy import deploy as do_deploy
    from app.models.config import DEFAULT_CONFIG, split_paths
    from app.settings import Settings

    rec = record.load() if from_record else None
    if from_record and rec is None:
        raise fail(f"no deploy record in LLM_STATE_DIR={record.state_dir() or ''} (run `cluster deploy` once)",
                   code=1)
    if rec is not None:
        paths, http_host, serve_port, request_timeout = ([Path(p) for p in rec.configs], rec.http_host,
                                                         rec.http_port, rec.request_timeout_s)
    else:
        raw = list(configs or []) or split_paths(os.environ.get("MODEL_CONFIGS", DEFAULT_CONFIG))
        paths = _run(resolve_configs, raw)  # type: ignore[assignment]
    settings = Settings()
    opts = DeployOptions(address=address or _default_address(), http_host=http_host, http_port=serve_port,
                         proxy_port=proxy_port if direct_ingress else None, request_timeout_s=request_timeout,
                         wait_s=wait, api_keys=settings.api_key_list, keys_file=settings.keys_file,
                         usage_db=settings.usage_db,
                         max_body_bytes=settings.max_body_bytes, expected_workers=expected_workers)
    _run(do_deploy, paths, opts)
    where = record.save(record.DeployRecord(configs=[str(p.resolve()) for p in paths], http_host=http_host,
                                            http_port=serve_port, request_timeout_s=request_timeout))
    if where is not None:
        typer.echo(f"deploy record: {where} (a restarted head redeploys it)")


@cluster.command()
def health(
    node_ip: NodeIp = "127.0.0.1",
    gcs_port: GcsPort = 6379,
    serve_host: Annotated[str, typer.Option(envvar="SERVE_HOST")] = DEFAULT_SERVE_HOST,
    serve_port: Annotated[Port, typer.Option(envvar="SERVE_PORT")] = 8000,
) -> None:
    """Healthcheck of the head: GCS answers and, once an app was deployed, Serve serves it (exit 1 if not)."""
    from app.cluster.health import check

    problem = check(node_ip, gcs_port, serve_host, serve_port)
    if problem:
        raise fail(problem, code=1)
    typer.echo("healthy")


@cluster.command()
def status(
    address: Annotated[str, typer.Option(help="HEAD_IP:GCS_PORT (default from HEAD_IP, RAY_GCS_PORT).")] = "",
    as_json: Annotated[bool, typer.Option("--json", help="Machine-readable output.")] = False,
) -> None:
    """Nodes, deployments, replicas (and the node each runs on) and the engine each replica runs."""
    from app.cluster.deploy import connect
    from app.cluster.status import collect, render

    def go() -> None:
        connect(address or _default_address())
        data = collect()
        typer.echo(json.dumps(data, indent=2) if as_json else render(data))

    _run(go)


@cluster.command("local-up")
def local_up(
    config: Annotated[list[Path] | None, typer.Option("--config", help="Model config YAML; repeatable "
                                                      "(default: the tiny offline model).")] = None,
    gcs_port: GcsPort = 6379,
    serve_port: ServePort = 8000,
    proxy_port: Annotated[Port | None, typer.Option(envvar="SERVE_PROXY_PORT", help="Serve's proxy (default: a "
                                                    "free port; with --no-direct-ingress it is SERVE_PORT).")]
    = None,
    direct_ingress: DirectIngress = True,
    metrics_export_port: MetricsPort = 8090,
    worker_tier: Annotated[str, typer.Option(envvar="WORKER_TIER")] = "small-model-workers",
    tier_slots: Annotated[float, typer.Option(help="Tier resource the local node carries.")] = 4.0,
    num_cpus: Annotated[int | None, typer.Option(help="CPUs the node advertises (default: detected).")] = None,
    object_store_mb: Annotated[int, typer.Option(help="Object store size (MB).")] = 256,
    wait: Annotated[float, typer.Option(help="Seconds to wait for the models to be RUNNING.")] = 600.0,
    batch_port: Annotated[int, typer.Option(envvar="BATCH_PORT", min=0, max=65535, help="The batch service "
                                            "(OpenAI Batch API) on 127.0.0.1; 0: none.")] = 8005,
) -> None:
    """Local Ray cluster on 127.0.0.1 (one node carrying the worker tier) serving the models via Ray Serve."""
    from app.cluster import local
    from app.settings import Settings

    settings = Settings()
    state = _run(local.local_up, list(config or []), gcs_port=gcs_port, serve_port=serve_port,
                 proxy_port=(proxy_port or _free_port()) if direct_ingress else None,
                 metrics_export_port=metrics_export_port, tier=worker_tier, tier_slots=tier_slots,
                 num_cpus=num_cpus, object_store_mb=object_store_mb, wait_s=wait, api_keys=settings.api_key_list,
                 batch_port=batch_port or None, keys_file=settings.keys_file, usage_db=settings.usage_db)
    model = state.models[0]  # type: ignore[attr-defined]
    auth = " -H 'Authorization: Bearer $API_KEY'" if settings.api_key_list else ""
    typer.echo(
        f"\nRay Serve is up on 127.0.0.1 (models: {', '.join(state.models)}). Send requests to "  # type: ignore[attr-defined]
        f"http://127.0.0.1:{serve_port}/v1 :\n"
        f"  curl http://127.0.0.1:{serve_port}/v1/chat/completions -H 'Content-Type: application/json'{auth} "
        f"-d '{{\"model\": \"{model}\", \"messages\": [{{\"role\": \"user\", \"content\": \"Hello\"}}]}}'\n"
        + (f"Batch jobs (OpenAI Batch API): python -m app batch submit FILE --wait -o OUT --endpoint "
           f"http://127.0.0.1:{batch_port}\n" if batch_port else "")
        + f"Status: python -m app cluster status --address 127.0.0.1:{gcs_port}\n"
        f"Stop:   python -m app cluster local-down"
    )
    sys.stdout.flush()


@cluster.command("local-down")
def local_down() -> None:
    """Stop the local cluster started by local-up (by PID; state in .run/)."""
    from app.cluster import local

    local.local_down()


def register(cli: typer.Typer) -> None:
    cli.add_typer(cluster, name="cluster")
