"""bench/pinning.py: the split of the cores and pinning a real process tree (threads and children)."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from bench.pinning import descendants, pin_tree, split

# a parent with a second thread and a child process, both alive until stdin closes
TREE = """
import subprocess, sys, threading
child = subprocess.Popen([sys.executable, "-c", "import sys; sys.stdin.read()"], stdin=subprocess.PIPE)
threading.Thread(target=sys.stdin.read, daemon=True).start()
print(child.pid, flush=True)
child.wait()
"""


def allowed(tid: int, pid: int | None = None) -> set[int]:
    path = Path(f"/proc/{pid}/task/{tid}/status") if pid else Path(f"/proc/{tid}/status")
    line = next(ln for ln in path.read_text().splitlines() if ln.startswith("Cpus_allowed_list:"))
    out: set[int] = set()
    for part in line.split(":", 1)[1].strip().split(","):
        lo, _, hi = part.partition("-")
        out |= set(range(int(lo), int(hi or lo) + 1))
    return out


def test_split_gives_the_worker_the_upper_half() -> None:
    assert split(2) == ({0}, {1})
    assert split(4) == ({0, 1}, {2, 3})
    assert split(3) == ({0, 1}, {2})
    with pytest.raises(ValueError, match="at least 2 CPUs"):
        split(1)


@pytest.mark.skipif(len(os.sched_getaffinity(0)) < 2, reason="pinning to one of two cores needs 2 CPUs")
def test_pin_tree_pins_every_thread_and_child() -> None:
    proc = subprocess.Popen([sys.executable, "-c", TREE], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None
        child = int(proc.stdout.readline())
        deadline = time.monotonic() + 10
        while len(list(Path(f"/proc/{proc.pid}/task").iterdir())) < 2 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert set(descendants(proc.pid)) >= {proc.pid, child}
        core = max(os.sched_getaffinity(0))
        assert pin_tree(proc.pid, {core}) >= 3  # the parent's two threads and the child
        for pid in (proc.pid, child):
            for task in Path(f"/proc/{pid}/task").iterdir():
                assert allowed(int(task.name), pid) == {core}, (pid, task.name)
    finally:
        proc.kill()
        proc.wait()
