"""The DeepSpeed tensor-parallel mode on Kubernetes: a Kubeflow MPIJob (kubeflow.org/v2beta1) or, with
`--deepspeed-as lws`, a LeaderWorkerSet; the same containers as the compose `deepspeed` profile.

Every pod runs the rank container (`python -m app deepspeed sshd`, compose's deepspeed-node: the sshd pdsh lands
in); the first pod also runs the launcher (`python -m app deepspeed launch`, compose's deepspeed), which starts
`deepspeed serve` on every pod through pdsh, as on VMs. Host networking (NCCL between nodes, as compose's
network_mode: host); DS_HOSTS lists the pods' stable DNS names (MPIJob: `<job>-launcher` and `<job>-worker-N` under
the job's headless Service, the launcher doubling as a worker; LWS: `<name>-0` and `<name>-0-N`). The ssh key pair
comes from a Secret reference (DS_SSH_KEY_FILE on VMs), mounted where compose mounts it.
"""

from __future__ import annotations

from typing import Any

from app.k8s.catalogue import K8sError
from app.k8s.inputs import Inputs
from app.k8s.ray import GPU, tolerations

SSH_DIR = "/run/secrets"


def _ds_env(inp: Inputs, hosts: str) -> list[dict[str, Any]]:
    keep = inp.compose.environment(
        "deepspeed", lambda k: k.startswith("DS_") and k not in ("DS_HOSTS", "DS_HOST", "DS_SSH_KEY"))
    env = [{"name": "NODE_IP", "valueFrom": {"fieldRef": {"fieldPath": "status.podIP"}}},
           {"name": "POD_IP", "valueFrom": {"fieldRef": {"fieldPath": "status.podIP"}}},
           *inp.common_env(),
           *({"name": k, "value": v} for k, v in sorted(keep.items())),
           {"name": "DS_HOSTS", "value": hosts},
           {"name": "DS_HOST", "value": "$(POD_IP)"},  # rank 0's API on the pod's address (the Service's target)
           {"name": "DS_SSH_KEY", "value": f"{SSH_DIR}/ds_ssh_key"}]
    return env


def _pod(inp: Inputs, hosts: str, launcher: bool) -> dict[str, Any]:
    tier = inp.catalogue.tiers[inp.deepspeed_tier]
    gpu_image = inp.compose.service("deepspeed-node").image
    mounts = [{"name": "ds-ssh", "mountPath": SSH_DIR, "readOnly": True},
              {"name": "model-cache", "mountPath": "/cache/hf", "readOnly": True},
              *(m for m in inp.keys_mounts() if m["name"] == "api-keys")]  # rank 0 reads it (compose: the same)
    rank = {"name": "rank", "image": gpu_image, "command": inp.compose.service("deepspeed-node").command,
            "env": _ds_env(inp, hosts), "volumeMounts": mounts,
            "resources": {"requests": {"cpu": tier.cpu.request, "memory": tier.memory.request},
                          "limits": {"cpu": tier.cpu.limit, "memory": tier.memory.limit, GPU: tier.gpus}}}
    containers = [rank]
    if launcher:
        launch = inp.compose.service("deepspeed")
        port = inp.port("DS_PORT", 8002)
        keys = [e for e in inp.keys_env() if e["name"] == "KEYS_FILE"]  # it reaches rank 0 as DS_KEYS_FILE
        containers.append({"name": "launcher", "image": launch.image, "command": launch.command,
                           "env": [*_ds_env(inp, hosts), *keys], "volumeMounts": mounts,
                           "ports": [{"name": "http", "containerPort": port}],
                           "readinessProbe": {"httpGet": {"path": "/readyz", "port": port}, "periodSeconds": 15}})
    spec: dict[str, Any] = {
        "hostNetwork": True, "dnsPolicy": "ClusterFirstWithHostNet", "containers": containers,
        "volumes": [{"name": "ds-ssh", "secret": {"secretName": inp.ds_ssh_secret, "defaultMode": 0o400}},
                    *(v for v in inp.volumes() if v["name"] == "model-cache"),
                    *(v for v in inp.keys_volumes() if v["name"] == "api-keys")],
        "tolerations": tolerations(tier)}
    if tier.node_selector:
        spec["nodeSelector"] = dict(tier.node_selector)
    role = "deepspeed-rank0" if launcher else "deepspeed-rank"
    return {"metadata": {"labels": inp.labels(role)}, "spec": spec}


def check(inp: Inputs) -> None:
    env_file = inp.env_file
    tier = inp.catalogue.tiers.get(inp.deepspeed_tier)
    if tier is None:
        raise K8sError(f"--deepspeed-tier: {inp.deepspeed_tier!r} is not in the tier catalogue {inp.catalogue.source}")
    if not tier.gpus:
        raise K8sError(f"--deepspeed-tier: {inp.deepspeed_tier!r} has no GPU")
    if not inp.env.get("DS_MODEL"):
        raise K8sError(f"{env_file}: DS_MODEL: empty; set it to the model folder under /cache/hf (the model cache)")
    for item in (inp.env.get("DS_HOSTS") or "").split(","):
        _, _, slots = item.strip().partition(":")
        if slots.isdigit() and int(slots) > tier.gpus:
            raise K8sError(f"{env_file}: DS_HOSTS: {item.strip()!r} runs {slots} ranks but a {inp.deepspeed_tier!r} "
                           f"pod has {tier.gpus} GPUs (tensor-parallel ranks x GPUs beyond the worker)")


def _hosts(names: list[str], slots: int) -> str:
    return ",".join(f"{n}:{slots}" for n in names)


def mpijob(inp: Inputs) -> dict[str, Any]:
    job = inp.n("deepspeed")
    slots = inp.catalogue.tiers[inp.deepspeed_tier].gpus
    workers = inp.deepspeed_workers - 1  # the launcher pod is rank 0's host (runLauncherAsWorker)
    names = [f"{job}-launcher.{job}.{inp.namespace}.svc",
             *(f"{job}-worker-{i}.{job}.{inp.namespace}.svc" for i in range(workers))]
    hosts = _hosts(names, slots)
    specs: dict[str, Any] = {"Launcher": {"replicas": 1, "restartPolicy": "OnFailure",
                                          "template": _pod(inp, hosts, launcher=True)}}
    if workers:
        specs["Worker"] = {"replicas": workers, "restartPolicy": "OnFailure", "template": _pod(inp, hosts, False)}
    return {"apiVersion": "kubeflow.org/v2beta1", "kind": "MPIJob", "metadata": inp.meta("deepspeed", "deepspeed"),
            "spec": {"slotsPerWorker": slots, "runLauncherAsWorker": True,
                     "launcherCreationPolicy": "WaitForWorkersReady",
                     "runPolicy": {"cleanPodPolicy": "Running", "backoffLimit": 10},
                     "mpiReplicaSpecs": specs}}


def lws(inp: Inputs) -> dict[str, Any]:
    name = inp.n("deepspeed")
    slots = inp.catalogue.tiers[inp.deepspeed_tier].gpus
    names = [f"{name}-0.{name}.{inp.namespace}",
             *(f"{name}-0-{i}.{name}.{inp.namespace}" for i in range(1, inp.deepspeed_workers))]
    hosts = _hosts(names, slots)
    return {"apiVersion": "leaderworkerset.x-k8s.io/v1", "kind": "LeaderWorkerSet",
            "metadata": inp.meta("deepspeed", "deepspeed"),
            "spec": {"replicas": 1, "leaderWorkerTemplate": {
                "size": inp.deepspeed_workers, "restartPolicy": "RecreateGroupOnPodRestart",
                "leaderTemplate": _pod(inp, hosts, launcher=True),
                "workerTemplate": _pod(inp, hosts, launcher=False)}}}


def objects(inp: Inputs) -> list[dict[str, Any]]:
    from app.k8s.core import service

    workload = lws(inp) if inp.deepspeed_as == "lws" else mpijob(inp)
    return [workload, service(inp, "deepspeed", "deepspeed-rank0", inp.port("DS_PORT", 8002))]
