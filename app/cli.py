"""Command line (typer): every container and test runs one of these commands.

Core commands live here (`serve`, `make-tiny-model`). Feature packages add their
own by exposing `register(cli)` in the modules listed in `_PLUGINS`; a package
whose optional dependencies are missing still imports (heavy imports stay inside
command functions), so `--help` always works.
"""

from __future__ import annotations

import importlib
import os
from pathlib import Path
from typing import Annotated, Any

import typer

from app.console import fail, setup_logging
from app.engines.base import ServingKnobs

cli = typer.Typer(
    name="app",
    help="LLM serving kit: OpenAI-compatible API on Ray Serve, vLLM/transformers, nginx, DeepSpeed.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

_PLUGINS = (
    "app.cluster.cli",
    "app.deepspeed.cli",
    "app.client.cli",
    "app.integrations.cli",
    "app.ops.cli",
    "app.k8s.cli",
    "app.batch.cli",
    "app.tenants.cli",
)


def knob_option(name: str, prefix: str = "LLM_") -> Any:
    """A typer option for a `ServingKnobs` field: help text and lower bound come from its one definition."""
    field = ServingKnobs.model_fields[name]
    lower = [m.ge for m in field.metadata if hasattr(m, "ge")]
    default = f"{field.default:g}" if isinstance(field.default, int | float) else str(field.default)
    return typer.Option(help=f"{field.description} [{prefix}{name.upper()}, default {default}]",
                        min=lower[0] if lower else None)


@cli.command()
def serve(
    model: Annotated[str | None, typer.Option(help="Local folder or hub id of the model.")] = None,
    served_model_name: Annotated[str | None, typer.Option(
        help="Model id clients send (default: the model folder's name, its path also accepted; a hub id as it is).")
    ] = None,
    engine: Annotated[str | None, typer.Option(help="auto | vllm | transformers")] = None,
    host: Annotated[str | None, typer.Option(help="Bind address (default 127.0.0.1).")] = None,
    port: Annotated[int | None, typer.Option(help="Port (default 8000).")] = None,
    device: Annotated[str | None, typer.Option(help="auto | cpu | cuda | cuda:N")] = None,
    dtype: Annotated[str | None, typer.Option(help="auto | float32 | float16 | bfloat16")] = None,
    max_model_len: Annotated[int | None, typer.Option(help="Cap on the context length.")] = None,
    max_num_seqs: Annotated[int | None, typer.Option(
        min=1, help="Concurrent generations per model, vLLM's max_num_seqs [LLM_MAX_NUM_SEQS; transformers 16, "
                    "vLLM its own default].")] = None,
    max_waiting: Annotated[int | None, knob_option("max_waiting")] = None,
    default_max_tokens: Annotated[int | None, knob_option("default_max_tokens")] = None,
    retry_after_s: Annotated[float | None, knob_option("retry_after_s")] = None,
    tool_call_parser: Annotated[str | None, knob_option("tool_call_parser")] = None,
    config: Annotated[
        list[Path] | None, typer.Option("--config", help="Model config YAML (LLMConfig layout); repeatable.")
    ] = None,
    dynamic_lora_loading_path: Annotated[str | None, typer.Option(
        help="Folder of LoRA adapter folders, served as model '<id>:<folder>' [LLM_DYNAMIC_LORA_LOADING_PATH].")
    ] = None,
    backup: Annotated[bool | None, typer.Option(
        "--backup/--no-backup", help="nginx's backup for a cluster: an unknown model is a retryable 503 naming it, "
                                     "not a 404 [LLM_BACKUP].")] = None,
) -> None:
    """Run the OpenAI-compatible API on uvicorn without Ray (also the nginx fallback)."""
    from pydantic import ValidationError

    from app import standalone
    from app.settings import Settings

    overrides: dict[str, Any] = {k: v for k, v in {
        "model": model, "served_model_name": served_model_name, "engine": engine, "host": host, "port": port,
        "device": device, "dtype": dtype, "max_model_len": max_model_len, "max_num_seqs": max_num_seqs,
        "max_waiting": max_waiting, "default_max_tokens": default_max_tokens, "retry_after_s": retry_after_s,
        "backup": backup, "dynamic_lora_loading_path": dynamic_lora_loading_path,
        "tool_call_parser": tool_call_parser,
    }.items() if v is not None}
    try:
        settings = Settings(**overrides)
    except ValidationError as exc:
        err = exc.errors()[0]
        where = ".".join(str(p) for p in err["loc"])
        raise fail(f"{where + ': ' if where else ''}{str(err['msg']).removeprefix('Value error, ')}") from None
    setup_logging(settings.log_level, settings.access_log)
    specs = None
    if config:
        from app.models.config import load_engine_specs

        try:
            specs = load_engine_specs(config)
        except ValueError as exc:
            raise fail(str(exc)) from None
    try:
        standalone.run(settings, specs)
    except ValueError as exc:
        raise fail(str(exc)) from None


@cli.command("make-tiny-model")
def make_tiny_model(
    out_dir: Annotated[Path, typer.Argument(help="Folder to write the model to.")],
    seed: Annotated[int, typer.Option(help="Weight seed.")] = 0,
    max_context: Annotated[int, typer.Option(help="max_position_embeddings of the model.")] = 2048,
    heads: Annotated[int, typer.Option(help="Attention heads (head_dim = 64 / heads; vLLM-CPU needs >= 32).")] = 2,
    kv_heads: Annotated[int, typer.Option(help="Key/value heads (divides --heads).")] = 2,
) -> None:
    """Build a tiny random-weight Qwen2 model + BPE tokenizer offline (tests, CI, demo)."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from app.models.tiny import build_tiny_model

    try:
        path = build_tiny_model(out_dir, seed=seed, max_context=max_context, heads=heads, kv_heads=kv_heads)
    except ValueError as exc:
        raise fail(str(exc)) from None
    typer.echo(str(path))


@cli.command("make-tiny-lora")
def make_tiny_lora(
    base_dir: Annotated[Path, typer.Argument(help="The base model's folder (e.g. from make-tiny-model).")],
    out_dir: Annotated[Path, typer.Argument(help="Adapter folder to write (put it under a model's "
                                                 "lora_config.dynamic_lora_loading_path).")],
    rank: Annotated[int, typer.Option(help="LoRA rank r.")] = 8,
    seed: Annotated[int, typer.Option(help="Weight seed (different seeds: different outputs).")] = 0,
) -> None:
    """Build a LoRA adapter with random non-zero weights for a local base model, offline (PEFT; tests, demo)."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from app.models.tiny_lora import build_tiny_lora

    try:
        path = build_tiny_lora(base_dir, out_dir, rank=rank, seed=seed)
    except ValueError as exc:
        raise fail(str(exc)) from None
    typer.echo(str(path))


def _load_plugins() -> None:
    for name in _PLUGINS:
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as exc:
            if exc.name and name.startswith(exc.name):
                continue  # that feature package is not part of this build
            raise
        module.register(cli)


def main() -> None:
    import sys

    if sys.argv[1:2] == ["batch"] and len(sys.argv) > 2:
        from app.batch.cli import JOB_COMMANDS, jobs

        if sys.argv[2] in JOB_COMMANDS:  # `batch submit|status|...`: the server's Batch API; `batch FILE`: the client
            jobs(args=sys.argv[2:], prog_name="python -m app batch")
            return
    _load_plugins()
    cli()
