"""One lock for importing transformers and the libraries that import it (xgrammar), from any thread.

transformers' lazy module machinery is not thread-safe: two threads importing from it at once can make one of
them fail with "cannot import name 'AutoModelForCausalLM' from 'transformers'" (seen when a model loaded while
the API preloaded xgrammar). Every such import in this project goes through `IMPORT_LOCK`; `preload` imports a
module under it in a background thread, so that the first request that needs it does not wait.
"""

from __future__ import annotations

import importlib
import logging
import threading

log = logging.getLogger(__name__)

IMPORT_LOCK = threading.RLock()


def preload(module: str) -> None:
    """Import `module` under the lock in a daemon thread; a failure is logged (the requests that need it report
    it again)."""

    def run() -> None:
        try:
            with IMPORT_LOCK:
                importlib.import_module(module)
        except Exception as exc:
            log.warning("could not import %s: %s", module, exc)

    threading.Thread(target=run, name=f"preload-{module}", daemon=True).start()
