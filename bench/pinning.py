"""CPU pinning for `compare_layers --split-cores`: one box standing in for the kit's head VM and GPU worker VM.

In the kit the model's replicas run on worker VMs, while Ray's proxy, the ingress, the GCS and nginx run on the
head VM: they never take CPU from the engine. On one small box they all share the same cores, so part of what
the Ray layer costs there is the engine losing CPU to its own plumbing. With `--split-cores` the model's process
(the standalone server, or the Ray model replica with vLLM's processes below it) gets the "worker" cores and
everything else (the load generator, every other Ray process, nginx) the "head" cores, for every layer alike.
`pin_tree(pid, cores)` pins a process, all its threads and all its descendants (threads and children created
later inherit it).
"""

from __future__ import annotations

import os
from pathlib import Path


def split(n_cpus: int | None = None) -> tuple[set[int], set[int]]:
    """(head cores, worker cores): the worker gets the upper half (at least one core), the head the rest."""
    cores = sorted(os.sched_getaffinity(0)) if n_cpus is None else list(range(n_cpus))
    if len(cores) < 2:
        raise ValueError("--split-cores needs at least 2 CPUs")
    cut = len(cores) - max(1, len(cores) // 2)
    return set(cores[:cut]), set(cores[cut:])


def _tasks(pid: int) -> list[int]:
    try:
        return [int(t.name) for t in Path(f"/proc/{pid}/task").iterdir()]
    except OSError:
        return []


def descendants(pid: int) -> list[int]:
    """`pid` and every live process below it."""
    found, todo = [], [pid]
    while todo:
        p = todo.pop()
        found.append(p)
        for tid in _tasks(p):
            try:
                todo += [int(c) for c in Path(f"/proc/{p}/task/{tid}/children").read_text().split()]
            except OSError:
                continue
    return found


def pin_tree(pid: int, cores: set[int]) -> int:
    """Pin `pid`, its threads and its descendants (and theirs) to `cores`; returns how many threads were pinned."""
    n = 0
    for p in descendants(pid):
        for tid in _tasks(p):
            try:
                os.sched_setaffinity(tid, cores)
                n += 1
            except OSError:  # the thread ended meanwhile
                continue
    return n
