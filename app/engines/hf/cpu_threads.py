"""How many threads the transformers engine's forwards use on CPU: chosen at load, or set by the operator.

torch's intra-op pool (OpenMP) splits every GEMM over its threads and makes them meet at a barrier. While the
server serves, the event loop, the HTTP stack and the tokenizer need a core too; an OpenMP team as large as
the machine then waits at every barrier for a thread the OS has parked. Measured on the project's 2-core box
(tiny model, `python -m app bench`, 32 tokens): two torch threads served 7.0 / 25.4 / 33.6 req/s at
c=1/8/16, one thread 15.4 / 43.0 / 60.0. And for a small model's decode step the fork/join costs more than
the work even on an idle machine (a 4x64 @ 64x256 GEMM: 32 us on two threads, 5 us on one).

So by default the forwards get torch's count minus one core (at least one), and when that still leaves a
choice `choose_cpu_threads` times decode steps of the loaded model itself (at one row and at a full batch)
with that count and with 1, and keeps the faster. `engine_kwargs.cpu_threads` sets the count instead. The
setting is torch's process-wide intra-op count (`torch.set_num_threads`): the engine's forwards are the only
torch work in its process.
"""

from __future__ import annotations

import logging
import statistics
import time
from typing import Any

log = logging.getLogger(__name__)

PROBE_STEPS = 6  # timed decode steps per candidate and batch size (after two untimed ones)
PROBE_PROMPT = [1, 2, 3, 4, 5, 6, 7, 8]
KEEP_MARGIN = 0.9  # fewer threads must be at least 10% faster to replace torch's own count


def set_cpu_threads(n: int) -> None:
    import torch

    torch.set_num_threads(n)


def _step_s(model: Any, caches: list[Any], steps: int) -> float:
    tokens = [1] * len(caches)
    for _ in range(2):
        model.decode(caches, tokens, len(caches))
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        model.decode(caches, tokens, len(caches))
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def choose_cpu_threads(model: Any, rows: int, candidates: tuple[int, ...] | None = None) -> int:
    """Time `model`'s decode (an `app.engines.hf.ragged.RaggedModel`) at 1 and `rows` rows per candidate thread
    count (default: torch's count minus one core, and 1); set and return the fastest (the first candidate
    unless another is clearly faster)."""
    import torch

    if candidates is None:
        candidates = (max(1, torch.get_num_threads() - 1), 1)
    candidates = tuple(dict.fromkeys(c for c in candidates if c >= 1))
    if len(candidates) == 1:
        set_cpu_threads(candidates[0])
        return candidates[0]
    rows = max(1, rows)
    timings: dict[int, float] = {}
    with torch.inference_mode():
        for n in candidates:
            set_cpu_threads(n)
            caches = []
            for _ in range(rows):
                cache = model.new_cache()
                model.prefill(cache, PROBE_PROMPT, 0)
                caches.append(cache)
            timings[n] = _step_s(model, caches[:1], PROBE_STEPS) + _step_s(model, caches, PROBE_STEPS)
    best = candidates[0]
    for n, t in timings.items():
        if t < timings[best] * KEEP_MARGIN:
            best = n
    set_cpu_threads(best)
    log.info("CPU threads for the forwards: %d (decode step at 1 + %d rows: %s)", best, rows,
             ", ".join(f"{n} threads {t * 1e3:.2f} ms" for n, t in sorted(timings.items())))
    return best
