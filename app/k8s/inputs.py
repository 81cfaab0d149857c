"""What a render reads, gathered once: `.env` values, model configs, tiers, compose images, and the pod pieces
every workload shares (labels, Secret references, the ConfigMap and model-cache mounts).

Names follow the VM kit's `.env` (SERVE_PORT, FALLBACK_PORT, NGINX_PORT, RAY_GCS_PORT, HF_TOKEN, API_KEYS, ...).
Secret values are never read from it: HF_TOKEN and API_KEYS reach pods as `secretKeyRef`s to `secret_name`.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from app.k8s.catalogue import Catalogue
from app.k8s.compose import ComposeKit
from app.models.config import ModelConfig

CONFIG_MOUNT = "/etc/llmkit/models"  # where the compose kit mounts MODEL_CONFIG_DIR in ray-head (compose/ray.yml)
CACHE_MOUNT = "/cache/hf"  # HF_CACHE_DIR's mount in every compose service (HF_HOME)
SECRET_KEYS = ("HF_TOKEN", "API_KEYS")  # the secret variables of .env; only ever referenced
KEYS_MOUNT = "/etc/llmkit/keys"  # where the compose kit mounts KEYS_DIR (the keys file, app/tenants)
KEYS_FILE = f"{KEYS_MOUNT}/keys.yaml"
USAGE_DIR = "/var/lib/llmkit-usage"  # per-pod usage database (emptyDir: a pod restart starts it again)
PART_OF = "app.kubernetes.io/part-of"
ROLE = "llmkit.io/role"


@dataclass
class Inputs:
    env: Mapping[str, str]
    configs: list[ModelConfig]
    tiers: dict[str, str]  # deployment name -> tier name
    catalogue: Catalogue
    compose: ComposeKit
    namespace: str = "llmkit"
    name: str = "llmkit"
    secret_name: str = "llmkit-secrets"
    keys_secret: str | None = None  # a Secret whose `keys.yaml` is the keys file (None: API_KEYS only)
    ds_ssh_secret: str = "llmkit-ds-ssh"
    cache_size: str = "200Gi"
    storage_class: str | None = None
    allow_namespaces: list[str] = field(default_factory=list)
    operator_namespace: str = "ray-system"
    monitoring: bool = False
    monitoring_namespace: str = "monitoring"
    deepspeed_as: str | None = None  # None | mpijob | lws
    deepspeed_tier: str = "2xa100"
    deepspeed_workers: int = 2
    env_file: str = ".env"  # named in refusals about .env values
    config_mount: str = CONFIG_MOUNT  # where pods see the model-configs ConfigMap (serveConfigV2's config_dir)

    def get(self, key: str, default: str) -> str:
        return self.env.get(key) or default

    def port(self, key: str, default: int) -> int:
        return int(self.get(key, str(default)))

    @property
    def config_files(self) -> list[str]:
        return [Path(c.source_file).name for c in self.configs]

    # ------------------------------------------------------------------ names and labels

    def n(self, suffix: str) -> str:
        return f"{self.name}-{suffix}"

    def labels(self, role: str) -> dict[str, str]:
        return {PART_OF: self.name, ROLE: role}

    def meta(self, suffix: str, role: str) -> dict[str, Any]:
        return {"name": self.n(suffix), "namespace": self.namespace, "labels": self.labels(role)}

    @property
    def serve_service(self) -> str:
        """The ClusterIP Service KubeRay makes for a RayService's Serve endpoints (`<name>-serve-svc`)."""
        return f"{self.name}-serve-svc"

    # ------------------------------------------------------------------ shared pod pieces

    def secret_env(self) -> list[dict[str, Any]]:
        return [{"name": key, "valueFrom": {"secretKeyRef": {"name": self.secret_name, "key": key,
                                                             "optional": True}}} for key in SECRET_KEYS]

    def common_env(self) -> list[dict[str, Any]]:
        # the cache volume is read-only (filled once): models load from it without trying the hub
        return [*self.secret_env(), {"name": "HF_HOME", "value": CACHE_MOUNT}, {"name": "HF_HUB_OFFLINE", "value": "1"}]

    def keys_env(self, variable: str = "KEYS_FILE") -> list[dict[str, Any]]:
        """The keys file and usage database of a server that mounts the API (none without `keys_secret`)."""
        if not self.keys_secret:
            return []
        return [{"name": variable, "value": KEYS_FILE},
                {"name": "LLM_USAGE_DB", "value": f"{USAGE_DIR}/usage.sqlite"}]

    def keys_volumes(self) -> list[dict[str, Any]]:
        """The keys Secret as a folder (not a subPath: kubelet then updates it in place and servers re-read it)."""
        if not self.keys_secret:
            return []
        return [{"name": "api-keys", "secret": {"secretName": self.keys_secret, "defaultMode": 0o440}},
                {"name": "usage", "emptyDir": {}}]

    def keys_mounts(self) -> list[dict[str, Any]]:
        if not self.keys_secret:
            return []
        return [{"name": "api-keys", "mountPath": KEYS_MOUNT, "readOnly": True},
                {"name": "usage", "mountPath": USAGE_DIR}]

    def env_from(self) -> list[dict[str, Any]]:
        """The `.env` knobs (LLM_*, NGINX_*) every container gets, as compose's env_file gives them."""
        return [{"configMapRef": {"name": self.n("env")}}]

    def volumes(self) -> list[dict[str, Any]]:
        return [{"name": "model-configs", "configMap": {"name": self.n("model-configs")}},
                {"name": "model-cache", "persistentVolumeClaim": {"claimName": self.n("model-cache"),
                                                                  "readOnly": True}}]

    def mounts(self) -> list[dict[str, Any]]:
        return [{"name": "model-configs", "mountPath": self.config_mount, "readOnly": True},
                {"name": "model-cache", "mountPath": CACHE_MOUNT, "readOnly": True}]
