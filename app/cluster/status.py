"""`cluster status`: nodes, Serve deployments, replicas (the node each runs on) and their engines."""

from __future__ import annotations

import os
from typing import Any

from app.ray_serve import registry
from app.ray_serve.ingress import APP_NAME


def collect() -> dict[str, Any]:
    """Status of the connected cluster as plain data (the `--json` output)."""
    import ray
    from ray import serve

    nodes = []
    for n in ray.nodes():
        res = n.get("Resources", {})
        nodes.append({
            "node_id": n["NodeID"],
            "ip": n.get("NodeManagerAddress", ""),
            "alive": bool(n.get("Alive")),
            "head": "node:__internal_head__" in res,
            "cpus": res.get("CPU", 0),
            "gpus": res.get("GPU", 0),
            "resources": {k: v for k, v in res.items()
                          if not k.startswith("node:") and k not in ("CPU", "GPU", "memory", "object_store_memory")},
            "metrics_export_port": n.get("MetricsExportPort"),
        })
    nodes.sort(key=lambda x: (not x["head"], not x["alive"], x["ip"]))
    by_node = {n["node_id"]: n for n in nodes}
    apps: dict[str, Any] = {}
    try:
        st = serve.status()
        proxies = {k: v.value for k, v in st.proxies.items()}
        for name, app in st.applications.items():
            apps[name] = {
                "status": app.status.value,
                "message": app.message,
                "deployments": {
                    dname: {"status": d.status.value, "replica_states": dict(d.replica_states), "message": d.message}
                    for dname, d in app.deployments.items()
                },
            }
    except Exception as exc:  # Serve not started yet
        proxies = {"error": f"{type(exc).__name__}: {exc}"}
    replicas = []
    for rec in registry.live_records():
        node = by_node.get(rec.get("node_id", ""), {})
        replicas.append({**rec, "node_head": bool(node.get("head")), "node_alive": bool(node.get("alive"))})
    expected = int(os.environ.get("RAY_EXPECTED_WORKERS") or 0)
    return {"nodes": nodes, "proxies": proxies, "applications": apps, "replicas": replicas,
            "expected_workers": expected, "alive_workers": sum(1 for n in nodes if n["alive"] and not n["head"])}


def render(data: dict[str, Any]) -> str:
    lines = ["Nodes:"]
    if data.get("expected_workers"):
        joined = data["alive_workers"]
        lines[0] = (f"Nodes: {joined} of {data['expected_workers']} expected worker(s) alive"
                    + ("" if joined >= data["expected_workers"] else "  <- start ./deploy-ray.sh all on the others"))
    for n in data["nodes"]:
        role = "head" if n["head"] else "worker"
        res = ", ".join(f"{k}={v:g}" for k, v in sorted(n["resources"].items())) or "-"
        lines.append(f"  {n['ip']:<15} {role:<6} {'ALIVE' if n['alive'] else 'DEAD':<5} cpus={n['cpus']:g} "
                     f"gpus={n['gpus']:g} resources: {res}  metrics :{n['metrics_export_port']}")
    lines.append("Deployments:")
    if not data["applications"]:
        lines.append("  (no Serve application)")
    for aname, app in data["applications"].items():
        lines.append(f"  app {aname}: {app['status']}" + (f" ({app['message']})" if app["message"] else ""))
        for dname, d in sorted(app["deployments"].items()):
            states = ", ".join(f"{k}={v}" for k, v in sorted(d["replica_states"].items())) or "no replicas"
            lines.append(f"    {dname:<20} {d['status']:<10} {states}" + (f"  {d['message']}" if d["message"] else ""))
    lines.append("Model replicas:")
    if not data["replicas"]:
        lines.append("  (none)")
    for r in data["replicas"]:
        where = f"{r.get('node_ip', '?')}{' (head)' if r['node_head'] else ''}"
        lines.append(f"  {r.get('deployment', '?'):<20} {r.get('replica_id', '?'):<10} on {where:<22} "
                     f"pid {r.get('pid', '?'):<7} engine={r.get('engine', '?')} device={r.get('device', '?')} "
                     f"reason: {r.get('reason', '')}")
    return "\n".join(lines)


__all__ = ["APP_NAME", "collect", "render"]
