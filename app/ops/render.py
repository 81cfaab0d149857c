"""Placeholder substitution shared by the config renderers.

Templates use `${UPPER_NAME}` placeholders; nginx's and Prometheus' own
variables (`$upstream_addr`, `$1`) are lowercase or unbraced and pass through.
An unknown placeholder is an error that names it (fail loudly, never render a
half-filled config).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]
_PLACEHOLDER = re.compile(r"\$\{([A-Z][A-Z0-9_]*)\}")


class RenderError(ValueError):
    """A template or a setting that cannot be rendered (the message names the key)."""


def substitute(template: str, values: Mapping[str, str], source: str = "template") -> str:
    missing = sorted({m.group(1) for m in _PLACEHOLDER.finditer(template)} - set(values))
    if missing:
        raise RenderError(f"{source}: no value for placeholder(s) {', '.join(missing)}")
    return _PLACEHOLDER.sub(lambda m: values[m.group(1)], template)


def parse_hostports(raw: str, key: str) -> list[str]:
    """'h1:p1, h2:p2' -> ['h1:p1', 'h2:p2'], validating every port."""
    out: list[str] = []
    for item in (x.strip() for x in raw.split(",")):
        if not item:
            continue
        host, sep, port = item.rpartition(":")
        if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
            raise RenderError(f"{key}: {item!r} is not host:port")
        out.append(item)
    return out


def parse_ports(raw: str, key: str) -> list[int]:
    """'8001,8003' -> [8001, 8003]."""
    out: list[int] = []
    for item in (x.strip() for x in raw.split(",")):
        if not item:
            continue
        if not item.isdigit() or not 0 < int(item) < 65536:
            raise RenderError(f"{key}: {item!r} is not a port")
        out.append(int(item))
    return out
