"""`python -m app batch-server` and the Batch API client commands `python -m app batch submit|status|cancel|
download|list` (the plain `python -m app batch FILE -o OUT` stays the client-side batch loop of app.client).

The client speaks the OpenAI Batch API over plain httpx with the kit's retry policy (`app.client.wire`), so it
needs no SDK: `submit FILE --wait -o OUT` uploads, creates the batch, shows a progress bar from
`request_counts` and downloads the output (and `OUT.errors.jsonl` when lines failed).
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path
from typing import Annotated, Any

import httpx
import typer

from app.client.wire import RetryPolicy, RetryTransport, error_from_response, transport_error

JOB_COMMANDS = ("submit", "status", "cancel", "download", "list")
FINAL = ("completed", "failed", "expired", "cancelled")
jobs = typer.Typer(name="batch", help="Batch jobs on the server's OpenAI Batch API (/v1/files, /v1/batches).",
                   no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False)

Endpoint = Annotated[str, typer.Option("--endpoint", "-e", help="Base URL of the API (the SSH tunnel's end).")]
ApiKey = Annotated[str | None, typer.Option(envvar="OPENAI_API_KEY", help="Bearer key (API_KEYS on the server).")]
DEFAULT_ENDPOINT = "http://127.0.0.1:8080"


class Api:
    """A few calls of the Batch API with the kit's retry policy; a readable error (typer exit) on failure."""

    def __init__(self, endpoint: str, api_key: str | None):
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self.base = endpoint.rstrip("/") + "/v1"
        self.http = httpx.Client(headers=headers, timeout=httpx.Timeout(600.0, connect=10.0),
                                 transport=RetryTransport(RetryPolicy()))

    def call(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        from app.console import fail

        url = f"{self.base}/{path}"
        try:
            resp = self.http.request(method, url, **kwargs)
        except httpx.TransportError as exc:
            raise fail(transport_error(exc, url).message) from None
        if resp.status_code >= 400:
            raise fail(error_from_response(resp.status_code, resp.headers, resp.content, f"{method} {url}").message)
        return resp

    def json(self, method: str, path: str, **kwargs: Any) -> dict[str, Any]:
        data: dict[str, Any] = self.call(method, path, **kwargs).json()
        return data

    def download(self, file_id: str, out: Path) -> None:
        out.write_bytes(self.call("GET", f"files/{file_id}/content").content)


def _endpoint_of(path: Path) -> str:
    """The `url` of the file's first request line (the batch's endpoint)."""
    with open(path, "rb") as f:
        for raw in f:
            if raw.strip():
                try:
                    url = json.loads(raw.decode("utf-8-sig")).get("url")
                except (ValueError, AttributeError):
                    break
                if isinstance(url, str):
                    return url
                break
    return "/v1/chat/completions"


def _wait(api: Api, batch: dict[str, Any], progress: bool) -> dict[str, Any]:
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  TextColumn("{task.fields[failed]} failed"), disable=not progress, transient=False,
                  console=None) as bar:
        task = bar.add_task(batch["status"], total=None, failed=0)
        while batch["status"] not in FINAL:
            counts = batch.get("request_counts") or {}
            bar.update(task, description=batch["status"], total=counts.get("total") or None,
                       completed=counts.get("completed", 0) + counts.get("failed", 0), failed=counts.get("failed", 0))
            time.sleep(1.0)  # polling the server's state once a second
            batch = api.json("GET", f"batches/{batch['id']}")
        counts = batch.get("request_counts") or {}
        bar.update(task, description=batch["status"], total=counts.get("total") or 0,
                   completed=counts.get("completed", 0) + counts.get("failed", 0), failed=counts.get("failed", 0))
    return batch


def _save_results(api: Api, batch: dict[str, Any], out: Path) -> None:
    if batch.get("output_file_id"):
        api.download(batch["output_file_id"], out)
        typer.echo(f"wrote {out}", err=True)
    if batch.get("error_file_id"):
        errors = out.with_name(out.name + ".errors.jsonl")
        api.download(batch["error_file_id"], errors)
        typer.echo(f"wrote {errors} (failed lines)", err=True)


def _exit_code(batch: dict[str, Any]) -> int:
    if batch["status"] != "completed":
        return 1
    return 2 if (batch.get("request_counts") or {}).get("failed") else 0


@jobs.command("submit")
def submit(
    input_path: Annotated[Path, typer.Argument(help="JSONL: {custom_id, method, url, body} per line.",
                                               exists=True, dir_okay=False)],
    endpoint: Endpoint = DEFAULT_ENDPOINT,
    api_key: ApiKey = None,
    wait: Annotated[bool, typer.Option("--wait", help="Wait for the batch to finish (progress bar).")] = False,
    output: Annotated[Path | None, typer.Option("--output", "-o", help="With --wait: write the output file here "
                                                "(failed lines to OUT.errors.jsonl).")] = None,
    metadata: Annotated[list[str] | None, typer.Option(help="KEY=VALUE metadata (repeatable).")] = None,
    progress: Annotated[bool, typer.Option("--progress/--no-progress", help="Progress bar with --wait.")] = True,
) -> None:
    """Upload FILE and start a batch on the server; prints the batch id (with --wait: waits and downloads)."""
    from app.console import fail

    meta = {}
    for item in metadata or []:
        key, sep, value = item.partition("=")
        if not sep:
            raise fail(f"--metadata {item!r}: expected KEY=VALUE")
        meta[key] = value
    api = Api(endpoint, api_key)
    with open(input_path, "rb") as f:
        uploaded = api.json("POST", "files", data={"purpose": "batch"},
                            files={"file": (input_path.name, f, "application/jsonl")})
    batch = api.json("POST", "batches", json={"input_file_id": uploaded["id"], "endpoint": _endpoint_of(input_path),
                                              "completion_window": "24h", "metadata": meta or None})
    typer.echo(batch["id"])
    if not wait:
        return
    batch = _wait(api, batch, progress and sys.stderr.isatty())
    typer.echo(json.dumps({k: batch.get(k) for k in ("id", "status", "request_counts", "output_file_id",
                                                     "error_file_id", "errors")}), err=True)
    if output is not None:
        _save_results(api, batch, output)
    raise typer.Exit(_exit_code(batch))


@jobs.command("status")
def status(batch_id: str, endpoint: Endpoint = DEFAULT_ENDPOINT, api_key: ApiKey = None) -> None:
    """Print the Batch object (JSON)."""
    typer.echo(json.dumps(Api(endpoint, api_key).json("GET", f"batches/{batch_id}"), indent=2))


@jobs.command("cancel")
def cancel(batch_id: str, endpoint: Endpoint = DEFAULT_ENDPOINT, api_key: ApiKey = None) -> None:
    """Cancel a batch (it ends `cancelled` with the lines it finished)."""
    typer.echo(json.dumps(Api(endpoint, api_key).json("POST", f"batches/{batch_id}/cancel"), indent=2))


@jobs.command("download")
def download(
    batch_id: str,
    output: Annotated[Path, typer.Option("--output", "-o", help="Output JSONL (errors to OUT.errors.jsonl).")],
    endpoint: Endpoint = DEFAULT_ENDPOINT,
    api_key: ApiKey = None,
) -> None:
    """Download a finished batch's output (and error) file."""
    api = Api(endpoint, api_key)
    batch = api.json("GET", f"batches/{batch_id}")
    _save_results(api, batch, output)
    raise typer.Exit(_exit_code(batch))


@jobs.command("list")
def list_batches(endpoint: Endpoint = DEFAULT_ENDPOINT, api_key: ApiKey = None,
                 limit: Annotated[int, typer.Option(min=1, max=100)] = 20) -> None:
    """The newest batches of this key: id, status, counts."""
    page = Api(endpoint, api_key).json("GET", "batches", params={"limit": limit})
    for b in page.get("data") or []:
        c = b.get("request_counts") or {}
        typer.echo(f"{b['id']}  {b['status']:<11} {c.get('completed', 0)}/{c.get('total', 0)} done, "
                   f"{c.get('failed', 0)} failed  created_at={b['created_at']}")


def batch_server(
    host: Annotated[str | None, typer.Option(help="Bind address (default 127.0.0.1).")] = None,
    port: Annotated[int | None, typer.Option(help="Port (default BATCH_PORT, 8005).")] = None,
    data_dir: Annotated[Path | None, typer.Option(help="State folder [LLM_BATCH_DIR].")] = None,
    target_url: Annotated[str | None, typer.Option(help="Where lines go: the front door's base URL "
                                                   "[LLM_BATCH_TARGET_URL, default NGINX_BIND:NGINX_PORT, "
                                                   "127.0.0.1:8080].")] = None,
) -> None:
    """Run the OpenAI Batch API service (/v1/files, /v1/batches) with its durable runner."""
    from pydantic import ValidationError

    from app.batch import server
    from app.console import fail, setup_logging
    from app.settings import Settings

    overrides: dict[str, Any] = {"port": int(os.environ.get("BATCH_PORT") or 8005)}
    overrides |= {k: v for k, v in {"host": host, "port": port, "batch_target_url": target_url,
                                     "batch_dir": str(data_dir) if data_dir else None}.items() if v is not None}
    try:
        settings = Settings(**overrides)
    except ValidationError as exc:
        raise fail(str(exc.errors()[0]["msg"])) from None
    setup_logging(settings.log_level, settings.access_log)
    try:
        server.run(settings)
    except ValueError as exc:
        raise fail(str(exc)) from None


def register(cli: typer.Typer) -> None:
    cli.command("batch-server")(batch_server)
