"""Every private upstream API the kit uses exists in the installed (pinned) Ray, uvicorn and DeepSpeed.

`app.compat` is the one place that reaches them; this imports the real packages (seconds, so it is not
part of the unit layer) and fails naming the attribute when an upgrade removed one.
"""

from __future__ import annotations

import importlib.util

import pytest

from app import compat
from tests.support.env import need


def test_private_apis_exist_in_the_installed_versions() -> None:
    for package in ("ray", "uvicorn", "deepspeed"):
        need(importlib.util.find_spec(package) is not None, f"needs {package} (installed by tests/run.sh)")
    assert compat.private_api_problems() == []


def test_a_missing_attribute_names_the_pin() -> None:
    class OldServer:  # a uvicorn Server without the attribute this kit relies on
        pass

    with pytest.raises(compat.CompatError, match=r"uvicorn.Server._captured_signals is missing .* uvicorn>=0.34"):
        compat.uvicorn_forget_signal(OldServer(), 15)
