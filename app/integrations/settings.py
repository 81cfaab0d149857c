"""Settings for clients of the cluster (MCP server, LangGraph node), from the environment and `.env`.

`CLUSTER_BASE_URL` is the OpenAI-compatible base URL (nginx front door by default),
`CLUSTER_API_KEY` the bearer key (falls back to the first of `API_KEYS`),
`CLUSTER_TIMEOUT_S` the per-request timeout, `CLUSTER_MODEL` the default model id
(empty: the first model the cluster lists). `client()` and `retry_policy()` turn them into the one
cluster client of `app.client.wire`.
"""

from __future__ import annotations

from pydantic import AliasChoices, Field, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from app.client.wire import ClusterClient, RetryPolicy


class ClusterSettings(BaseSettings):
    model_config = SettingsConfigDict(
        env_prefix="CLUSTER_", env_file=".env", env_file_encoding="utf-8", extra="ignore", populate_by_name=True
    )

    base_url: str = Field(default="http://127.0.0.1:8080/v1", description="OpenAI-compatible base URL (…/v1).")
    api_key: str = Field(default="", description="Bearer key; empty: the first of API_KEYS, else none.")
    api_keys: str = Field(
        default="", validation_alias=AliasChoices("API_KEYS", "CLUSTER_API_KEYS"),
        description="The server's comma-separated keys (only used as a fallback for api_key).",
    )
    timeout_s: float = Field(default=120.0, gt=0, description="Timeout of one HTTP request to the cluster.")
    model: str = Field(default="", description="Default model id; empty: the first model the cluster lists.")
    max_attempts: int = Field(default=4, ge=1, le=20,
                              description="Tries on 429/502/503/504, connection errors and timeouts.")
    max_retry_wait_s: float = Field(default=10.0, ge=0, description="Cap on one wait between tries.")

    @field_validator("base_url")
    @classmethod
    def _check_url(cls, v: str) -> str:
        v = v.strip().rstrip("/")
        if not v.startswith(("http://", "https://")):
            raise ValueError("must start with http:// or https://")
        return v

    @property
    def effective_api_key(self) -> str:
        if self.api_key.strip():
            return self.api_key.strip()
        keys = [k.strip() for k in self.api_keys.split(",") if k.strip()]
        return keys[0] if keys else ""

    def retry_policy(self, max_attempts: int | None = None) -> RetryPolicy:
        return RetryPolicy(max_attempts=max_attempts or self.max_attempts, backoff_s=0.25,
                           max_backoff_s=self.max_retry_wait_s, max_retry_after_s=self.max_retry_wait_s)

    def client(self) -> ClusterClient:
        return ClusterClient(self.base_url, api_key=self.effective_api_key, timeout_s=self.timeout_s,
                             policy=self.retry_policy())
