"""Model config files in Ray Serve LLM's `LLMConfig` layout, parsed strictly.

One YAML file per model::

    model_loading_config: {model_id: qwen2.5-0.5b-instruct, model_source: Qwen/Qwen2.5-0.5B-Instruct}
    engine: auto                      # ours: auto | vllm | transformers
    deployment_config:
      name: qwen2-5-0-5b              # optional, derived from model_id
      ray_actor_options: {num_gpus: 1, num_cpus: 1, resources: {small-model-workers: 1}}
      autoscaling_config: {min_replicas: 1, max_replicas: 2, target_ongoing_requests: 8,
                           upscale_delay_s: 10, downscale_delay_s: 60}
      max_ongoing_requests: 16
      max_queued_requests: 32         # Serve answers 429 beyond this (Serve's own key)
    engine_kwargs: {dtype: auto, max_model_len: 4096, max_num_seqs: 8, gpu_memory_utilization: 0.85}
    runtime_env: {env_vars: {HF_HUB_OFFLINE: "1"}}

Every level rejects unknown keys (Ray silently accepts typos in
`autoscaling_config`; we do not). Errors are `ConfigError`s that name the file
and the dotted key. `load_engine_specs` turns configs into the engine protocol's
`EngineSpec`s (also used by `python -m app serve --config`).
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from app.engines.select import EngineSpec

DEFAULT_CONFIG = "app/configs/qwen2.5-0.5b.yaml"


class ConfigError(ValueError):
    """A model config file is invalid; the message names the file and the key."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=False, populate_by_name=True)


class ModelLoadingConfig(_Strict):
    model_id: str = Field(min_length=1, description="The id clients send as `model`.")
    model_source: str = Field(min_length=1, description="Hub id or a folder visible on every worker.")


class AutoscalingConfig(_Strict):
    min_replicas: int = Field(default=1, ge=0)
    initial_replicas: int | None = Field(default=None, ge=0)
    max_replicas: int = Field(default=1, ge=1)
    target_ongoing_requests: float = Field(default=2.0, gt=0)
    upscale_delay_s: float = Field(default=30.0, ge=0)
    downscale_delay_s: float = Field(default=600.0, ge=0)
    metrics_interval_s: float | None = Field(default=None, gt=0)
    look_back_period_s: float | None = Field(default=None, gt=0)
    upscaling_factor: float | None = Field(default=None, gt=0)
    downscaling_factor: float | None = Field(default=None, gt=0)

    @model_validator(mode="after")
    def _bounds(self) -> AutoscalingConfig:
        if self.min_replicas > self.max_replicas:
            raise ValueError(f"min_replicas ({self.min_replicas}) > max_replicas ({self.max_replicas})")
        return self


class RayActorOptions(_Strict):
    num_cpus: float = Field(default=1.0, ge=0)
    num_gpus: float = Field(default=0.0, ge=0)
    memory: int | None = Field(default=None, ge=0)
    resources: dict[str, float] = Field(default_factory=dict)
    accelerator_type: str | None = None


class DeploymentConfig(_Strict):
    name: str | None = Field(default=None, pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
    num_replicas: int | None = Field(default=None, ge=1)
    autoscaling_config: AutoscalingConfig | None = None
    ray_actor_options: RayActorOptions = Field(default_factory=RayActorOptions)
    max_ongoing_requests: int = Field(default=16, ge=1)
    max_queued_requests: int = Field(default=64, ge=-1)
    health_check_period_s: float = Field(default=5.0, gt=0)
    health_check_timeout_s: float = Field(default=30.0, gt=0)
    graceful_shutdown_timeout_s: float = Field(default=20.0, ge=0)
    graceful_shutdown_wait_loop_s: float = Field(default=2.0, gt=0)

    @model_validator(mode="after")
    def _one_scaling_mode(self) -> DeploymentConfig:
        if self.num_replicas is not None and self.autoscaling_config is not None:
            raise ValueError("set either num_replicas or autoscaling_config, not both")
        return self


class EngineKwargs(_Strict):
    """Engine arguments. vLLM receives all set values; transformers uses the ones it understands."""

    tensor_parallel_size: int | None = Field(default=None, ge=1)
    pipeline_parallel_size: int | None = Field(default=None, ge=1)
    dtype: str | None = None
    gpu_memory_utilization: float | None = Field(default=None, gt=0, le=1)
    max_model_len: int | None = Field(default=None, ge=16)
    max_num_seqs: int | None = Field(default=None, ge=1)
    max_num_batched_tokens: int | None = Field(default=None, ge=1)
    enable_prefix_caching: bool | None = None
    enable_chunked_prefill: bool | None = None
    quantization: str | None = None
    kv_cache_dtype: str | None = None
    enforce_eager: bool | None = None
    trust_remote_code: bool | None = None
    seed: int | None = None
    revision: str | None = None
    tokenizer: str | None = None
    download_dir: str | None = None
    device: str | None = None
    extra_engine_args: dict[str, Any] = Field(
        default_factory=dict, description="Passed to vLLM verbatim (for arguments not listed above)."
    )

    def as_kwargs(self) -> dict[str, Any]:
        out = {k: v for k, v in self.model_dump(exclude={"extra_engine_args"}).items() if v is not None}
        out.update(self.extra_engine_args)
        return out


class ModelConfig(_Strict):
    model_loading_config: ModelLoadingConfig
    engine: Literal["auto", "vllm", "transformers"] = "auto"
    deployment_config: DeploymentConfig = Field(default_factory=DeploymentConfig)
    engine_kwargs: EngineKwargs = Field(default_factory=EngineKwargs)
    runtime_env: dict[str, Any] = Field(default_factory=dict)
    max_waiting: int = Field(default=32, ge=0, description="Engine queue before 429 (per replica).")
    default_max_tokens: int = Field(default=256, ge=1)
    retry_after_s: float = Field(default=1.0, ge=0)
    source_file: str = Field(default="", exclude=True)

    @property
    def model_id(self) -> str:
        return self.model_loading_config.model_id

    @property
    def deployment_name(self) -> str:
        name = self.deployment_config.name
        return name or "llm-" + re.sub(r"[^A-Za-z0-9_.-]+", "-", self.model_id).strip("-")

    def engine_spec(self) -> EngineSpec:
        return EngineSpec(
            model_id=self.model_id,
            model_source=self.model_loading_config.model_source,
            engine=self.engine,
            engine_kwargs=self.engine_kwargs.as_kwargs(),
            max_waiting=self.max_waiting,
            default_max_tokens=self.default_max_tokens,
            retry_after_s=self.retry_after_s,
        )


def _format_error(path: Path, exc: ValidationError) -> str:
    parts = []
    for err in exc.errors():
        key = ".".join(str(p) for p in err["loc"]) or "(top level)"
        if err["type"] == "extra_forbidden":
            parts.append(f"{path}: unknown key {key!r}")
        elif err["type"] == "missing":
            parts.append(f"{path}: missing required key {key!r}")
        else:
            parts.append(f"{path}: {key}: {err['msg']} (got {err.get('input')!r})")
    return "; ".join(parts)


def _resolve_source(source: str) -> str:
    """Absolute path for explicit or existing relative paths; anything else is a hub id."""
    expanded = os.path.expanduser(os.path.expandvars(source))
    if expanded.startswith(("./", "../", "/")) or Path(expanded).exists():
        return str(Path(expanded).resolve())
    return expanded


def load_model_config(path: str | Path) -> ModelConfig:
    path = Path(path)
    try:
        raw = yaml.safe_load(path.read_text())
    except FileNotFoundError:
        raise ConfigError(f"{path}: file not found") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {exc}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: expected a mapping at the top level, got {type(raw).__name__}")
    if "source_file" in raw:
        raise ConfigError(f"{path}: unknown key 'source_file'")
    try:
        cfg = ModelConfig.model_validate(raw)
    except ValidationError as exc:
        raise ConfigError(_format_error(path, exc)) from None
    cfg.source_file = str(path)
    cfg.model_loading_config.model_source = _resolve_source(cfg.model_loading_config.model_source)
    return cfg


def split_paths(paths: str | Path | Iterable[str | Path]) -> list[Path]:
    """Accepts a list of paths or a comma-separated string (the `MODEL_CONFIGS` form)."""
    items: Iterable[str | Path] = [paths] if isinstance(paths, str | Path) else paths
    out: list[Path] = []
    for item in items:
        out += [Path(p.strip()) for p in str(item).split(",") if p.strip()]
    return out


def load_model_configs(paths: str | Path | Sequence[str | Path]) -> list[ModelConfig]:
    files = split_paths(paths)
    if not files:
        raise ConfigError("no model config given")
    configs = [load_model_config(p) for p in files]
    seen: dict[str, str] = {}
    names: dict[str, str] = {}
    for cfg in configs:
        if cfg.model_id in seen:
            raise ConfigError(
                f"{cfg.source_file}: model_loading_config.model_id {cfg.model_id!r} is also used by "
                f"{seen[cfg.model_id]}"
            )
        if cfg.deployment_name in names:
            raise ConfigError(
                f"{cfg.source_file}: deployment_config.name {cfg.deployment_name!r} is also used by "
                f"{names[cfg.deployment_name]}"
            )
        seen[cfg.model_id] = names[cfg.deployment_name] = cfg.source_file
    return configs


def load_engine_specs(paths: str | Path | Sequence[str | Path]) -> list[EngineSpec]:
    return [cfg.engine_spec() for cfg in load_model_configs(paths)]
