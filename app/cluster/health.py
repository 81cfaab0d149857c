"""`cluster health`: the head container's healthcheck (standard library only: it runs every few seconds).

Healthy = the GCS port answers on NODE_IP and, when a Serve app was deployed (a deploy record exists), Serve
lists the app's route on SERVE_HOST:SERVE_PORT (`/-/routes`: the ingress replica answers it under direct ingress,
the proxy otherwise). A head restarted without its app is unhealthy until the redeploy finishes.
"""

from __future__ import annotations

import json
import socket
import urllib.request

from app.cluster import record


def check(node_ip: str, gcs_port: int, serve_host: str, serve_port: int) -> str | None:
    """None when healthy, else what is wrong."""
    try:
        socket.create_connection((node_ip, gcs_port), 3).close()
    except OSError as exc:
        return f"GCS {node_ip}:{gcs_port} does not answer: {exc}"
    if record.load() is None:
        return None
    return serve_routes_problem(serve_host, serve_port)


def serve_routes_problem(serve_host: str, serve_port: int) -> str | None:
    """None when Serve lists a route on host:port (`/-/routes`), else what is wrong."""
    url = f"http://{serve_host}:{serve_port}/-/routes"
    try:
        with urllib.request.urlopen(url, timeout=4) as resp:
            routes = json.loads(resp.read() or b"{}")
    except (OSError, ValueError) as exc:
        return f"the deployed Serve app is not served ({url}: {exc})"
    if not routes:
        return f"the deployed Serve app is not served ({url} lists no route)"
    return None
