"""Real `python -m app serve` processes on 127.0.0.1 for tests, and the polling and scraping helpers they use."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx

from tests.support.env import ROOT


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


STARTUP_S = 120.0


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

    def wait_ready(self, timeout: float = STARTUP_S) -> ServerProcess:
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
