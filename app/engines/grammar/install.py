"""Whether constrained decoding's library (xgrammar) is installed, and what to tell a user when it is not.

A plain `pip install llm-serving-kit` does not bring xgrammar (it declares triton, which its CPU path never uses):
the server still serves everything else, logprobs included. `missing_packages()` is what `/readyz` reports (the
package, what needs it, the one command that installs it); `require_xgrammar()` imports it for a request that
needs it, or raises `MissingPackageError` (501) naming the package and that command.
"""

from __future__ import annotations

import importlib.util
from typing import Any

from app.engines.base import MissingPackageError
from app.engines.import_lock import IMPORT_LOCK

XGRAMMAR_PIN = "xgrammar==0.2.8"  # requirements-nodeps.txt and the `structured` extra pin the same version
XGRAMMAR_FIX = f"pip install --no-deps {XGRAMMAR_PIN}  (or: pip install 'llm-serving-kit[structured]')"
XGRAMMAR_FEATURES = "tools and response_format (constrained decoding)"


def missing_packages() -> list[dict[str, str]]:
    """The optional packages this process lacks: [{package, needed_for, fix}] (empty when all are there)."""
    try:
        if importlib.util.find_spec("xgrammar") is not None:
            return []
    except ValueError:  # a module set to None in sys.modules: imports of it fail, as if it were not installed
        pass
    return [{"package": "xgrammar", "needed_for": XGRAMMAR_FEATURES, "fix": XGRAMMAR_FIX}]


def require_xgrammar(param: str | None = None) -> Any:
    """The xgrammar module (imported under the import lock), or MissingPackageError naming the fix."""
    try:
        with IMPORT_LOCK:  # a native library the API models need not load, never racing transformers' imports
            import xgrammar
    except ImportError:
        raise MissingPackageError(
            f"{param or 'this request'} needs the Python package xgrammar ({XGRAMMAR_FEATURES}), which is not "
            f"installed on this server; install it with: {XGRAMMAR_FIX}", param=param) from None
    return xgrammar
