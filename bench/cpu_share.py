"""Where the CPU went while one benchmark level ran: CPU seconds of every process on the machine, by role.

    with CPUShare() as share:
        ... run a level ...
    share.result()   # {"ray replica LLMServer": 0.93, "ray proxy": 0.41, "load generator": 0.52, ...}

Values are cores busy on average over the interval (CPU seconds / wall seconds; the machine has
`os.cpu_count()`). Roles come from the process title or command line: Ray's workers set their titles
(`ray::ServeReplica:<app>:<deployment>`, `ray::ProxyActor`), its daemons are `raylet`, `gcs_server` and the
dashboard; vLLM's processes are `VLLM::EngineCore` and `VLLM::Worker`, the transformers engine's is
`python -m app.engines.hf.engine_process`; `python -m app serve`, vLLM's own server
(`python -m vllm.entrypoints.openai.api_server`), the Ray Serve LLM anchor's driver, `nginx`, and this
process ("load generator") are named too; the rest is
"other". Processes that started or ended during the interval count from their first or to their last sample.
"""

from __future__ import annotations

import os
import time
from typing import Any

ROLE_RULES: tuple[tuple[str, str], ...] = (
    ("ray::ServeReplica:", "ray replica "),  # + deployment name
    ("ray::ProxyActor", "ray proxy"),
    ("ray::ServeController", "ray serve controller"),
    ("raylet", "raylet"),
    ("gcs_server", "ray gcs"),
    ("dashboard", "ray dashboard"),
    ("ray::", "ray worker (other)"),
    ("VLLM::EngineCore", "vllm engine core"),
    ("VLLM::Worker", "vllm worker"),
    ("app.engines.hf.engine_process", "transformers engine process"),
    ("vllm.entrypoints.openai.api_server", "vllm api server"),  # vLLM's own server (an anchor of the benchmark)
    ("bench.ray_serve_llm", "ray serve llm driver"),  # the anchor's driver, parent of its local Ray
    ("app serve", "standalone server"),
    ("nginx", "nginx"),
)


def role(cmdline: str, pid: int) -> str:
    if pid == os.getpid():
        return "load generator"
    for needle, name in ROLE_RULES:
        if needle in cmdline:
            if name == "ray replica ":
                return name + cmdline.split("ray::ServeReplica:", 1)[1].split()[0].split(":")[-1]
            return name
    return "other"


def _snapshot() -> dict[int, tuple[str, float]]:
    import psutil

    out = {}
    for p in psutil.process_iter(["pid", "cmdline", "name", "cpu_times"]):
        info = p.info
        times = info.get("cpu_times")
        if times is None:
            continue
        cmd = " ".join(info.get("cmdline") or []) or (info.get("name") or "")
        out[info["pid"]] = (role(cmd, info["pid"]), float(times.user + times.system))
    return out


class CPUShare:
    def __init__(self) -> None:
        self._start: dict[int, tuple[str, float]] = {}
        self._end: dict[int, tuple[str, float]] = {}
        self._t0 = self._t1 = 0.0

    def __enter__(self) -> CPUShare:
        self._start, self._t0 = _snapshot(), time.monotonic()
        return self

    def __exit__(self, *exc: object) -> None:
        self._end, self._t1 = _snapshot(), time.monotonic()

    def result(self) -> dict[str, Any]:
        wall = max(self._t1 - self._t0, 1e-9)
        busy: dict[str, float] = {}
        for pid, (name, cpu) in self._end.items():
            before = self._start.get(pid, (name, 0.0))[1]
            busy[name] = busy.get(name, 0.0) + max(cpu - before, 0.0)
        return {name: round(s / wall, 2) for name, s in sorted(busy.items(), key=lambda kv: -kv[1]) if s / wall >= 0.01}
