"""The Serve application as a config entry: one description of the app for every way the kit deploys it.

`application(...)` returns the entry of a Serve config's `applications` list (name, route_prefix,
import_path, args), and `builder(args)` is the Serve application builder its `import_path` names: it
reads the model config files the args list and returns `build_app(...)` of them. The VM deploy
(`app.cluster.deploy`) calls `builder(entry["args"])` in its driver; on Kubernetes the same entry is
the RayService's `serveConfigV2` (`app.k8s`), where Serve's controller imports and calls the builder
itself. API keys never travel in a rendered entry: `api_keys_env` names the variable (filled from a
Secret) the builder reads where it runs; `api_keys` is for the in-process VM path only.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from app.ray_serve.ingress import APP_NAME

IMPORT_PATH = "app.ray_serve.application:builder"
ROUTE_PREFIX = "/"
DEFAULT_MAX_BODY_BYTES = 4 * 1024 * 1024


class AppArgs(BaseModel):
    """The builder's arguments (Serve passes the config's `args` mapping as they are)."""

    model_config = ConfigDict(extra="forbid")

    configs: list[str] = Field(min_length=1, description="Model config files; relative ones are under config_dir.")
    config_dir: str = Field(default="", description="Folder of relative config paths (the ConfigMap's mount path).")
    api_keys_env: str = Field(default="", description="Variable holding the comma-separated API keys where the "
                                                      "app is built (a Secret's key on Kubernetes).")
    api_keys: list[str] = Field(default_factory=list, description="In-process callers only; never rendered.")
    max_body_bytes: int = Field(default=DEFAULT_MAX_BODY_BYTES, ge=1024)
    keys_file: str = Field(default="", description="The keys file's path on the head (named keys with limits).")
    usage_db: str = Field(default="", description="SQLite file of per-key usage on the head (empty: in memory).")

    def config_paths(self) -> list[Path]:
        base = Path(self.config_dir) if self.config_dir else None
        return [p if p.is_absolute() or base is None else base / p for p in map(Path, self.configs)]

    def key_list(self) -> list[str]:
        if self.api_keys:
            return list(self.api_keys)
        raw = os.environ.get(self.api_keys_env, "") if self.api_keys_env else ""
        return [k.strip() for k in raw.split(",") if k.strip()]


def application(configs: Sequence[str | Path], *, config_dir: str = "", api_keys_env: str = "",
                api_keys: Sequence[str] = (), max_body_bytes: int = DEFAULT_MAX_BODY_BYTES, keys_file: str = "",
                usage_db: str = "") -> dict[str, Any]:
    """One entry of a Serve config's `applications` (ServeApplicationSchema's fields)."""
    args = AppArgs(configs=[str(c) for c in configs], config_dir=config_dir, api_keys_env=api_keys_env,
                   api_keys=list(api_keys), max_body_bytes=max_body_bytes, keys_file=keys_file, usage_db=usage_db)
    return {"name": APP_NAME, "route_prefix": ROUTE_PREFIX, "import_path": IMPORT_PATH,
            "args": args.model_dump(exclude_defaults=True)}


def http_options(host: str, port: int, request_timeout_s: float) -> dict[str, Any]:
    """Serve's HTTP options (its proxy on the head only; `host` must then be the head's address or 0.0.0.0)."""
    return {"host": host, "port": port, "request_timeout_s": request_timeout_s}


def builder(args: dict[str, Any]) -> Any:
    """Serve application builder (`import_path` of `application()`): the ingress + one deployment per config."""
    from app.models.config import load_model_configs
    from app.ray_serve.ingress import build_app

    parsed = AppArgs.model_validate(args)
    configs = load_model_configs(parsed.config_paths())
    return build_app(configs, api_keys=parsed.key_list(), max_body_bytes=parsed.max_body_bytes,
                     keys_file=parsed.keys_file, usage_db=parsed.usage_db)
