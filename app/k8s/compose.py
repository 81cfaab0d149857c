"""The compose kit as the source of images and entrypoints: render derives them instead of restating them.

Reads `docker-compose-ray.yml` and the files it `include`s with PyYAML and resolves `${VAR}`, `${VAR:-default}`
and `${VAR:?message}` (nested too) in the fields render uses, against the same environment / `.env` that
`docker compose` reads. A `:?` variable that is unset is a `K8sError` naming it, as Compose itself fails.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from app.k8s.catalogue import K8sError

DEFAULT_COMPOSE = Path(__file__).resolve().parents[2] / "docker-compose-ray.yml"
_VAR = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?:(:?)([-?])([^${}]*))?\}")


def interpolate(text: str, env: Mapping[str, str], where: str) -> str:
    """Compose's variable syntax, innermost first; `where` names the file for a missing required variable."""

    def one(m: re.Match[str]) -> str:
        name, colon, op, arg = m.group(1), m.group(2), m.group(3), m.group(4) or ""
        value = env.get(name)
        unset = value is None or (colon == ":" and value == "")
        if op == "-" and unset:
            return arg
        if op == "?" and unset:
            raise K8sError(f"{where}: {name}: {arg or 'required variable is not set'}")
        return value or ""

    while True:
        new = _VAR.sub(one, text)
        if new == text:
            return new
        text = new


@dataclass(frozen=True)
class Service:
    name: str
    image: str
    command: list[str]


class ComposeKit:
    """Services of the compose kit (every profile), with image and command resolved."""

    def __init__(self, compose_file: str | Path, env: Mapping[str, str]) -> None:
        path = Path(compose_file)
        if not path.is_file():
            raise K8sError(f"{path}: compose file not found (pass --compose-file, the kit's docker-compose-ray.yml)")
        self._raw: dict[str, tuple[Path, dict[str, Any]]] = {}
        top = yaml.safe_load(path.read_text()) or {}
        for inc in top.get("include", []):
            inc_path = path.parent / (inc if isinstance(inc, str) else inc["path"])
            self._add(inc_path, yaml.safe_load(inc_path.read_text()) or {})
        self._add(path, top)
        self._env = env

    def _add(self, path: Path, doc: dict[str, Any]) -> None:
        for name, svc in (doc.get("services") or {}).items():
            self._raw[name] = (path, svc)

    def service(self, name: str) -> Service:
        if name not in self._raw:
            raise K8sError(f"the compose kit has no service {name!r}")
        path, svc = self._raw[name]
        image = interpolate(str(svc["image"]), self._env, str(path))
        command = [interpolate(str(c), self._env, str(path)) for c in svc.get("command", [])]
        return Service(name, image, command)

    def environment(self, name: str, keys: Callable[[str], bool]) -> dict[str, str]:
        """The service's `environment` entries whose name `keys` accepts, resolved."""
        if name not in self._raw:
            raise K8sError(f"the compose kit has no service {name!r}")
        path, svc = self._raw[name]
        return {str(k): interpolate(str(v), self._env, str(path))
                for k, v in (svc.get("environment") or {}).items() if keys(str(k))}

    def names(self) -> list[str]:
        return sorted(self._raw)
