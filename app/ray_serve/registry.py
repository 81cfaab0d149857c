"""Replica records in Ray's GCS key-value store: which engine each replica runs, and where.

Each LLM server replica writes one JSON record when its engine is up and
deletes it on shutdown; `cluster status` reads them and drops records whose
replica actor is gone. This works with the dashboard off (no state API needed).
A record (`ReplicaLocation.record`) is the replica's location plus its `EngineInfo` fields, flat, and `model`.
The key-value store is Ray's `internal_kv`, reached through `app.compat`.
"""

from __future__ import annotations

import json
from typing import Any

from app import compat

PREFIX = "llm-kit/replica/"
NAMESPACE = "llm-kit"


def put(replica_id: str, rec: dict[str, Any]) -> None:
    compat.kv_put(PREFIX + replica_id, json.dumps(rec), namespace=NAMESPACE)


def delete(replica_id: str) -> None:
    compat.kv_del(PREFIX + replica_id, namespace=NAMESPACE)


def _alive(actor_name: str) -> bool:
    import ray

    try:
        ray.get_actor(actor_name, namespace="serve")
        return True
    except ValueError:
        return False


def live_records() -> list[dict[str, Any]]:
    """Records of replicas whose actor still exists (stale ones are removed)."""
    out = []
    for name in compat.kv_list(PREFIX, namespace=NAMESPACE):
        raw = compat.kv_get(name, namespace=NAMESPACE)
        if raw is None:
            continue
        rec = json.loads(raw)
        if rec.get("actor_name") and not _alive(rec["actor_name"]):
            compat.kv_del(name, namespace=NAMESPACE)
            continue
        out.append(rec)
    return sorted(out, key=lambda r: (r.get("deployment", ""), r.get("node_ip", ""), r.get("replica_id", "")))
