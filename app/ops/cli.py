"""`python -m app ops ...`: render the nginx and Prometheus configs from `.env`; the demo's fault steps."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Annotated

import typer

from app.console import fail

ops = typer.Typer(help="Render the nginx and Prometheus configs from the environment / .env.", no_args_is_help=True)


def _render(render: Callable[[Path], Path], out: Path) -> None:
    """Run a renderer; settings and template errors become one-line exits naming the variable."""
    from pydantic import ValidationError

    from app.ops.render import RenderError

    try:
        conf = render(out)
    except ValidationError as exc:
        err = exc.errors()[0]
        raise fail(f"{'.'.join(str(p) for p in err['loc']).upper()}: {err['msg']}") from None
    except RenderError as exc:
        raise fail(str(exc)) from None
    typer.echo(str(conf))


@ops.command("render-nginx")
def render_nginx_cmd(
    out: Annotated[Path, typer.Option("--out", help="Folder (nginx -p prefix) to write nginx.conf into.")],
) -> None:
    """Render nginx/nginx.conf.template into OUT/nginx.conf."""
    from app.ops.nginx import render_nginx

    _render(render_nginx, out)


@ops.command("front-door")
def front_door_cmd(
    out: Annotated[Path, typer.Option("--out", help="Folder (nginx -p prefix) for the rendered nginx.conf.")],
    nginx: Annotated[str, typer.Option(help="The nginx binary.")] = "nginx",
) -> None:
    """Run nginx as a child with active health checks of every upstream (reloads it when one goes down/up)."""
    from app.ops.front_door import FrontDoor, run_front_door
    from app.ops.nginx import NginxSettings

    def start(out_dir: Path) -> Path:
        door = FrontDoor(out_dir, NginxSettings(), nginx_bin=nginx)
        door.check_config(door.render())  # settings/template/nginx -t errors: one line, exit 2
        return out_dir

    _render(start, out)
    raise typer.Exit(run_front_door(out, nginx_bin=nginx))


@ops.command("render-prometheus")
def render_prometheus_cmd(
    out: Annotated[Path, typer.Option("--out", help="Folder to write prometheus.yml (and its rules) into.")],
) -> None:
    """Render monitoring/prometheus.yml.template into OUT/prometheus.yml, with the alert rules beside it."""
    from app.ops.prometheus import render_prometheus

    _render(render_prometheus, out)


@ops.command("demo-faults")
def demo_faults_cmd(
    serve_port: Annotated[int, typer.Option(envvar="SERVE_PORT", help="Local Ray Serve port.")] = 8000,
    gcs_port: Annotated[int, typer.Option(envvar="RAY_GCS_PORT", help="Local Ray GCS port.")] = 6379,
    model: Annotated[str, typer.Option(help="Model id to send traffic to.")] = "tiny",
    model_dir: Annotated[Path, typer.Option(help="Model the fallback server loads.")] = Path(".cache/tiny-model"),
    failover: Annotated[bool, typer.Option(help="Also run the nginx failover step (kills the local cluster).")] = True,
) -> None:
    """Demo faults on the local cluster: kill a replica under traffic, then fail over through nginx."""
    from app.ops import demo

    try:
        typer.secho("-- kill a model replica while requests flow", bold=True)
        demo.replica_kill(serve_port, f"127.0.0.1:{gcs_port}", model)
        if failover:
            typer.secho("-- nginx failover: crash the whole Ray cluster while requests flow through nginx", bold=True)
            demo.nginx_failover(serve_port, model, model_dir, demo.kill_local_cluster)
    except (RuntimeError, TimeoutError, OSError) as exc:
        raise fail(str(exc)) from None


def register(cli: typer.Typer) -> None:
    from app.ops import locks

    cli.add_typer(ops, name="ops")
    locks.register(cli)  # `python -m app locks update|check`
