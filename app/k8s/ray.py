"""The KubeRay RayService: serveConfigV2 from the one Serve application entry, a CPU-only head, one worker group
per tier the model configs use.

`serve_config` is the Serve config the VM deploy applies too (`app.ray_serve.application`): the same import
path and builder args, the config files read from the ConfigMap's mount path. `ray_start_line` writes down the
translation KubeRay makes of a group's `rayStartParams` into the `ray start` line its container runs (tested,
and used to start the worker nodes of the real-cluster test).
"""

from __future__ import annotations

import json
from typing import Any

import yaml

from app.k8s.catalogue import Tier
from app.k8s.inputs import Inputs
from app.ray_serve.application import application, http_options

RAY_VERSION = "2.60.0"  # pyproject's ray[serve] pin: the images' Ray
GPU = "nvidia.com/gpu"


def serve_config(inp: Inputs) -> dict[str, Any]:
    """Serve's config (ServeDeploySchema) for serveConfigV2: Serve's proxy on the head, the app from its builder."""
    keys = {e["name"]: e["value"] for e in inp.keys_env()}
    entry = application(inp.config_files, config_dir=inp.config_mount, api_keys_env="API_KEYS",
                        max_body_bytes=inp.port("LLM_MAX_BODY_BYTES", 4 * 1024 * 1024),
                        keys_file=keys.get("KEYS_FILE", ""), usage_db=keys.get("LLM_USAGE_DB", ""))
    return {"proxy_location": "HeadOnly",
            "http_options": http_options("0.0.0.0", inp.port("SERVE_PORT", 8000),
                                         float(inp.get("SERVE_REQUEST_TIMEOUT_S", "300"))),
            "applications": [entry]}


def ray_start_line(params: dict[str, str], *, head: bool, address: str = "") -> str:
    """The shell line KubeRay runs for a Ray container: `ray start` plus `--key=value` per rayStartParams entry
    (the value as written, so the shell strips one level of quoting: `resources: '"{\\"t\\": 1}"'` reaches Ray
    as `{"t": 1}`), `--key` alone for a value of "true" (flags such as `block`), `--head` on the head and
    `--address=<head service>:<gcs port>` on workers, `--block` always. KubeRay adds flags of its own when a
    param is absent (num-cpus / memory / num-gpus from the container's limits, metrics and agent ports)."""
    parts = ["ray", "start", "--head" if head else f"--address={address}"]
    for key, value in sorted(params.items()):
        parts.append(f"--{key}" if value.lower() == "true" else f"--{key}={value}")
    return " ".join([*parts, "--block"])


def _resources_param(resources: dict[str, float]) -> str:
    """KubeRay's quoting of a JSON rayStartParams value: the JSON, escaped, inside double quotes."""
    body = json.dumps({k: int(v) if float(v).is_integer() else v for k, v in resources.items()})
    return '"' + body.replace('"', '\\"') + '"'


def tolerations(tier: Tier) -> list[dict[str, Any]]:
    out = [{"key": t.key, "operator": "Equal", "value": t.value, "effect": t.effect} if t.value
           else {"key": t.key, "operator": "Exists", "effect": t.effect} for t in tier.taints]
    if tier.gpus and not any(t["key"] == GPU for t in out):
        out.append({"key": GPU, "operator": "Exists", "effect": "NoSchedule"})
    return out


def _common_params(inp: Inputs) -> dict[str, str]:
    return {"metrics-export-port": str(inp.port("RAY_METRICS_EXPORT_PORT", 8090)),
            "object-store-memory": str(inp.port("RAY_OBJECT_STORE_MB", 1024) * 1024 * 1024)}


def _ray_env(inp: Inputs) -> list[dict[str, Any]]:
    return [*inp.common_env(), {"name": "MODEL_CONFIG_DIR", "value": inp.config_mount},
            {"name": "MODEL_CONFIGS", "value": ",".join(inp.config_files)}]


def head_group(inp: Inputs) -> dict[str, Any]:
    image = inp.compose.service("ray-head").image
    head = inp.catalogue.head
    params = {**_common_params(inp), "num-gpus": "0", "dashboard-host": "0.0.0.0"}
    ports = [("gcs-server", inp.port("RAY_GCS_PORT", 6379)), ("dashboard", inp.port("RAY_DASHBOARD_PORT", 8265)),
             ("client", inp.port("RAY_CLIENT_PORT", 10001)), ("serve", inp.port("SERVE_PORT", 8000)),
             ("metrics", inp.port("RAY_METRICS_EXPORT_PORT", 8090))]
    container = {
        "name": "ray-head", "image": image,
        "ports": [{"name": n, "containerPort": p} for n, p in ports],
        "env": _ray_env(inp), "envFrom": inp.env_from(), "volumeMounts": [*inp.mounts(), *inp.keys_mounts()],
        "resources": {"requests": {"cpu": head.cpu.request, "memory": head.memory.request},
                      "limits": {"cpu": head.cpu.limit, "memory": head.memory.limit}},
    }
    return {"rayStartParams": params, "template": {"metadata": {"labels": inp.labels("ray-head")},
                                                   "spec": {"containers": [container],
                                                            "volumes": [*inp.volumes(), *inp.keys_volumes()]}}}


def worker_params(inp: Inputs, tier: Tier) -> dict[str, str]:
    return {**_common_params(inp), "num-gpus": str(tier.gpus),
            "resources": _resources_param({tier.resource: tier.resource_slots})}


def worker_group(inp: Inputs, name: str, tier: Tier) -> dict[str, Any]:
    service = "ray-worker" if tier.gpus else "ray-worker-cpu"
    image = inp.compose.service(service).image
    env = _ray_env(inp)
    if not tier.gpus:  # the CPU worker's vLLM settings, as compose gives them (compose/ray.yml)
        compose_env = inp.compose.environment(service, lambda k: k.startswith("VLLM_CPU_"))
        env += [{"name": k, "value": v} for k, v in sorted(compose_env.items())]
    limits: dict[str, Any] = {"cpu": tier.cpu.limit, "memory": tier.memory.limit}
    if tier.gpus:
        limits[GPU] = tier.gpus
    container = {"name": "ray-worker", "image": image, "env": env, "envFrom": inp.env_from(),
                 "volumeMounts": inp.mounts(),
                 "ports": [{"name": "metrics", "containerPort": inp.port("RAY_METRICS_EXPORT_PORT", 8090)}],
                 "resources": {"requests": {"cpu": tier.cpu.request, "memory": tier.memory.request}, "limits": limits}}
    spec: dict[str, Any] = {"containers": [container], "volumes": inp.volumes()}
    if tier.node_selector:
        spec["nodeSelector"] = dict(tier.node_selector)
    if tolerations(tier):
        spec["tolerations"] = tolerations(tier)
    return {"groupName": name, "replicas": tier.min_workers, "minReplicas": tier.min_workers,
            "maxReplicas": tier.max_workers, "rayStartParams": worker_params(inp, tier),
            "template": {"metadata": {"labels": {**inp.labels("ray-worker"), "llmkit.io/tier": name}}, "spec": spec}}


def rayservice(inp: Inputs) -> dict[str, Any]:
    used = [t for t in inp.catalogue.tiers if t in set(inp.tiers.values())]
    return {
        "apiVersion": "ray.io/v1", "kind": "RayService",
        "metadata": {"name": inp.name, "namespace": inp.namespace, "labels": inp.labels("ray")},
        "spec": {
            "serveConfigV2": yaml.safe_dump(serve_config(inp), sort_keys=False),
            "rayClusterConfig": {
                "rayVersion": RAY_VERSION,
                "enableInTreeAutoscaling": True,
                "autoscalerOptions": {"idleTimeoutSeconds": 300},
                "authOptions": {"mode": "token"},
                "headGroupSpec": head_group(inp),
                "workerGroupSpecs": [worker_group(inp, t, inp.catalogue.tiers[t]) for t in used],
            },
        },
    }
