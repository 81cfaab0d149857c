"""Refusals before anything is written, like the VM preflight: each a one-line `K8sError` naming file and key.

- a config that names no tier, or a tier resource the catalogue does not carry;
- more GPUs per replica than a worker of its tier has, or tensor x pipeline parallel beyond one worker;
- more replicas x GPUs than the worker group can grow to;
- a secret inline: a model config that carries a token/key/password value (it would land in the ConfigMap
  and in serveConfigV2); secrets reach pods only as Secret references.
"""

from __future__ import annotations

import re
from typing import Any

from app.k8s.catalogue import Catalogue, K8sError, Tier
from app.models.config import ModelConfig

_SECRET_KEY = re.compile(r"(?i)(^|_)(token|secret|password|passwd|api_keys?|secret_access_key|private_key)$")
SECRET_VALUE = re.compile(r"\bhf_[A-Za-z0-9]{20,}\b|\bsk-[A-Za-z0-9_-]{20,}\b")
RESOURCES_KEY = "deployment_config.ray_actor_options.resources"


def _walk(value: Any, path: str) -> list[tuple[str, Any]]:
    if isinstance(value, dict):
        return [kv for k, v in value.items() for kv in [(f"{path}.{k}", v), *_walk(v, f"{path}.{k}")]]
    if isinstance(value, list):
        return [kv for i, v in enumerate(value) for kv in _walk(v, f"{path}.{i}")]
    return []


def secret_inline(cfg: ModelConfig) -> str | None:
    """The dotted key of a secret value written into the config, if any."""
    for section in ("runtime_env", "engine_kwargs", "deployment_config"):
        for key, value in _walk(getattr(cfg, section), section):
            leaf = key.rsplit(".", 1)[-1]
            if _SECRET_KEY.search(leaf) and isinstance(value, str) and value:
                return key
            if isinstance(value, str) and SECRET_VALUE.search(value):
                return key
    return None


def tier_of(cfg: ModelConfig, cat: Catalogue) -> tuple[str, Tier]:
    """The catalogue tier whose Ray resource the config requests (exactly one)."""
    actor = cfg.deployment_options()["ray_actor_options"]
    resources: dict[str, float] = actor.get("resources") or {}
    where = f"{cfg.source_file}: {RESOURCES_KEY}"
    if not resources:
        raise K8sError(f"{where}: names no tier; request one of the catalogue's resources "
                       f"({', '.join(t.resource for t in cat.tiers.values())}) so the replica lands on its group")
    known = [(r, cat.by_resource(r)) for r in resources]
    unknown = [r for r, hit in known if hit is None]
    if unknown:
        raise K8sError(f"{where}.{unknown[0]}: tier resource {unknown[0]!r} is not in the tier catalogue "
                       f"{cat.source} (it has {', '.join(sorted(t.resource for t in cat.tiers.values()))})")
    tiers = {hit[0]: hit for _, hit in known if hit is not None}
    if len(tiers) > 1:
        raise K8sError(f"{where}: requests {len(tiers)} tiers ({', '.join(sorted(tiers))}); a replica runs on one")
    name, tier = next(iter(tiers.values()))
    amount = float(resources[tier.resource])
    if amount > tier.resource_slots:
        raise K8sError(f"{where}.{tier.resource}: {amount:g} per replica but a {name!r} worker carries "
                       f"{tier.resource_slots:g}")
    return name, tier


def _replicas(cfg: ModelConfig) -> tuple[int, str]:
    opts = cfg.deployment_options()
    auto = opts.get("autoscaling_config")
    if isinstance(auto, dict) and "max_replicas" in auto:
        return int(auto["max_replicas"]), "deployment_config.autoscaling_config.max_replicas"
    if auto is not None and hasattr(auto, "max_replicas"):
        return int(auto.max_replicas), "deployment_config.autoscaling_config.max_replicas"
    return int(opts.get("num_replicas") or 1), "deployment_config.num_replicas"


def check_config(cfg: ModelConfig, cat: Catalogue) -> str:
    """The tier name the config runs on; K8sError naming file and key when it cannot."""
    key = secret_inline(cfg)
    if key:
        raise K8sError(f"{cfg.source_file}: {key}: a secret value inline (it would be written into the ConfigMap "
                       "and serveConfigV2); put it in the Secret the render references and remove it here")
    name, tier = tier_of(cfg, cat)
    actor = cfg.deployment_options()["ray_actor_options"]
    gpus = float(actor.get("num_gpus") or 0)
    if gpus > tier.gpus:
        raise K8sError(f"{cfg.source_file}: deployment_config.ray_actor_options.num_gpus: {gpus:g} GPUs per replica "
                       f"but a {name!r} worker has {tier.gpus}")
    tp = int(cfg.engine_kwargs.get("tensor_parallel_size") or 1)
    pp = int(cfg.engine_kwargs.get("pipeline_parallel_size") or 1)
    if tp * pp > max(tier.gpus, 1) or (tp * pp > 1 and tier.gpus == 0):
        raise K8sError(f"{cfg.source_file}: engine_kwargs.tensor_parallel_size: {tp} x pipeline {pp} = {tp * pp} "
                       f"GPUs in one replica but a {name!r} worker has {tier.gpus} (a replica cannot span pods)")
    replicas, where = _replicas(cfg)
    per_replica = max(gpus, float(tp * pp) if tier.gpus else 0.0)
    if per_replica and replicas * per_replica > tier.max_workers * tier.gpus:
        raise K8sError(f"{cfg.source_file}: {where}: {replicas} replicas x {per_replica:g} GPUs but the {name!r} "
                       f"worker group grows to {tier.max_workers} x {tier.gpus} GPUs (raise max_workers in "
                       f"{cat.source})")
    return name
