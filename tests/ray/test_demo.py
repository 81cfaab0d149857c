"""`./deploy-ray.sh demo` for real: local Ray cluster, requests, streaming, metrics, replica kill, nginx failover.

The interview walkthrough must not rot: this runs the whole narrated demo on 127.0.0.1 (free ports) and checks
that each step happened and that no request failed across the replica kill and the Ray crash behind nginx.
"""

from __future__ import annotations

import os
import re
import subprocess

from tests.support.env import ROOT, need_binary
from tests.support.servers import free_port


def test_demo_walkthrough_runs_end_to_end() -> None:
    need_binary("nginx", "curl")
    ports = {k: str(free_port()) for k in ("SERVE_PORT", "RAY_GCS_PORT", "RAY_METRICS_EXPORT_PORT",
                                            "RAY_CLIENT_PORT", "RAY_DASHBOARD_PORT")}
    env = {**os.environ, **ports, "HF_HUB_OFFLINE": "1", "NO_COLOR": "1"}
    res = subprocess.run([str(ROOT / "deploy-ray.sh"), "demo"], cwd=ROOT, env=env, capture_output=True,
                         text=True, timeout=540)
    out = res.stdout + res.stderr
    assert res.returncode == 0, out[-4000:]
    for step in range(1, 8):
        assert f"### {step}." in out, f"step {step} missing:\n{out[-4000:]}"
    assert '"object":"chat.completion"' in out and "data: [DONE]" in out
    assert re.search(r"llm_requests_total [1-9]", out), out[-3000:]
    kill = re.search(r"replacement replica registered ([\d.]+)s after the kill; (\d+) requests, (\d+) failed", out)
    assert kill, out[-3000:]
    # only requests in flight at the kill may fail
    assert int(kill.group(3)) <= 4, kill.group(0)
    failover = re.search(r"(\d+) requests through nginx, (\d+) failed", out)
    assert failover and failover.group(2) == "0", out[-3000:]
    assert "local cluster stopped" in out
    assert not (ROOT / ".run" / "local.json").exists()
