"""The plain Kubernetes objects around the RayService: Namespace, ConfigMaps, the model-cache PVC, ClusterIP
Services, NetworkPolicies, the fallback server and the nginx front door (Deployments running the compose
services' images and `python -m app` entrypoints), and the optional PodMonitor / ServiceMonitor.

NetworkPolicies: everything in the namespace is denied ingress by default; Ray pods reach each other on every
port (and nothing else reaches Ray's ports but the KubeRay operator's namespace, on the dashboard and Serve
ports); Serve and the fallback are reached by the front door only; the front door by the namespaces named
with --allow-namespace (none: nobody, until you name one).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from app.k8s.catalogue import K8sError
from app.k8s.checks import SECRET_VALUE
from app.k8s.inputs import PART_OF, ROLE, Inputs

_ENV_PASSED = re.compile(r"^(LLM|NGINX)_[A-Z0-9_]+$")
_SECRETISH = re.compile(r"(?i)(^|_)(token|secret|password|passwd|api_keys?|key)$")
# set per workload by the render (addresses and ports of the Kubernetes objects), never copied from .env
_OWN = {"NGINX_BIND", "NGINX_PRIMARY", "NGINX_BACKUPS", "NGINX_PORT", "NGINX_ACCESS_LOG", "NGINX_ERROR_LOG",
        "LLM_HOST", "LLM_PORT", "LLM_USAGE_DB"}


def namespace(inp: Inputs) -> dict[str, Any]:
    return {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": inp.namespace,
                                                                   "labels": {PART_OF: inp.name}}}


def config_map(inp: Inputs) -> dict[str, Any]:
    data = {Path(c.source_file).name: Path(c.source_file).read_text() for c in inp.configs}
    return {"apiVersion": "v1", "kind": "ConfigMap", "metadata": inp.meta("model-configs", "config"), "data": data}


def env_config_map(inp: Inputs) -> dict[str, Any]:
    """The `.env` serving and front-door knobs (LLM_*, NGINX_*), as compose's env_file gives them to containers."""
    data = {k: v for k, v in sorted(inp.env.items())
            if _ENV_PASSED.match(k) and not _SECRETISH.search(k) and k not in _OWN and v != ""}
    leaked = next((k for k, v in data.items() if SECRET_VALUE.search(v)), None)
    if leaked:
        raise K8sError(f"{inp.env_file}: {leaked}: a secret value inline (it would be written into a ConfigMap); "
                       "secrets reach pods only from the Secret the render references")
    return {"apiVersion": "v1", "kind": "ConfigMap", "metadata": inp.meta("env", "config"), "data": data}


def model_cache(inp: Inputs) -> dict[str, Any]:
    spec: dict[str, Any] = {"accessModes": ["ReadOnlyMany"], "resources": {"requests": {"storage": inp.cache_size}}}
    if inp.storage_class:
        spec["storageClassName"] = inp.storage_class
    return {"apiVersion": "v1", "kind": "PersistentVolumeClaim", "metadata": inp.meta("model-cache", "cache"),
            "spec": spec}


def service(inp: Inputs, suffix: str, role: str, port: int) -> dict[str, Any]:
    return {"apiVersion": "v1", "kind": "Service", "metadata": inp.meta(suffix, role),
            "spec": {"type": "ClusterIP", "selector": inp.labels(role),
                     "ports": [{"name": "http", "port": port, "targetPort": port, "protocol": "TCP"}]}}


def with_option(cmd: list[str], flag: str, value: str) -> list[str]:
    """`cmd` with the value after `flag` replaced (appended when absent)."""
    if flag in cmd:
        i = cmd.index(flag)
        return [*cmd[: i + 1], value, *cmd[i + 2:]]
    return [*cmd, flag, value]


def _deployment(inp: Inputs, suffix: str, role: str, container: dict[str, Any],
                volumes: list[dict[str, Any]]) -> dict[str, Any]:
    return {"apiVersion": "apps/v1", "kind": "Deployment", "metadata": inp.meta(suffix, role),
            "spec": {"replicas": 1, "selector": {"matchLabels": inp.labels(role)},
                     "template": {"metadata": {"labels": inp.labels(role)},
                                  "spec": {"containers": [container], "volumes": volumes}}}}


def fallback(inp: Inputs) -> dict[str, Any]:
    svc = inp.compose.service("fallback")
    port = inp.port("FALLBACK_PORT", 8001)
    probe = {"httpGet": {"path": "/readyz", "port": port}, "periodSeconds": 15, "timeoutSeconds": 5}
    container = {
        "name": "fallback", "image": svc.image,
        "command": with_option(svc.command, "--host", "0.0.0.0"),  # the pod's address: the front door is elsewhere
        "ports": [{"name": "http", "containerPort": port}],
        "env": [*inp.common_env(), *inp.keys_env()], "envFrom": inp.env_from(),
        "volumeMounts": [*(m for m in inp.mounts() if m["name"] == "model-cache"), *inp.keys_mounts()],
        "readinessProbe": probe, "startupProbe": {**probe, "failureThreshold": 40},
    }
    return _deployment(inp, "fallback", "fallback", container,
                       [*(v for v in inp.volumes() if v["name"] == "model-cache"), *inp.keys_volumes()])


def front_door(inp: Inputs) -> dict[str, Any]:
    svc = inp.compose.service("nginx")
    port = inp.port("NGINX_PORT", 8080)
    keep = inp.compose.environment("nginx", lambda k: k in ("NGINX_ACCESS_LOG", "NGINX_ERROR_LOG",
                                                            "NGINX_STATUS_PORT"))
    env = {**keep, "NGINX_BIND": "0.0.0.0", "NGINX_PORT": str(port),
           "NGINX_PRIMARY": f"{inp.serve_service}.{inp.namespace}.svc:{inp.port('SERVE_PORT', 8000)}",
           "NGINX_BACKUPS": f"{inp.n('fallback')}.{inp.namespace}.svc:{inp.port('FALLBACK_PORT', 8001)}"}
    container = {
        "name": "nginx", "image": svc.image, "command": svc.command,
        "ports": [{"name": "http", "containerPort": port}],
        "env": [{"name": k, "value": v} for k, v in env.items()], "envFrom": inp.env_from(),
        "readinessProbe": {"httpGet": {"path": "/nginx-health", "port": port}, "periodSeconds": 15},
    }
    return _deployment(inp, "front-door", "front-door", container, [])


# ----------------------------------------------------------------------------- NetworkPolicies


def _policy(inp: Inputs, suffix: str, selector: dict[str, Any], rules: list[dict[str, Any]]) -> dict[str, Any]:
    spec: dict[str, Any] = {"podSelector": selector, "policyTypes": ["Ingress"]}
    if rules:
        spec["ingress"] = rules
    return {"apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy", "metadata": inp.meta(suffix, "policy"),
            "spec": spec}


def _ns(name: str) -> dict[str, Any]:
    return {"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": name}}}


def _ports(*ports: int) -> list[dict[str, Any]]:
    return [{"protocol": "TCP", "port": p} for p in ports]


def network_policies(inp: Inputs) -> list[dict[str, Any]]:
    ray = {"matchLabels": {PART_OF: inp.name},
           "matchExpressions": [{"key": ROLE, "operator": "In", "values": ["ray-head", "ray-worker"]}]}
    head = {"matchLabels": inp.labels("ray-head")}
    front = {"podSelector": {"matchLabels": inp.labels("front-door")}}
    serve_port, fallback_port = inp.port("SERVE_PORT", 8000), inp.port("FALLBACK_PORT", 8001)
    out = [
        _policy(inp, "default-deny", {}, []),
        _policy(inp, "ray-internal", ray, [{"from": [{"podSelector": ray}]}]),
        _policy(inp, "ray-operator", head, [{"from": [_ns(inp.operator_namespace)],
                                             "ports": _ports(inp.port("RAY_DASHBOARD_PORT", 8265), serve_port)}]),
        _policy(inp, "serve-from-front-door", head, [{"from": [front], "ports": _ports(serve_port)}]),
        _policy(inp, "fallback-from-front-door", {"matchLabels": inp.labels("fallback")},
                [{"from": [front], "ports": _ports(fallback_port)}]),
    ]
    if inp.allow_namespaces:
        out.append(_policy(inp, "api", {"matchLabels": inp.labels("front-door")},
                           [{"from": [_ns(ns) for ns in inp.allow_namespaces],
                             "ports": _ports(inp.port("NGINX_PORT", 8080))}]))
    if inp.monitoring:
        metrics = inp.port("RAY_METRICS_EXPORT_PORT", 8090)
        out.append(_policy(inp, "ray-metrics", ray, [{"from": [_ns(inp.monitoring_namespace)],
                                                      "ports": _ports(metrics)}]))
        out.append(_policy(inp, "fallback-metrics", {"matchLabels": inp.labels("fallback")},
                           [{"from": [_ns(inp.monitoring_namespace)], "ports": _ports(fallback_port)}]))
    return out


# ----------------------------------------------------------------------------- monitoring (prometheus-operator)


def monitors(inp: Inputs) -> list[dict[str, Any]]:
    """PodMonitor for every Ray pod's metrics port (llm_* metrics, Serve's own) and ServiceMonitor for the
    fallback's /metrics; the GPU Operator's dcgm-exporter brings its own ServiceMonitor (DCGM metrics)."""
    pod = {"apiVersion": "monitoring.coreos.com/v1", "kind": "PodMonitor", "metadata": inp.meta("ray", "monitor"),
           "spec": {"selector": {"matchLabels": {PART_OF: inp.name},
                                 "matchExpressions": [{"key": ROLE, "operator": "In",
                                                       "values": ["ray-head", "ray-worker"]}]},
                    "podMetricsEndpoints": [{"port": "metrics", "path": "/metrics"}]}}
    svc = {"apiVersion": "monitoring.coreos.com/v1", "kind": "ServiceMonitor",
           "metadata": inp.meta("fallback", "monitor"),
           "spec": {"selector": {"matchLabels": inp.labels("fallback")},
                    "endpoints": [{"port": "http", "path": "/metrics"}]}}
    return [pod, svc]
