"""`python -m app deepspeed launch|serve`: the DeepSpeed tensor-parallel mode's commands.

`launch` runs on the first VM of DS_HOSTS and starts every rank through the DeepSpeed
launcher and pdsh; `serve` is what the launcher runs for each rank (rank 0 serves the
API, the others follow). Options fall back to the DS_* environment / `.env`.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Annotated, Any

import typer

sub = typer.Typer(help="DeepSpeed tensor-parallel mode: one model sharded over several VMs (pdsh launch).",
                  no_args_is_help=True)


def _settings(overrides: dict[str, Any]) -> Any:
    from pydantic import ValidationError

    from app.console import fail
    from app.deepspeed.config import DSSettings

    try:
        settings = DSSettings(**{k: v for k, v in overrides.items() if v is not None})
        if settings.hosts:
            settings.host_list  # noqa: B018 - validates DS_HOSTS early
    except ValidationError as exc:
        err = exc.errors()[0]
        raise fail(f"DS_{'.'.join(str(p) for p in err['loc']).upper()}: {err['msg']}") from None
    except ValueError as exc:
        raise fail(str(exc)) from None
    return settings


@sub.command("serve")
def serve(
    model: Annotated[str | None, typer.Option(help="Model folder, same path on every VM [DS_MODEL].")] = None,
    served_model_name: Annotated[str | None, typer.Option(help="Model id clients send [DS_SERVED_MODEL_NAME].")] = None,
    host: Annotated[str | None, typer.Option(help="Rank 0's bind address [DS_HOST, 127.0.0.1].")] = None,
    port: Annotated[int | None, typer.Option(help="Rank 0's API port [DS_PORT, 8002].")] = None,
    collective_timeout_s: Annotated[float | None, typer.Option(help="[DS_COLLECTIVE_TIMEOUT_S, 60].")] = None,
) -> None:
    """Per-rank entrypoint the DeepSpeed launcher runs on every VM (needs RANK/WORLD_SIZE/MASTER_*)."""
    from app.console import fail, setup_logging

    settings = _settings({"model": model, "served_model_name": served_model_name, "host": host, "port": port,
                          "collective_timeout_s": collective_timeout_s})
    setup_logging(settings.log_level)
    if not settings.model:
        raise fail("DS_MODEL is empty: set it (or --model) to the model folder, the same path on every VM")
    for var in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        if var not in os.environ:
            raise fail(f"{var} is not set: `deepspeed serve` is started by `python -m app deepspeed launch`")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from app.deepspeed.tp import run_rank

    run_rank(settings)  # exits the process with the rank's code


@sub.command("launch")
def launch(
    hosts: Annotated[str | None, typer.Option(help="VMs as ip[:slots],...; first = this VM [DS_HOSTS].")] = None,
    model: Annotated[str | None, typer.Option(help="Model folder, same path on every VM [DS_MODEL].")] = None,
    served_model_name: Annotated[str | None, typer.Option(help="[DS_SERVED_MODEL_NAME].")] = None,
    net_ifname: Annotated[str | None, typer.Option(help="Private NIC for gloo/NCCL [DS_NET_IFNAME].")] = None,
    master_port: Annotated[int | None, typer.Option(help="[DS_MASTER_PORT, 29500].")] = None,
    host: Annotated[str | None, typer.Option(help="Rank 0's bind address [DS_HOST, 127.0.0.1].")] = None,
    port: Annotated[int | None, typer.Option(help="Rank 0's API port [DS_PORT, 8002].")] = None,
    collective_timeout_s: Annotated[float | None, typer.Option(help="[DS_COLLECTIVE_TIMEOUT_S, 60].")] = None,
    deadline_s: Annotated[float | None, typer.Option(help="Launch -> ready deadline [DS_LAUNCH_DEADLINE_S].")] = None,
    ssh_key: Annotated[str | None, typer.Option(help="Private key for ssh/pdsh [DS_SSH_KEY].")] = None,
    ssh_port: Annotated[int | None, typer.Option(help="sshd port on every VM [DS_SSH_PORT, 22].")] = None,
    run_dir: Annotated[Path | None, typer.Option(
        help="Where the hostfile and .deepspeed_env are written [DS_RUN_DIR, $TMPDIR/llmkit-deepspeed].")] = None,
    dry_run: Annotated[bool, typer.Option(help="Write the files and print the command; launch nothing.")] = False,
    skip_ssh_check: Annotated[bool, typer.Option(help="Skip the passwordless-ssh pre-check.")] = False,
) -> None:
    """Start the tensor-parallel group on DS_HOSTS with `deepspeed --launcher pdsh`; exits non-zero when it dies."""
    import shlex

    from app.console import fail, setup_logging
    from app.deepspeed import launcher

    settings = _settings({
        "hosts": hosts, "model": model, "served_model_name": served_model_name, "net_ifname": net_ifname,
        "master_port": master_port, "host": host, "port": port, "collective_timeout_s": collective_timeout_s,
        "launch_deadline_s": deadline_s, "ssh_key": ssh_key, "ssh_port": ssh_port,
        "run_dir": str(run_dir) if run_dir else None,
    })
    setup_logging(settings.log_level)
    if not settings.hosts:
        raise fail("DS_HOSTS is empty: set it to the VMs' private addresses (first = this VM), e.g. "
                   "DS_HOSTS=10.0.0.1,10.0.0.2")
    try:
        files = launcher.prepare(settings, launcher.run_dir(settings))
        if dry_run:
            typer.echo(f"hostfile: {files.hostfile}\nenv file: {files.env_file}")
            typer.echo(" ".join(shlex.quote(c) for c in files.command))
            return
        if not skip_ssh_check:
            launcher.check_ssh(settings)
    except launcher.LaunchError as exc:
        raise fail(str(exc)) from None
    logging.getLogger(__name__).info("ssh ok to %s", ", ".join(h.addr for h in settings.host_list))
    raise typer.Exit(launcher.supervise(settings, files))


@sub.command("sshd")
def sshd(
    listen: Annotated[str, typer.Option(envvar="NODE_IP", help="This VM's private address [NODE_IP].")],
    port: Annotated[int, typer.Option(envvar="DS_SSH_PORT", help="Port [DS_SSH_PORT].")] = 2222,
    authorized_keys: Annotated[Path | None, typer.Option(
        help="Public key(s) allowed in (default: DS_SSH_KEY + .pub).")] = None,
    host_key: Annotated[Path | None, typer.Option(help="sshd host key (default: generated in --state-dir).")] = None,
    state_dir: Annotated[Path, typer.Option(help="Config, pid file and generated host key.")] = Path(
        "/tmp/llmkit-deepspeed/sshd"),
) -> None:
    """Run a private sshd (key-only) so the launcher's pdsh reaches this VM's rank container."""
    from app.console import fail
    from app.deepspeed import launcher

    if authorized_keys is None:
        key = os.environ.get("DS_SSH_KEY", "")
        if not key:
            raise fail("pass --authorized-keys or set DS_SSH_KEY (its .pub file is used)")
        authorized_keys = Path(key + ".pub")
    try:
        cmd = launcher.prepare_sshd(listen, port, authorized_keys, state_dir, host_key)
    except launcher.LaunchError as exc:
        raise fail(str(exc)) from None
    typer.echo(f"sshd on {listen}:{port} (keys from {authorized_keys})", err=True)
    os.execv(cmd[0], cmd)


def register(cli: typer.Typer) -> None:
    cli.add_typer(sub, name="deepspeed")
