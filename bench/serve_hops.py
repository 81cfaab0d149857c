"""Where a request's time went inside Ray Serve, from Serve's own access logs: replica, ingress, proxy.

Every Serve actor writes one access line per request it handled, with the request id the proxy assigned and
its own duration (`logs/serve/proxy_<ip>.log`: `POST /v1/completions 200 48.2ms`; the ingress replica
`replica_<app>_ingress_*.log`: the same; the model replica `replica_<app>_<model>_*.log`:
`CALL generate OK 40.1ms`). Matching the three lines of a request gives, per request, the model replica's
time (the engine's generation plus the replica's own streaming), what the ingress added on top (the API
router, the handle call and the stream's trip back) and what the proxy added (HTTP, routing, the trip to the
client). `hops(log_dir, since, until)` returns the medians of these over the requests that ended in the
window (wall-clock seconds), in ms. Under Serve's direct ingress (the kit's default) the ingress replica serves
HTTP itself: there is no proxy line, and no `proxy_added_ms`.
"""

from __future__ import annotations

import datetime as dt
import re
import statistics
from pathlib import Path
from typing import Any

_LINE = re.compile(r"^INFO (\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3}) \S+ \S+ (\S+) -- (.*) (\d+(?:\.\d+)?)ms$")


def _access(paths: list[Path]) -> dict[str, tuple[float, float]]:
    """request id -> (end time as epoch seconds, duration ms) from Serve access lines."""
    out: dict[str, tuple[float, float]] = {}
    for path in paths:
        for line in path.read_text(errors="replace").splitlines():
            m = _LINE.match(line.strip())
            if m is None or not (m.group(3).startswith(("POST ", "GET ", "CALL "))):
                continue
            when = dt.datetime.strptime(m.group(1), "%Y-%m-%d %H:%M:%S,%f").astimezone().timestamp()
            out[m.group(2)] = (when, float(m.group(4)))
    return out


def hops(log_dir: Path, since: float, until: float, ingress: str = "ingress") -> dict[str, Any] | None:
    """Median ms per hop of the requests the outer hop (the proxy; the ingress under direct ingress) finished in
    [since, until]; None without matching lines."""
    proxy = _access(sorted(log_dir.glob("proxy_*.log")))
    ing = _access(sorted(log_dir.glob(f"replica_*_{ingress}_*.log")))
    model = _access([p for p in sorted(log_dir.glob("replica_*.log")) if f"_{ingress}_" not in p.name])

    def ended(lines: dict[str, tuple[float, float]]) -> list[str]:
        return [rid for rid, (end, _) in lines.items() if since <= end <= until and rid in model]

    ids = ended(proxy)
    outer = proxy
    if not ids:  # direct ingress: no proxy line, the ingress is the outer hop
        ids, outer = ended(ing), {}
    if not ids:
        return None
    out: dict[str, Any] = {"requests": len(ids), "replica_ms": round(statistics.median(model[r][1] for r in ids), 1)}
    with_ing = [r for r in ids if r in ing]
    if with_ing:
        out["ingress_added_ms"] = round(statistics.median(ing[r][1] - model[r][1] for r in with_ing), 1)
    if outer:
        inner = ing if with_ing else model
        out["proxy_added_ms"] = round(statistics.median(outer[r][1] - inner[r][1] for r in with_ing or ids), 1)
    return out
