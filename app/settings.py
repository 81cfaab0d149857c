"""Process settings from the environment and `.env` (pydantic-settings).

Serving knobs use the `LLM_` prefix; `API_KEYS` and the cluster variables keep
the plain names `.env.example` documents. CLI flags override these values.
`max_waiting`, `default_max_tokens` and `retry_after_s` come from `ServingKnobs`
(declared once, shared with model configs and DS_*). The engine batch cap is
`LLM_MAX_NUM_SEQS` (vLLM's name); a retired `LLM_MAX_RUNNING` is an error naming it.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from pydantic import AliasChoices, Field, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from app.engines.base import EngineChoice, missing_local_model
from app.http_guard import HTTPServerKnobs
from app.knobs import ConfiguredKnobs

RENAMED_VARIABLES = {"LLM_MAX_RUNNING": "LLM_MAX_NUM_SEQS"}


def default_model_id(model: str) -> str:
    """The id a server gives `model` when no served name is set: a local folder's name (`--model
    /models/qwen2.5` serves `qwen2.5`; the path stays accepted as an alias), a hub id as it is."""
    if model and os.path.isdir(model):
        return Path(model).resolve().name or model
    return model


def model_aliases(model: str, model_id: str) -> dict[str, str]:
    """The names besides `model_id` a server accepts for it (the folder path it was loaded from)."""
    return {model: model_id} if model and model != model_id else {}


def retired_variables(env_file: str | Path | None = ".env") -> list[str]:
    """Retired variable names set in the environment or in `env_file`, as 'OLD was renamed: set NEW' lines."""
    present = {k.upper() for k in os.environ}
    if env_file and Path(env_file).is_file():
        from dotenv import dotenv_values

        present |= {k.upper() for k in dotenv_values(env_file)}
    return [f"{old} was renamed: set {new} instead" for old, new in RENAMED_VARIABLES.items() if old in present]


class Settings(ConfiguredKnobs, HTTPServerKnobs, BaseSettings):
    model_config = SettingsConfigDict(
        env_prefix="LLM_", env_file=".env", env_file_encoding="utf-8", extra="ignore", populate_by_name=True
    )

    # API
    api_keys: str = Field(
        default="",
        validation_alias=AliasChoices("API_KEYS", "LLM_API_KEYS"),
        description="Comma-separated bearer tokens; empty disables auth on /v1/*.",
    )
    keys_file: str = Field(
        default="", validation_alias=AliasChoices("KEYS_FILE", "LLM_KEYS_FILE"),
        description="YAML keys file (named keys: model globs, rpm/tpm/concurrency limits, priority, expiry); "
                    "re-read when it changes. Beside API_KEYS, which stay valid as the `anonymous` key.")
    usage_db: str = Field(default="", description="SQLite file of per-key usage (GET /v1/usage); empty: in "
                          "memory only, lost on restart.")
    host: str = "127.0.0.1"
    port: int = Field(default=8000, ge=1, le=65535)
    backup: bool = Field(
        default=False, description="This server is nginx's backup for a cluster: a model it does not serve is a "
        "retryable 503 naming the model (the cluster may serve it), not a 404.")
    log_level: str = "info"
    access_log: bool = Field(default=True, description="One log line per generation request (logger app.access).")

    # model + engine (standalone server)
    model: str = ""
    served_model_name: str = ""
    engine: EngineChoice = "auto"
    device: str = "auto"
    dtype: str = "auto"
    max_model_len: int | None = Field(default=None, ge=16)
    max_num_seqs: int | None = Field(
        default=None, ge=1,
        description="Concurrent generations per model (vLLM's max_num_seqs). Unset: transformers 16, vLLM its own.",
    )
    trust_remote_code: bool = False
    # LoRA: a model config's lora_config, under the same names
    dynamic_lora_loading_path: str = Field(
        default="", description="Serve the LoRA adapters in this folder (one PEFT folder each, requested as model "
        "'<id>:<folder>'); empty: none. The fallback mounts the folder the workers read.")
    max_num_adapters_per_replica: int = Field(default=16, ge=1, description="LoRA adapters held at once (the least "
                                              "recently used is unloaded beyond it).")

    # batch service (app.batch): `serve` mounts /v1/files and /v1/batches when batch_dir is set
    batch_dir: str = Field(default="", description="Folder of the batch service's SQLite state and files; "
                           "empty: no batch routes on `serve`.")
    batch_target_url: str = Field(default="", description="Base URL the batch runner sends lines to (the front "
                                  "door); empty: the server itself (`serve`) or http://127.0.0.1:8080.")
    batch_api_key: str = Field(default="", description="Bearer key of the runner's requests (default: the first "
                               "of API_KEYS).")
    batch_concurrency: int = Field(default=16, ge=1, description="Batch requests in flight over all batches.")
    batch_concurrency_per_batch: int = Field(default=8, ge=1, description="Batch requests in flight per batch.")
    batch_max_lines: int = Field(default=50_000, ge=1, description="Lines per input file (OpenAI: 50,000).")
    batch_max_file_bytes: int = Field(default=200 * 1024 * 1024, ge=1024,
                                      description="Bytes per input file (OpenAI: 200 MB).")
    batch_window_s: float | None = Field(default=None, gt=0, description="Completion window in seconds, "
                                         "overriding the requested `24h` (tests).")
    batch_request_timeout_s: float = Field(default=600.0, gt=0, description="Per-attempt timeout of a line.")
    batch_max_attempts: int = Field(default=6, ge=1, description="Attempts per line (429/503 honour "
                                    "Retry-After) before it fails.")

    @field_validator("model")
    @classmethod
    def _local_model_exists(cls, v: str) -> str:
        problem = missing_local_model(v) if v else None
        if problem:
            raise ValueError(problem)
        return v

    @model_validator(mode="before")
    @classmethod
    def _no_retired_names(cls, data: Any) -> Any:
        problems = retired_variables(cls.model_config.get("env_file"))  # type: ignore[arg-type]
        if problems:
            raise ValueError("; ".join(problems))
        return data

    @property
    def api_key_list(self) -> list[str]:
        return [k.strip() for k in self.api_keys.split(",") if k.strip()]
