"""Several alternating rounds of the layer comparison summed up: medians, ranges and paired ratios.

`summarize(rounds, pairs)` takes the reports of every round (round -> layer -> report of `app.client.loadgen`)
and gives, per layer and concurrency level, the median req/s and its range over the rounds, the medians of the
latencies and of the CPU each process role used, the load average of each round; and per pair (a kit layer and the
system it answers to: its anchor, or the kit's layer below), the ratio of req/s taken within each round (the two
systems ran minutes apart there, on the same machine state) as median and range. A box shared with other work
moves from round to round: only same-round ratios over several rounds say anything (DESIGN.md).
"""

from __future__ import annotations

import statistics
from typing import Any

Reports = dict[str, dict[str, Any]]


def _median(values: list[float]) -> float | None:
    return round(statistics.median(values), 4) if values else None


def _level(report: dict[str, Any], c: int) -> dict[str, Any] | None:
    return next((lv for lv in report["levels"] if lv["concurrency"] == c), None)


def _spread(values: list[float]) -> dict[str, Any]:
    return {"median": _median(values), "min": min(values) if values else None, "max": max(values) if values else None,
            "n": len(values)}


def layer_summary(rounds: list[Reports], layer: str) -> list[dict[str, Any]]:
    """Per level of `layer`: req/s median and range, latency and CPU medians, over the rounds it ran in."""
    reports = [r[layer] for r in rounds if layer in r]
    levels = sorted({lv["concurrency"] for rep in reports for lv in rep["levels"]})
    out = []
    for c in levels:
        lvs = [lv for rep in reports if (lv := _level(rep, c)) is not None]
        roles = sorted({k for lv in lvs for k in (lv.get("cpu_share") or {})})
        cpu = {k: _median([(lv.get("cpu_share") or {}).get(k, 0.0) for lv in lvs]) for k in roles}
        out.append({
            "concurrency": c,
            "req_per_s": _spread([lv["req_per_s"] for lv in lvs]),
            "ttft_p50_s": _median([lv["ttft_s"]["p50"] for lv in lvs if lv["ttft_s"]["p50"] is not None]),
            "e2e_p50_s": _median([lv["e2e_s"]["p50"] for lv in lvs if lv["e2e_s"]["p50"] is not None]),
            "e2e_p95_s": _median([lv["e2e_s"]["p95"] for lv in lvs if lv["e2e_s"]["p95"] is not None]),
            "ok": sum(lv["ok"] for lv in lvs), "failed": sum(lv["failed"] for lv in lvs),
            "cpu_share": {k: v for k, v in sorted(cpu.items(), key=lambda kv: -(kv[1] or 0)) if v},
        })
    return out


def paired(rounds: list[Reports], layer: str, ref: str) -> list[dict[str, Any]]:
    """Per level: req/s of `layer` ÷ req/s of `ref`, taken within each round both ran in."""
    per_level: dict[int, list[float]] = {}
    for r in rounds:
        if layer not in r or ref not in r:
            continue
        for lv in r[layer]["levels"]:
            other = _level(r[ref], lv["concurrency"])
            if other and other["req_per_s"] and lv["ok"]:
                per_level.setdefault(lv["concurrency"], []).append(round(lv["req_per_s"] / other["req_per_s"], 4))
    return [{"concurrency": c, **_spread(v), "per_round": v} for c, v in sorted(per_level.items())]


def summarize(rounds: list[Reports], layers: list[str], pairs: list[tuple[str, str]]) -> dict[str, Any]:
    present = [x for x in layers if any(x in r for r in rounds)]
    return {
        "rounds": len(rounds),
        "layers": {x: layer_summary(rounds, x) for x in present},
        "threads": {x: next((r[x].get("threads") for r in reversed(rounds) if x in r), None) for x in present},
        "threads_chosen": {x: next((r[x]["target"].get("threads_chosen") for r in reversed(rounds) if x in r), None)
                           for x in present},
        "loadavg_1m": {x: [r[x]["machine"].get("loadavg_1m") for r in rounds if x in r] for x in present},
        "ratios": [{"layer": a, "reference": b, "levels": paired(rounds, a, b)} for a, b in pairs
                   if a in present and b in present],
    }


def _fmt_spread(s: dict[str, Any], digits: int = 1) -> tuple[str, str]:
    if s["median"] is None:
        return "-", "-"
    return f"{s['median']:.{digits}f}", f"{s['min']:.{digits}f}-{s['max']:.{digits}f}"


def markdown(summary: dict[str, Any], levels: list[int]) -> list[str]:
    """The summary as markdown lines: req/s per layer, paired ratios, CPU by process, threads, load."""
    n = summary["rounds"]
    out = [f"Over {n} round(s), systems started fresh and run in alternation (every other round reversed): "
           "median req/s (range over the rounds)", "",
           "| layer | " + " | ".join(f"c={c}" for c in levels) + " | e2e p50 (median) | failed |",
           "|---|" + "---:|" * len(levels) + "---|---:|"]
    for layer, rows in summary["layers"].items():
        by_c = {r["concurrency"]: r for r in rows}
        cells = []
        for c in levels:
            if c not in by_c:
                cells.append("-")
                continue
            med, rng = _fmt_spread(by_c[c]["req_per_s"])
            cells.append(f"{med} ({rng})")
        e2e = " / ".join(f"{r['e2e_p50_s'] * 1000:.0f} ms" if r["e2e_p50_s"] else "-" for r in rows)
        out.append(f"| {layer} | " + " | ".join(cells) + f" | {e2e} | {sum(r['failed'] for r in rows)} |")
    if summary["ratios"]:
        out += ["", "Paired ratios of req/s (within each round; median and range over the rounds):", "",
                "| ratio | " + " | ".join(f"c={c}" for c in levels) + " |", "|---|" + "---:|" * len(levels)]
        for pair in summary["ratios"]:
            by_c = {r["concurrency"]: r for r in pair["levels"]}
            cells = []
            for c in levels:
                if c not in by_c:
                    cells.append("-")
                    continue
                med, rng = _fmt_spread(by_c[c], 2)
                cells.append(f"**{med}** ({rng})")
            out.append(f"| {pair['layer']} ÷ {pair['reference']} | " + " | ".join(cells) + " |")
    out += ["", "CPU by process (cores busy on average while the level ran, median over the rounds; "
            "bench/cpu_share.py):", "", "| layer | c | CPU by process |", "|---|---:|---|"]
    for layer, rows in summary["layers"].items():
        for r in rows:
            out.append(f"| {layer} | {r['concurrency']} | "
                       + ", ".join(f"{k} {v:.2f}" for k, v in r["cpu_share"].items()) + " |")
    out += ["", "Threads each process ran with (OS threads, the OMP_NUM_THREADS it started with; bench/threads.py) "
            "and what the kit's /readyz says it chose:", "", "| layer | processes | kit's choice |", "|---|---|---|"]
    for layer, th in summary["threads"].items():
        procs = "; ".join(f"{k}: {v['os_threads']} threads, OMP {v['omp_num_threads']}"
                          + (f" (×{v['processes']})" if v["processes"] > 1 else "") for k, v in (th or {}).items())
        chosen = summary["threads_chosen"].get(layer) or "-"
        out.append(f"| {layer} | {procs or '-'} | {chosen} |")
    out += ["", "Load average (1 min) when each layer finished, per round: "
            + "; ".join(f"{k} {', '.join(str(x) for x in v)}" for k, v in summary["loadavg_1m"].items())]
    return out
