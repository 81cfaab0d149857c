"""`python -m app batch` and `python -m app bench`, plugged into the main CLI by `register(cli)`."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

Endpoints = Annotated[
    list[str] | None,
    typer.Option("--endpoint", "-e", help="Base URL (repeatable, in priority order); default http://127.0.0.1:8080."),
]
ApiKey = Annotated[str | None, typer.Option(envvar="OPENAI_API_KEY", help="Bearer key (API_KEYS on the server).")]


def batch_command(
    input_path: Annotated[Path, typer.Argument(help="JSONL: {\"id\": ..., \"messages\"|\"prompt\": ...} per line.",
                                               exists=True, dir_okay=False)],
    output: Annotated[Path, typer.Option("--output", "-o", help="JSONL results, one line per input id.")],
    endpoint: Endpoints = None,
    concurrency: Annotated[int, typer.Option(min=1, help="Requests in flight.")] = 8,
    api_key: ApiKey = None,
    model: Annotated[str | None, typer.Option(help="Model for lines without one (default: first of /v1/models).")]
    = None,
    max_tokens: Annotated[int | None, typer.Option(min=1, help="max_tokens for lines without one.")] = None,
    stream: Annotated[bool, typer.Option("--stream", help="Stream (SSE) to measure TTFT.")] = False,
    resume: Annotated[bool, typer.Option("--resume", help="Skip ids already in OUTPUT and append the rest.")] = False,
    max_attempts: Annotated[int, typer.Option(min=1, help="Attempts per request (first try included).")] = 6,
    retry_budget: Annotated[int | None, typer.Option(min=0, help="Retries for the whole batch "
                                                     "(default 10 + half the requests).")] = None,
    backoff: Annotated[float, typer.Option(help="Backoff base (s): full jitter, doubling per attempt.")] = 0.5,
    max_backoff: Annotated[float, typer.Option(help="Cap on one backoff wait (s).")] = 20.0,
    max_retry_after: Annotated[float, typer.Option(help="Cap on honouring a Retry-After (s).")] = 60.0,
    timeout: Annotated[float, typer.Option(help="Per-attempt timeout (s).")] = 120.0,
    connect_timeout: Annotated[float, typer.Option(help="Connect timeout (s).")] = 5.0,
    cooldown: Annotated[float, typer.Option(help="Seconds a failing endpoint is benched (doubles per failure).")]
    = 2.0,
    summary_json: Annotated[Path | None, typer.Option(help="Also write the summary as JSON here.")] = None,
    progress: Annotated[bool, typer.Option("--progress/--no-progress", help="Live progress bar.")] = True,
) -> None:
    """Send a JSONL batch with failover, retries and resume; one result line per id, written as it goes.

    To hand a batch to the server instead (OpenAI Batch API; disconnect and collect later):
    `python -m app batch submit|status|cancel|download|list --help`."""
    from app.client.batch import BatchOptions, main_batch
    from app.client.wire import RetryPolicy
    from app.console import fail

    opts = BatchOptions(
        endpoints=endpoint or ["http://127.0.0.1:8080"], concurrency=concurrency, api_key=api_key, model=model,
        stream=stream, timeout_s=timeout, connect_timeout_s=connect_timeout, retry_budget=retry_budget,
        retry=RetryPolicy(max_attempts=max_attempts, backoff_s=backoff, max_backoff_s=max_backoff,
                          max_retry_after_s=max_retry_after),
        cooldown_s=cooldown, progress=progress,
    )
    try:
        code = main_batch(input_path, output, opts, resume=resume, max_tokens=max_tokens, summary_json=summary_json)
    except (FileExistsError, RuntimeError) as exc:
        raise fail(str(exc)) from None
    raise typer.Exit(code)


def _levels(text: str) -> list[int]:
    try:
        levels = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise typer.BadParameter("comma-separated integers, e.g. 1,4,16") from None
    if not levels or min(levels) < 1:
        raise typer.BadParameter("at least one level, each >= 1")
    return levels


def bench_command(
    endpoint: Annotated[str, typer.Option("--endpoint", "-e", help="Base URL of the OpenAI-compatible API.")]
    = "http://127.0.0.1:8000",
    model: Annotated[str | None, typer.Option(help="Model id (default: first of /v1/models).")] = None,
    api_key: ApiKey = None,
    levels: Annotated[str, typer.Option(help="Concurrency levels, comma-separated.")] = "1,4,16",
    duration: Annotated[float, typer.Option(min=0.1, help="Seconds per level.")] = 20.0,
    max_tokens: Annotated[int, typer.Option(min=1, help="Output tokens per request (fixed: ignore_eos).")] = 32,
    prompt_words: Annotated[int, typer.Option(min=1, help="Random words per prompt.")] = 24,
    warmup: Annotated[int | None, typer.Option(help="Unmeasured requests before each level (default: c).")] = None,
    chat: Annotated[bool, typer.Option("--chat", help="Use /v1/chat/completions instead of /v1/completions.")]
    = False,
    max_requests: Annotated[int | None, typer.Option(help="Stop a level after this many requests.")] = None,
    out: Annotated[Path | None, typer.Option(help="Folder for bench.json and bench.md.")] = None,
    name: Annotated[str, typer.Option(help="File stem of the outputs.")] = "bench",
    shared_prefix: Annotated[bool, typer.Option(
        "--shared-prefix", help="RAG-shaped load instead: --documents documents of --doc-words words, "
                                "--questions questions each, shuffled; reports the prefix-cache hit rate.")] = False,
    documents: Annotated[int, typer.Option(min=1, help="--shared-prefix: distinct documents.")] = 16,
    doc_words: Annotated[int, typer.Option(min=1, help="--shared-prefix: words per document.")] = 600,
    questions: Annotated[int, typer.Option(min=1, help="--shared-prefix: questions per document.")] = 8,
    seed: Annotated[int, typer.Option(help="--shared-prefix: seed of the documents, questions and order.")] = 0,
    metrics_url: Annotated[list[str] | None, typer.Option(
        "--metrics-url", help="--shared-prefix: a /metrics URL with the replicas' vLLM counters (a Ray node's "
                              "metrics export port, or the standalone server); repeatable.")] = None,
) -> None:
    """Benchmark an endpoint at fixed concurrency levels: TTFT, ITL, e2e p50/p95/p99, req/s, tokens/s."""
    import asyncio
    import json

    from app.client.loadgen import bench_endpoint, to_markdown, write_report
    from app.console import fail

    lv = _levels(levels)
    if shared_prefix:
        import httpx

        from app.client import shared_prefix as sp

        reports = []
        nonce = sp.SharedPrefixLoad(1, 1, 1).nonce
        for c in lv:
            load = sp.SharedPrefixLoad(documents=documents, doc_words=doc_words, questions=questions, seed=seed,
                                       nonce=f"{nonce}c{c}")
            try:
                reports.append(asyncio.run(sp.bench_shared_prefix(
                    endpoint, model=model, api_key=api_key, chat=chat, load=load, concurrency=c,
                    max_tokens=max_tokens, metrics_urls=metrics_url or [], log=lambda m: typer.echo(m, err=True))))
            except (RuntimeError, httpx.HTTPError) as exc:
                raise fail(f"{type(exc).__name__}: {exc}") from None
        text = "".join(sp.to_markdown(r) for r in reports)
        if out is not None:
            out.mkdir(parents=True, exist_ok=True)
            (out / f"{name}.json").write_text(json.dumps(reports, indent=2) + "\n")
            (out / f"{name}.md").write_text(text)
            typer.echo(f"wrote {out / (name + '.json')} and {out / (name + '.md')}", err=True)
        typer.echo(text)
        return
    try:
        report = asyncio.run(bench_endpoint(
            endpoint, model=model, api_key=api_key, chat=chat, levels=lv, duration_s=duration,
            max_tokens=max_tokens, prompt_words=prompt_words, warmup=warmup, max_requests=max_requests,
            log=lambda m: typer.echo(m, err=True)))
    except RuntimeError as exc:
        raise fail(str(exc)) from None
    if out is not None:
        jpath, mpath = write_report(report, out, name)
        typer.echo(f"wrote {jpath} and {mpath}", err=True)
    else:
        typer.echo(json.dumps(report, indent=2), err=True)
    typer.echo(to_markdown(report))


def register(cli: typer.Typer) -> None:
    cli.command("batch")(batch_command)
    cli.command("bench")(bench_command)
