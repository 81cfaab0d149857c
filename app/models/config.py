"""Model config files in Ray Serve LLM's `LLMConfig` layout, read once and checked strictly.

One YAML file per model::

    model_loading_config: {model_id: qwen2.5-0.5b-instruct, model_source: Qwen/Qwen2.5-0.5B-Instruct}
    engine: auto                      # ours: auto | vllm | transformers
    deployment_config:                # Ray Serve's own deployment options
      name: qwen2-5-0-5b              # optional, derived from model_id
      ray_actor_options: {num_gpus: 1, num_cpus: 1, resources: {small-model-workers: 1}}
      autoscaling_config: {min_replicas: 1, max_replicas: 2, target_ongoing_requests: 8,
                           upscale_delay_s: 10, downscale_delay_s: 60}
      max_ongoing_requests: 16        # default: the engine's capacity, max_num_seqs + max_waiting
      max_queued_requests: 32         # Serve answers 429 beyond this (Serve's own key)
      request_router_config:          # optional: route by prompt prefix (app/ray_serve/prefix_router.py)
        request_router_class: app.ray_serve.prefix_router.PrefixAwareRouter
    engine_kwargs: {dtype: auto, max_model_len: 4096, max_num_seqs: 8, gpu_memory_utilization: 0.85,
                    max_lora_rank: 16, max_loras: 4}   # LoRA knobs, checked by each engine
    lora_config:                      # optional: serve LoRA adapters, requested as model: "<model_id>:<folder>"
      dynamic_lora_loading_path: /srv/lora-adapters   # a local or mounted folder of PEFT adapter folders
      max_num_adapters_per_replica: 8
    runtime_env: {env_vars: {HF_HUB_OFFLINE: "1"}}
    max_waiting: 32                   # ServingKnobs: max_waiting, default_max_tokens, retry_after_s
    stream_coalesce_ms: 50            # Ray Serve: chunks gathered per replica -> ingress message (0: none)

`deployment_config` is validated with Ray Serve's own schema (`ray.serve.schema.DeploymentSchema`, and
`ray.serve.config.AutoscalingConfig` for `autoscaling_config`, which Serve itself only checks at deploy time,
and `request_router_config`, whose router class is imported at load time) plus our unknown-key check at every
level: Ray silently accepts typos in `autoscaling_config`, we do not. Where Ray is not importable (a standalone
box running `serve --config`), the dict is kept as written and only its key names are checked, against the names
of the pinned Ray's schema (`RAY_*_KEYS`; a unit test keeps them equal to the installed Ray's). `engine_kwargs`
stays a plain dict that only the engines validate: at load time for an explicit engine (and, for `auto`, the
values of the keys the transformers fallback uses), fully when the engine starts. Errors are `ConfigError`s
naming the file and the dotted key. `lora_config` has Ray Serve LLM's `LoraConfig` key names (`RAY_LORA_KEYS`,
checked against the pinned Ray's source by a unit test); its download keys have no use for a local folder and are
refused by name, as is an `s3://`-style path. `load_engine_specs` turns configs into the engine protocol's
`EngineSpec`s (also used by `python -m app serve --config`).
"""

from __future__ import annotations

import os
import re
import types
import typing
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from app import compat
from app.engines.base import EngineChoice, EngineSpec, LoraConfig, ServingKnobs
from app.engines.hf.engine import HFEngineConfig
from app.engines.registry import check_engine_kwargs
from app.engines.vllm.args import VLLM_DEFAULT_MAX_NUM_SEQS
from app.knobs import ConfiguredKnobs

DEFAULT_CONFIG = "app/configs/qwen2.5-0.5b.yaml"

# key names of ray[serve]==2.60.0's schema, for boxes without Ray (tests/unit/models/test_config.py checks them)
RAY_DEPLOYMENT_KEYS = frozenset({
    "autoscaling_config", "backpressure_config", "deployment_actors", "gang_scheduling_config",
    "graceful_shutdown_timeout_s", "graceful_shutdown_wait_loop_s", "health_check_period_s", "health_check_timeout_s",
    "logging_config", "max_ongoing_requests", "max_queued_requests", "max_replicas_per_node", "max_surge_percent",
    "name", "num_replicas", "placement_group_bundle_label_selector", "placement_group_bundles",
    "placement_group_strategy", "ray_actor_options", "request_router_config", "rolling_update_percentage",
    "user_config",
})
# ray[serve]==2.60.0's LoraConfig (ray/llm/_internal/serve/core/configs/llm_config.py); we read a local folder, so
# its download keys are refused by name
RAY_LORA_KEYS = frozenset({"dynamic_lora_loading_path", "max_num_adapters_per_replica", "download_timeout_s",
                           "max_download_tries"})
RAY_ACTOR_OPTION_KEYS = frozenset({"accelerator_type", "fallback_strategy", "label_selector", "memory", "num_cpus",
                                   "num_gpus", "resources", "runtime_env"})
RAY_AUTOSCALING_KEYS = frozenset({
    "aggregation_function", "downscale_delay_s", "downscale_smoothing_factor", "downscale_to_zero_delay_s",
    "downscaling_factor", "initial_replicas", "look_back_period_s", "max_replicas", "metrics_interval_s",
    "min_replicas", "policy", "smoothing_factor", "target_ongoing_requests", "upscale_delay_s",
    "upscale_smoothing_factor", "upscaling_factor",
})
# our deployment defaults where the file sets nothing (max_ongoing_requests: the engine's capacity)
DEPLOYMENT_DEFAULTS: dict[str, Any] = {
    "max_queued_requests": 64,
    "health_check_period_s": 5.0,
    "health_check_timeout_s": 30.0,
    "graceful_shutdown_timeout_s": 20.0,
    "graceful_shutdown_wait_loop_s": 2.0,
}
ACTOR_DEFAULTS: dict[str, Any] = {"num_cpus": 1.0, "num_gpus": 0.0}
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")


class ConfigError(ValueError):
    """A model config file is invalid; the message names the file and the key."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=False, populate_by_name=True)


class ModelLoadingConfig(_Strict):
    model_id: str = Field(min_length=1, description="The id clients send as `model`.")
    model_source: str = Field(min_length=1, description="Hub id or a folder visible on every worker.")


class ModelConfig(ConfiguredKnobs, _Strict):
    model_loading_config: ModelLoadingConfig
    engine: EngineChoice = "auto"
    deployment_config: dict[str, Any] = Field(default_factory=dict, description="Ray Serve deployment options.")
    engine_kwargs: dict[str, Any] = Field(default_factory=dict, description="Validated by the engine.")
    runtime_env: dict[str, Any] = Field(default_factory=dict)
    lora_config: LoraConfig | None = Field(default=None, description="Serve LoRA adapters of this model "
                                           "(Ray Serve LLM's layout).")
    stream_coalesce_ms: float = Field(
        default=50.0, ge=0, le=1000,
        description="Ray Serve: after the stream's first chunk (sent at once), chunks a replica yields within this "
                    "many ms travel to the ingress as one message (none is held back longer); 0 sends each alone.")
    source_file: str = Field(default="", exclude=True)


    @property
    def model_id(self) -> str:
        return self.model_loading_config.model_id

    @property
    def deployment_name(self) -> str:
        name = self.deployment_config.get("name")
        return name or "llm-" + re.sub(r"[^A-Za-z0-9_.-]+", "-", self.model_id).strip("-")

    def engine_capacity(self) -> int:
        """Requests one replica's engine holds at once (max_num_seqs running + max_waiting queued)."""
        seqs = self.engine_kwargs.get("max_num_seqs")
        if not isinstance(seqs, int) or isinstance(seqs, bool):
            seqs = HFEngineConfig.max_num_seqs if self.engine == "transformers" else VLLM_DEFAULT_MAX_NUM_SEQS
        return seqs + self.max_waiting

    def deployment_options(self) -> dict[str, Any]:
        """`serve.deployment(...).options(**this)`: the file's deployment_config over our defaults."""
        dc = dict(self.deployment_config)
        dc.pop("name", None)
        actor = {**ACTOR_DEFAULTS, **dc.pop("ray_actor_options", {})}
        if not actor.get("resources"):
            actor.pop("resources", None)
        # Serve's user code and handle router on the replica's one event loop (the file's env_vars win)
        env_vars = {**compat.SERVE_ONE_LOOP_VARS, **(self.runtime_env.get("env_vars") or {})}
        actor["runtime_env"] = {**self.runtime_env, "env_vars": env_vars}
        opts = {"name": self.deployment_name, **DEPLOYMENT_DEFAULTS,
                "max_ongoing_requests": self.engine_capacity(), "ray_actor_options": actor, **dc}
        if "autoscaling_config" not in opts:
            opts.setdefault("num_replicas", 1)
        return opts

    def engine_spec(self) -> EngineSpec:
        return EngineSpec(
            model_id=self.model_id,
            model_source=self.model_loading_config.model_source,
            engine=self.engine,
            engine_kwargs=dict(self.engine_kwargs),
            lora_config=self.lora_config,
            source=self.source_file,
            **self.model_dump(include=set(ServingKnobs.model_fields)),
        )


# ----------------------------------------------------------------------------- checks


def _models_in(annotation: Any) -> list[type[BaseModel]]:
    """The pydantic models an annotation admits (through Optional/Union/list)."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return [annotation]
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType, list, typing.Annotated):
        return [m for arg in typing.get_args(annotation) for m in _models_in(arg)]
    return []


def _unknown_keys(value: Any, model: type[BaseModel], path: str) -> list[str]:
    """Dotted keys of `value` that `model` (recursively, at every level) does not declare."""
    if not isinstance(value, dict):
        return []
    out: list[str] = []
    for key, item in value.items():
        field = model.model_fields.get(str(key))
        if field is None:
            out.append(f"{path}.{key}")
            continue
        for sub in _models_in(field.annotation)[:1]:
            items = item if isinstance(item, list) else [item]
            for i, element in enumerate(items):
                where = f"{path}.{key}" + (f".{i}" if isinstance(item, list) else "")
                out += _unknown_keys(element, sub, where)
    return out


def _unknown_keys_by_name(dc: dict[str, Any]) -> list[str]:
    out = [f"deployment_config.{k}" for k in dc if k not in RAY_DEPLOYMENT_KEYS]
    for key, names in (("ray_actor_options", RAY_ACTOR_OPTION_KEYS), ("autoscaling_config", RAY_AUTOSCALING_KEYS)):
        if isinstance(dc.get(key), dict):
            out += [f"deployment_config.{key}.{k}" for k in dc[key] if k not in names]
    return out


def _ray_errors(prefix: str, exc: ValidationError) -> list[str]:
    out = []
    for err in exc.errors():
        loc = ".".join(str(p) for p in err["loc"])
        msg = str(err["msg"]).removeprefix("Value error, ")
        out.append(f"{prefix}{'.' + loc if loc else ''}: {msg}" + (f" (got {err['input']!r})" if loc else ""))
    return out


def check_deployment_config(dc: Any, name: str) -> list[str]:
    """Problems of a `deployment_config` ('dotted.key: message' or 'unknown key ...'); empty when valid."""
    if not isinstance(dc, dict):
        return [f"deployment_config: expected a mapping, got {type(dc).__name__}"]
    if not _NAME.match(name):
        return [f"deployment_config.name: {name!r} must start with a letter or digit and use [A-Za-z0-9_.-]"]
    try:
        from ray.serve.config import AutoscalingConfig
        from ray.serve.schema import DeploymentSchema
    except ImportError:  # no Ray here: the key names are all we can check
        return [f"unknown key '{k}'" for k in _unknown_keys_by_name(dc)]
    unknown = _unknown_keys(dc, DeploymentSchema, "deployment_config")
    if isinstance(dc.get("autoscaling_config"), dict):  # typed as Dict | AutoscalingConfig: Serve checks it late
        unknown += _unknown_keys(dc["autoscaling_config"], AutoscalingConfig, "deployment_config.autoscaling_config")
    if unknown:
        return [f"unknown key '{k}'" for k in unknown]
    if isinstance(dc.get("request_router_config"), dict):  # Serve's schema imports the class: check it first
        router_problems = _router_problems(dc["request_router_config"])
        if router_problems:
            return router_problems
    problems: list[str] = []
    try:
        DeploymentSchema.model_validate({**dc, "name": name})
    except ValidationError as exc:
        problems += _ray_errors("deployment_config", exc)
    if isinstance(dc.get("autoscaling_config"), dict):
        try:
            AutoscalingConfig.model_validate(dc["autoscaling_config"])
        except ValidationError as exc:
            problems += _ray_errors("deployment_config.autoscaling_config", exc)
    return problems


def _router_problems(rc: dict[str, Any]) -> list[str]:
    """A `request_router_config` as Serve reads it (its class imported now, not at the first request); the
    kit's router (`app.ray_serve.prefix_router`) checks its `request_router_kwargs` too."""
    from ray.serve.config import RequestRouterConfig

    key = "deployment_config.request_router_config"
    try:
        router = RequestRouterConfig(**rc).get_request_router_class()
    except ValidationError as exc:
        return _ray_errors(key, exc)
    except (ImportError, AttributeError, ValueError) as exc:
        return [f"{key}.request_router_class: cannot import {rc.get('request_router_class')!r}: {exc}"]
    check = getattr(router, "check_kwargs", None)
    if callable(check):
        return [f"{key}.request_router_kwargs: {p}" for p in check(dict(rc.get("request_router_kwargs") or {}))]
    return []


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
    lora = raw.get("lora_config")
    if isinstance(lora, dict):
        for key in sorted(RAY_LORA_KEYS & set(lora) - set(LoraConfig.model_fields)):
            raise ConfigError(f"{path}: lora_config.{key}: Ray Serve LLM's download setting has no use here: "
                              "adapters are read from the local or mounted folder dynamic_lora_loading_path")
    try:
        cfg = ModelConfig.model_validate(raw)
    except ValidationError as exc:
        raise ConfigError(_format_error(path, exc)) from None
    problems = check_deployment_config(cfg.deployment_config, cfg.deployment_name)
    kwargs_problem = check_engine_kwargs(cfg.engine, cfg.engine_kwargs)
    if kwargs_problem:
        problems.append(kwargs_problem)
    if problems:
        raise ConfigError("; ".join(f"{path}: {p}" for p in problems))
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
