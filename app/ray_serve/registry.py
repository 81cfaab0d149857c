"""Replica records in Ray's GCS key-value store: which engine each replica runs, and where.

Each LLM server replica writes one JSON record when its engine is up and
deletes it on shutdown; `cluster status` reads them and drops records whose
replica actor is gone. This works with the dashboard off (no state API needed).
"""

from __future__ import annotations

import json
from typing import Any

PREFIX = "llm-kit/replica/"
NAMESPACE = "llm-kit"


def put(replica_id: str, record: dict[str, Any]) -> None:
    from ray.experimental import internal_kv

    internal_kv._internal_kv_put(PREFIX + replica_id, json.dumps(record), overwrite=True, namespace=NAMESPACE)


def delete(replica_id: str) -> None:
    from ray.experimental import internal_kv

    internal_kv._internal_kv_del(PREFIX + replica_id, namespace=NAMESPACE)


def _alive(actor_name: str) -> bool:
    import ray

    try:
        ray.get_actor(actor_name, namespace="serve")
        return True
    except ValueError:
        return False


def live_records() -> list[dict[str, Any]]:
    """Records of replicas whose actor still exists (stale ones are removed)."""
    from ray.experimental import internal_kv

    out = []
    for key in internal_kv._internal_kv_list(PREFIX, namespace=NAMESPACE):
        name = key.decode() if isinstance(key, bytes) else key
        raw = internal_kv._internal_kv_get(name, namespace=NAMESPACE)
        if raw is None:
            continue
        record = json.loads(raw)
        if record.get("actor_name") and not _alive(record["actor_name"]):
            internal_kv._internal_kv_del(name, namespace=NAMESPACE)
            continue
        out.append(record)
    return sorted(out, key=lambda r: (r.get("deployment", ""), r.get("node_ip", ""), r.get("replica_id", "")))
