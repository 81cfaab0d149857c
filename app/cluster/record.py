"""What `cluster deploy` applied, kept on the head so that a restarted head serves the same app again.

`deploy` writes the record (absolute config paths and the Serve options) to LLM_STATE_DIR/serve-app.json (the
compose kit mounts the `head-state` volume there; without LLM_STATE_DIR nothing is recorded or redeployed).
`cluster head` redeploys it once its node is up, and `cluster health` reports the head unhealthy while a
recorded app is not served.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

FILE_NAME = "serve-app.json"


def state_dir() -> Path | None:
    raw = os.environ.get("LLM_STATE_DIR", "").strip()
    return Path(raw) if raw else None


@dataclass
class DeployRecord:
    configs: list[str]
    http_host: str
    http_port: int
    request_timeout_s: float
    deployed_at: float = field(default_factory=time.time)


def save(record: DeployRecord, directory: Path | None = None) -> Path | None:
    d = directory or state_dir()
    if d is None:
        return None
    d.mkdir(parents=True, exist_ok=True)
    path = d / FILE_NAME
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(asdict(record), indent=2))
    tmp.replace(path)
    return path


def load(directory: Path | None = None) -> DeployRecord | None:
    d = directory or state_dir()
    if d is None:
        return None
    path = d / FILE_NAME
    if not path.exists():
        return None
    data = json.loads(path.read_text())
    return DeployRecord(**data)
