"""The one dispatch on a model's `engine` choice: which engine builds it, and what each checks in `engine_kwargs`.

`check_engine_kwargs(choice, kwargs)` is what a model config validates before anything loads (the transformers
engine checks its keys; vLLM its own; `auto` checks what its transformers fallback would run with, since vLLM
checks its keys when it starts); `build(name, ...)` constructs an engine by name for `app.engines.select`. Engine
modules are imported here only when an engine is built (vLLM's imports stay inside its engine).
"""

from __future__ import annotations

from typing import Any

from app.engines.base import Engine, EngineChoice, EngineSpec
from app.engines.hf.engine import transformers_engine_config
from app.engines.vllm.args import vllm_engine_args
from app.metrics import MetricsSink


def check_engine_kwargs(choice: EngineChoice, kwargs: dict[str, Any]) -> str | None:
    """What the engine(s) `choice` may run on reject in `engine_kwargs` before loading anything (None: fine)."""
    try:
        if choice == "vllm":
            vllm_engine_args(kwargs)
        else:  # auto: vLLM checks its own keys when it starts; the fallback's keys must have valid values
            transformers_engine_config(kwargs, fallback=choice == "auto")
    except ValueError as exc:
        return str(exc)
    return None


def build(name: str, spec: EngineSpec, sink: MetricsSink, *, reason: str, fallback: bool = False) -> Engine:
    """The engine `name` ("transformers" | "vllm") for `spec`, not started."""
    if name == "vllm":
        from app.engines.vllm.engine import VLLMEngine  # vLLM imports stay inside that module

        return VLLMEngine(spec, sink, reason=reason)
    if name == "transformers":
        from app.engines.hf.engine import TransformersEngine

        return TransformersEngine(spec, sink, reason=reason, fallback=fallback)
    raise ValueError(f"unknown engine {name!r}: use transformers or vllm")
