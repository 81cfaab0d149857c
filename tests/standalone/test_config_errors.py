"""A bad model config makes the real CLI exit non-zero with the file and key (parsing itself: tests/unit)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from tests.support.env import ROOT

BAD = """
model_loading_config: {model_id: m1, model_source: org/model}
engine: transformers
deployment_config:
  autoscaling_config: {min_replicas: 1, max_replicas: 3, target_ongoing_request: 2}
engine_kwargs: {dtype: float16}
"""


@pytest.mark.parametrize("command", [["cluster", "deploy"], ["serve", "--config"]])
def test_cli_rejects_bad_config_with_nonzero_exit(tmp_path: Path, command: list[str]) -> None:
    bad = tmp_path / "m.yaml"
    bad.write_text(BAD)
    proc = subprocess.run([sys.executable, "-m", "app", *command, str(bad)], cwd=ROOT, capture_output=True,
                          text=True, timeout=120, env={"PATH": "/usr/bin:/bin", "HOME": str(tmp_path)})
    assert proc.returncode != 0
    assert str(bad) in proc.stderr and "target_ongoing_request" in proc.stderr, proc.stderr
    assert "Traceback" not in proc.stderr
