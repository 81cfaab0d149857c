"""Process settings from the environment and `.env` (pydantic-settings).

Serving knobs use the `LLM_` prefix; `API_KEYS` and the cluster variables keep
the plain names `.env.example` documents. CLI flags override these values.
"""

from __future__ import annotations

from functools import lru_cache
from typing import Literal

from pydantic import AliasChoices, Field
from pydantic_settings import BaseSettings, SettingsConfigDict


class Settings(BaseSettings):
    model_config = SettingsConfigDict(
        env_prefix="LLM_", env_file=".env", env_file_encoding="utf-8", extra="ignore", populate_by_name=True
    )

    # API
    api_keys: str = Field(
        default="",
        validation_alias=AliasChoices("API_KEYS", "LLM_API_KEYS"),
        description="Comma-separated bearer tokens; empty disables auth on /v1/*.",
    )
    max_body_bytes: int = Field(default=4 * 1024 * 1024, ge=1024)
    host: str = "127.0.0.1"
    port: int = Field(default=8000, ge=1, le=65535)
    graceful_timeout_s: float = Field(default=30.0, ge=0)
    log_level: str = "info"
    access_log: bool = Field(default=True, description="One log line per generation request (logger app.access).")

    # model + engine (standalone server)
    model: str = ""
    served_model_name: str = ""
    engine: Literal["auto", "vllm", "transformers"] = "auto"
    device: str = "auto"
    dtype: str = "auto"
    max_model_len: int | None = Field(default=None, ge=16)
    max_running: int = Field(default=4, ge=1, description="Concurrent generations per model.")
    max_waiting: int = Field(default=32, ge=0, description="Queued requests before 429.")
    default_max_tokens: int = Field(default=256, ge=1)
    retry_after_s: float = Field(default=1.0, ge=0)
    trust_remote_code: bool = False

    @property
    def api_key_list(self) -> list[str]:
        return [k.strip() for k in self.api_keys.split(",") if k.strip()]


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    return Settings()
