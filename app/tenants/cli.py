"""`python -m app keys add|list|revoke`: manage the keys file (KEYS_FILE, or --file).

`add NAME` makes a new random key, prints it once on stdout (the only time it is shown) and stores its hash
with the limits given; `list` shows names, models, limits, priority and expiry (never hashes); `revoke NAME`
removes the entry. Every write replaces the file atomically, and running servers pick the change up within a
second, without a restart.
"""

from __future__ import annotations

import os
from datetime import UTC, datetime
from pathlib import Path
from typing import Annotated

import typer

from app.console import fail

keys = typer.Typer(name="keys", help="Named API keys: add (prints the key once), list, revoke.",
                   no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False)

FileOpt = Annotated[Path | None, typer.Option("--file", "-f", help="Keys file [KEYS_FILE].")]


def _path(file: Path | None) -> Path:
    path = file or (Path(os.environ["KEYS_FILE"]) if os.environ.get("KEYS_FILE") else None)
    if path is None:
        raise fail("no keys file: pass --file PATH or set KEYS_FILE")
    return path


def _read(path: Path, must_exist: bool = True):  # type: ignore[no-untyped-def]
    from app.tenants.keyfile import KeysFile, KeysFileError, load

    if not path.exists() and not must_exist:
        return KeysFile()
    try:
        return load(path)
    except KeysFileError as exc:
        raise fail(str(exc)) from None


@keys.command("add")
def add(
    name: Annotated[str, typer.Argument(help="The key's name (metrics, logs, /v1/usage).")],
    file: FileOpt = None,
    model: Annotated[list[str] | None, typer.Option("--model", "-m", help="Model-id glob the key may use "
                                                     "(repeatable; default all, '*').")] = None,
    rpm: Annotated[int | None, typer.Option(min=1, help="Requests per minute.")] = None,
    tpm: Annotated[int | None, typer.Option(min=1, help="Tokens per minute (prompt + completion).")] = None,
    concurrency: Annotated[int | None, typer.Option(min=1, help="Requests in flight at once.")] = None,
    priority: Annotated[str, typer.Option(help="interactive | batch (batch yields to interactive).")] = "interactive",
    expires: Annotated[str | None, typer.Option(help="Expiry, ISO 8601 (e.g. 2027-01-31 or "
                                                     "2027-01-31T12:00:00Z).")] = None,
    admin: Annotated[bool, typer.Option(help="May read every key's usage on /v1/usage.")] = False,
) -> None:
    """Add a key: prints it once (store it now: only its hash is kept)."""
    from pydantic import ValidationError

    from app.tenants.keyfile import KeyEntry, KeysFile, hash_key, new_key, save

    path = _path(file)
    current = _read(path, must_exist=False)
    if current.by_name(name) is not None:
        raise fail(f"a key named {name!r} exists: revoke it first to replace it")
    secret = new_key()
    try:
        when = datetime.fromisoformat(expires.replace("Z", "+00:00")) if expires else None
        entry = KeyEntry(name=name, hash=hash_key(secret), models=tuple(model or ("*",)), rpm=rpm, tpm=tpm,
                         concurrency=concurrency, priority=priority,  # type: ignore[arg-type]
                         expires=when.replace(tzinfo=when.tzinfo or UTC) if when else None, admin=admin)
        updated = KeysFile(keys=[*current.keys, entry])
    except ValueError as exc:
        if isinstance(exc, ValidationError):
            err = exc.errors(include_input=False)[0]
            where = ".".join(str(p) for p in err.get("loc", ()))
            raise fail(f"{where + ': ' if where else ''}{str(err['msg']).removeprefix('Value error, ')}") from None
        raise fail(f"--expires: {exc}") from None
    save(path, updated)
    typer.secho(f"added key {name!r} to {path}; the key (shown only now):", err=True)
    typer.echo(secret)


@keys.command("list")
def list_keys(file: FileOpt = None) -> None:
    """Names, models, limits, priority and expiry of every key (never a hash)."""
    path = _path(file)
    now = datetime.now(UTC)
    for e in _read(path).keys:
        limits = " ".join(f"{k}={v}" for k, v in (("rpm", e.rpm), ("tpm", e.tpm), ("concurrency", e.concurrency))
                          if v is not None) or "unlimited"
        expiry = "" if e.expires is None else f" expires={e.expires.isoformat()}" + (" (EXPIRED)" if e.expired(now)
                                                                                      else "")
        typer.echo(f"{e.name}  models={','.join(e.models)}  {limits}  priority={e.priority}"
                   f"{' admin' if e.admin else ''}{expiry}")


@keys.command("revoke")
def revoke(name: Annotated[str, typer.Argument(help="The key's name.")], file: FileOpt = None) -> None:
    """Remove a key: servers refuse it (401) within a second, without a restart."""
    from app.tenants.keyfile import KeysFile, save

    path = _path(file)
    current = _read(path)
    if current.by_name(name) is None:
        raise fail(f"no key named {name!r} in {path}")
    save(path, KeysFile(keys=[e for e in current.keys if e.name != name]))
    typer.secho(f"revoked key {name!r} in {path}", err=True)


def register(cli: typer.Typer) -> None:
    cli.add_typer(keys)
