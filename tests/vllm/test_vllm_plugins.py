"""The parent watchdog vLLM loads in its processes (app/engines/vllm/plugins.py), with real processes, no vLLM.

vLLM starts its EngineCore (and that one its workers) with multiprocessing, fork or spawn, and calls our general
plugins in them. Here a host process starts a child the same way; the child calls `watch_parent()` as vLLM's
plugin loader would, then waits forever. SIGKILL of the host must take the child with it (bounded wait, checked
by PID and start time); without the plugin the child outlives its host, re-parented, which is the defect the
watchdog fixes. The real thing (SIGKILL of `python -m app serve --engine vllm`, and of a Ray replica) is in
tests/vllm/test_vllm_cpu_server.py and tests/vllm/test_vllm_cpu_ray.py.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from app.engines.vllm.plugins import watch_parent
from tests.support.env import ROOT
from tests.support.servers import wait_until
from tests.support.vllm_cpu import start_time, survivors

HOST = r"""
import multiprocessing as mp, sys, threading, time
from pathlib import Path

def child(out, plugin):
    if plugin:
        from app.engines.vllm.plugins import watch_parent
        watch_parent()
        watch_parent()  # vLLM may load plugins more than once in a process: one watchdog
    names = [t.name for t in threading.enumerate() if t.name == "llm-kit-parent-watchdog"]
    Path(out).write_text(f"{mp.current_process().pid} {len(names)}")
    time.sleep(600)

if __name__ == "__main__":
    out, method, plugin = sys.argv[1], sys.argv[2], sys.argv[3] == "1"
    p = mp.get_context(method).Process(target=child, args=(out, plugin), name="EngineCore")
    p.start()
    p.join()
"""


def _host(tmp_path: Path, method: str, plugin: bool) -> tuple[subprocess.Popen[bytes], int, int]:
    script = tmp_path / "host.py"
    script.write_text(HOST)
    out = tmp_path / "child.txt"
    host = subprocess.Popen([sys.executable, str(script), str(out), method, "1" if plugin else "0"], cwd=ROOT,
                            env={**os.environ, "PYTHONPATH": str(ROOT)})
    try:
        wait_until(lambda: out.exists() and out.read_text(), 60, 0.05, "the child to start")
    except BaseException:
        host.kill()
        raise
    pid, watchdogs = map(int, out.read_text().split())
    return host, pid, watchdogs


@pytest.mark.parametrize("method", ["spawn", "fork"])
def test_child_dies_with_its_sigkilled_host(tmp_path: Path, method: str) -> None:
    host, child, watchdogs = _host(tmp_path, method, plugin=True)
    assert watchdogs == 1
    snapshot = {child: start_time(child)}
    assert survivors(snapshot), "the child runs while its host does"
    host.send_signal(signal.SIGKILL)
    host.wait(10)
    wait_until(lambda: not survivors(snapshot), 15, 0.05, f"child {child} to exit after its host was SIGKILLed")


def test_without_the_plugin_the_child_outlives_its_host(tmp_path: Path) -> None:
    host, child, watchdogs = _host(tmp_path, "spawn", plugin=False)
    snapshot = {child: start_time(child)}
    try:
        assert watchdogs == 0
        host.send_signal(signal.SIGKILL)
        host.wait(10)
        # the host is reaped; the orphan is re-parented and keeps running (vLLM's EngineCore did exactly this)
        wait_until(lambda: Path(f"/proc/{child}/stat").read_text().rsplit(")", 1)[1].split()[1] != str(host.pid),
                   10, 0.05, "the orphan to be re-parented")
        assert survivors(snapshot)
    finally:
        if survivors(snapshot):
            os.kill(child, signal.SIGKILL)  # ours: started by this test, killed by PID


def test_the_process_hosting_the_engine_is_not_watched() -> None:
    """In the process that runs AsyncLLM (no multiprocessing parent) the plugin does nothing."""
    watch_parent()
    assert not [t for t in threading.enumerate() if t.name == "llm-kit-parent-watchdog"]
