"""`python -m app ops ...`: render the nginx and Prometheus configs from `.env` (plugged in via `register`)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

ops = typer.Typer(help="Render the nginx and Prometheus configs from the environment / .env.", no_args_is_help=True)


def _fail(message: str) -> typer.Exit:
    typer.secho(f"error: {message}", fg=typer.colors.RED, err=True)
    return typer.Exit(2)


@ops.command("render-nginx")
def render_nginx_cmd(
    out: Annotated[Path, typer.Option("--out", help="Folder (nginx -p prefix) to write nginx.conf into.")],
) -> None:
    """Render nginx/nginx.conf.template into OUT/nginx.conf."""
    from pydantic import ValidationError

    from app.ops.nginx import render_nginx
    from app.ops.render import RenderError

    try:
        conf = render_nginx(out)
    except ValidationError as exc:
        err = exc.errors()[0]
        raise _fail(f"{'.'.join(str(p) for p in err['loc']).upper()}: {err['msg']}") from None
    except RenderError as exc:
        raise _fail(str(exc)) from None
    typer.echo(str(conf))


@ops.command("render-prometheus")
def render_prometheus_cmd(
    out: Annotated[Path, typer.Option("--out", help="Folder to write prometheus.yml (and its rules) into.")],
) -> None:
    """Render monitoring/prometheus.yml.template into OUT/prometheus.yml, with the alert rules beside it."""
    from pydantic import ValidationError

    from app.ops.prometheus import render_prometheus
    from app.ops.render import RenderError

    try:
        conf = render_prometheus(out)
    except ValidationError as exc:
        err = exc.errors()[0]
        raise _fail(f"{'.'.join(str(p) for p in err['loc']).upper()}: {err['msg']}") from None
    except RenderError as exc:
        raise _fail(str(exc)) from None
    typer.echo(str(conf))


def register(cli: typer.Typer) -> None:
    cli.add_typer(ops, name="ops")
