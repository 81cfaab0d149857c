"""Root causes of vLLM's process failures, instead of "EngineCore encountered an issue".

vLLM runs its engine in child processes and itself only says "See stack trace (above)". Our plugin
(`app.engines.vllm.plugins.install_error_log`) writes every ERROR record of those processes to a per-engine file;
`root_cause` names the first exception recorded there, else how an EngineCore process ended (a signal, an exit
status). That is what /readyz, /v1/models, the 503 messages and the metric labels carry.
"""

from __future__ import annotations

import json
import logging
import os
import signal
from typing import Any

from app import compat

log = logging.getLogger(__name__)


def root_cause(error_log: str | None, exits: dict[str, int | None]) -> str | None:
    """The first exception vLLM's processes logged, else how an EngineCore process ended; None if unknown."""
    records: list[dict[str, Any]] = []
    if error_log and os.path.exists(error_log):
        with open(error_log, encoding="utf-8", errors="replace") as f:
            for line in f:
                try:
                    records.append(json.loads(line))
                except ValueError:
                    continue
    with_exc = [r for r in records if r.get("exception")]
    if with_exc:
        first = with_exc[0]  # later records are the same failure re-raised by the parents
        return f"{first.get('process') or 'vLLM process'} pid {first.get('pid')}: {first['exception']}"
    for name, code in exits.items():
        if code is not None and code < 0:
            try:
                how = f"was killed by {signal.Signals(-code).name}"
            except ValueError:
                how = f"was killed by signal {-code}"
            return f"vLLM's {name} process {how}"
        if code:
            return f"vLLM's {name} process exited with status {code}"
    if records:
        return records[0]["message"]
    return None


def engine_core_exits(llm: Any) -> dict[str, int | None]:
    """Exit codes of the EngineCore processes of an AsyncLLM ({} before it exists)."""
    if llm is None:
        return {}
    try:
        processes = compat.vllm_engine_core_processes(llm)
    except compat.CompatError as exc:  # start() raised it already; here it must not hide the error being named
        log.warning("%s", exc)
        return {}
    return {f"{p.name} (pid {p.pid})": p.exitcode for p in processes}


class VLLMStartError(RuntimeError):
    """vLLM failed to start; the message leads with the root cause its processes logged."""
