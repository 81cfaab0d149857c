"""Where the repository is, whether this is CI, and the skip policy: a suite that lacks root, a namespace or a
system package skips on a developer machine, but under CI=true that skip fails the run (`need`)."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")


def need(condition: bool, reason: str) -> None:
    """Skip when `condition` is false, except under CI=true, where it is a failure."""
    if condition:
        return
    if IN_CI:
        pytest.fail(f"required in CI but missing: {reason}", pytrace=False)
    pytest.skip(reason)


def need_root() -> None:
    need(os.geteuid() == 0, "needs root (network namespaces)")


def need_binary(*names: str) -> None:
    for name in names:
        need(shutil.which(name) is not None, f"needs `{name}` on PATH (installed by tests/run.sh)")
