"""The threads each process of a benchmarked system ran with, read from /proc while it serves.

    threads_by_role()   # {"vllm engine core": {"processes": 1, "os_threads": 9, "omp_num_threads": "1"}, ...}

Per role (the roles of bench/cpu_share.py, so the report's CPU and thread columns name the same processes), over
the processes of the measured system (the trees below the PIDs given): how many processes, their OS threads (the
largest count among them: torch's and OpenMP's pools, uvicorn's, Ray's gRPC threads) and the `OMP_NUM_THREADS`
their environment started with ("unset" when none): what an OpenMP runtime sized its pool from. Processes of no
known role (and the load generator) are left out.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from bench.cpu_share import role


def _environ(pid: int) -> dict[str, str]:
    try:
        raw = Path(f"/proc/{pid}/environ").read_bytes()
    except OSError:
        return {}
    return dict(kv.split("=", 1) for kv in raw.decode(errors="replace").split("\0") if "=" in kv)


def _os_threads(pid: int) -> int | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("Threads:"):
                return int(line.split()[1])
    except (OSError, ValueError):
        return None
    return None


def threads_by_role(roots: list[int] | None = None) -> dict[str, dict[str, Any]]:
    """Per role, the processes of the system whose process trees start at `roots` (every process on the machine
    when None: on a shared box other work's processes of the same roles would count too)."""
    import psutil

    from bench.pinning import descendants

    mine = None if roots is None else {pid for root in roots for pid in descendants(root)}
    out: dict[str, dict[str, Any]] = {}
    for p in psutil.process_iter(["pid", "cmdline", "name"]):
        if mine is not None and p.info["pid"] not in mine:
            continue
        cmd = " ".join(p.info.get("cmdline") or []) or (p.info.get("name") or "")
        name = role(cmd, p.info["pid"])
        if name in ("other", "load generator"):
            continue
        n = _os_threads(p.info["pid"])
        if n is None:
            continue
        omp = _environ(p.info["pid"]).get("OMP_NUM_THREADS", "unset")
        row = out.setdefault(name, {"processes": 0, "os_threads": 0, "omp_num_threads": omp})
        row["processes"] += 1
        row["os_threads"] = max(row["os_threads"], n)
        if omp != row["omp_num_threads"]:
            row["omp_num_threads"] = "mixed"
    return dict(sorted(out.items()))
