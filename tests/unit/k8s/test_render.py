"""`python -m app k8s render`: every rendered object validates strictly offline (core kinds with
kubernetes-validate, custom resources against the upstream CRDs), serveConfigV2 is the Serve app entry of the VM
deploy and validates with Serve's own schema, and properties hold: no secret value anywhere, every Service
ClusterIP, every GPU request tolerated, the worker groups carry the tiers the configs request.
"""

from __future__ import annotations

import copy
import importlib.util
import json
import shlex
from pathlib import Path
from typing import Any

import pytest
import yaml
from dotenv import dotenv_values
from typer.testing import CliRunner

from app.k8s.ray import ray_start_line, worker_params
from app.k8s.render import dump, gather, render_objects
from app.ray_serve.application import IMPORT_PATH, AppArgs, application
from tests.support.env import ROOT, need
from tests.support.k8s_schemas import CRD_FILES, SchemaError, crd_dir, validate

CONFIGS = ROOT / "app" / "configs"
SECRETS = {"HF_TOKEN": "hf_" + "S3cr3tHubT0ken" * 3, "API_KEYS": "sk-" + "k1" * 12 + ",sk-other-key-000000000000",
           "RAY_AUTH_TOKEN": "0123abcd" * 8, "GRAFANA_ADMIN_PASSWORD": "grafana-pass-xyz"}


def env_of(**overrides: str) -> dict[str, str]:
    """The shipped .env.example with every secret filled in (none may reach the output) and DS_MODEL set."""
    env = {k: v or "" for k, v in dotenv_values(ROOT / ".env.example").items()}
    return {**env, **SECRETS, "DS_MODEL": "/cache/hf/models/qwen", **overrides}


def render(*configs: Path, **options: Any) -> list[dict[str, Any]]:
    inp = gather(env_of(), configs=list(configs or [CONFIGS / "qwen2.5-0.5b.yaml", CONFIGS / "tiny.yaml"]),
                 **options)
    return render_objects(inp)


def kinds(objs: list[dict[str, Any]]) -> dict[str, list[dict[str, Any]]]:
    out: dict[str, list[dict[str, Any]]] = {}
    for o in objs:
        out.setdefault(o["kind"], []).append(o)
    return out


@pytest.fixture(scope="module")
def full() -> list[dict[str, Any]]:
    """Every kind the render makes: Ray stack, monitors, DeepSpeed as MPIJob."""
    return render(monitoring=True, allow_namespaces=["apps"], deepspeed_as="mpijob")


def pod_specs(obj: dict[str, Any]) -> list[dict[str, Any]]:
    spec = obj.get("spec", {})
    if obj["kind"] == "Deployment":
        return [spec["template"]["spec"]]
    if obj["kind"] == "RayService":
        rc = spec["rayClusterConfig"]
        return [rc["headGroupSpec"]["template"]["spec"], *(g["template"]["spec"] for g in rc["workerGroupSpecs"])]
    if obj["kind"] == "MPIJob":
        return [r["template"]["spec"] for r in spec["mpiReplicaSpecs"].values()]
    if obj["kind"] == "LeaderWorkerSet":
        t = spec["leaderWorkerTemplate"]
        return [t["leaderTemplate"]["spec"], t["workerTemplate"]["spec"]]
    return []


# ----------------------------------------------------------------------------- strict validation


def test_every_object_validates_strictly(full: list[dict[str, Any]]) -> None:
    lws = [o for o in render(deepspeed_as="lws") if o["kind"] == "LeaderWorkerSet"]
    seen = set()
    for obj in [*full, *lws]:
        if obj["kind"] in ("PodMonitor", "ServiceMonitor"):
            continue  # prometheus-operator's CRDs are not in ../shared/k8s-crds (see test_monitors_select_...)
        validate(obj)
        seen.add(obj["kind"])
    assert {"Namespace", "ConfigMap", "PersistentVolumeClaim", "Service", "Deployment", "NetworkPolicy",
            "RayService", "MPIJob", "LeaderWorkerSet"} <= seen
    # the cluster half of the RayService is also a valid RayCluster (KubeRay creates one from it)
    ray = kinds(full)["RayService"][0]
    validate({"apiVersion": "ray.io/v1", "kind": "RayCluster", "metadata": {"name": "x"},
              "spec": ray["spec"]["rayClusterConfig"]})


# one misspelt field per kind, deep where the kind is deep
TYPOS: dict[str, tuple[str, ...]] = {
    "Namespace": ("metadata", "labels"),
    "ConfigMap": ("data",),
    "PersistentVolumeClaim": ("spec", "accessModes"),
    "Service": ("spec", "ports", 0, "targetPort"),
    "Deployment": ("spec", "template", "spec", "containers", 0, "image"),
    "NetworkPolicy": ("spec", "podSelector"),
    "RayService": ("spec", "rayClusterConfig", "workerGroupSpecs", 0, "rayStartParams"),
    "MPIJob": ("spec", "mpiReplicaSpecs", "Launcher", "template", "spec", "containers", 0, "command"),
    "LeaderWorkerSet": ("spec", "leaderWorkerTemplate", "leaderTemplate", "spec", "hostNetwork"),
}


@pytest.mark.parametrize("kind", sorted(TYPOS))
def test_validator_catches_a_misspelt_field(kind: str, full: list[dict[str, Any]]) -> None:
    pool = full if kind != "LeaderWorkerSet" else render(deepspeed_as="lws")
    obj = copy.deepcopy(next(o for o in pool if o["kind"] == kind))
    validate(obj)
    *parents, key = TYPOS[kind]
    node: Any = obj
    for p in parents:
        node = node[p]
    node[str(key) + "s" if not str(key).endswith("s") else str(key)[:-1]] = node.pop(key)
    with pytest.raises(SchemaError):
        validate(obj)


def test_crds_are_found_next_to_the_repository() -> None:
    assert all((crd_dir() / f).is_file() for f in CRD_FILES.values())


# ----------------------------------------------------------------------------- one source for the Serve app


def test_serve_config_is_the_vm_deploys_entry_and_validates_with_serves_schema(full: list[dict[str, Any]]) -> None:
    need(importlib.util.find_spec("ray") is not None, "needs ray[serve] (installed by tests/run.sh)")
    from ray.serve.schema import ServeDeploySchema

    text = kinds(full)["RayService"][0]["spec"]["serveConfigV2"]
    cfg = yaml.safe_load(text)
    schema = ServeDeploySchema.model_validate(cfg)
    app = cfg["applications"][0]
    assert schema.applications[0].import_path == IMPORT_PATH
    # the entry `cluster deploy` builds, with the ConfigMap's mount path and the Secret's variable instead of keys
    assert app == application(["qwen2.5-0.5b.yaml", "tiny.yaml"], config_dir="/etc/llmkit/models",
                              api_keys_env="API_KEYS")
    args = AppArgs.model_validate(app["args"])
    assert [str(p) for p in args.config_paths()] == ["/etc/llmkit/models/qwen2.5-0.5b.yaml",
                                                      "/etc/llmkit/models/tiny.yaml"]
    assert cfg["proxy_location"] == "HeadOnly" and cfg["http_options"]["port"] == 8000
    cm = next(o for o in full if o["metadata"]["name"] == "llmkit-model-configs")
    assert sorted(cm["data"]) == ["qwen2.5-0.5b.yaml", "tiny.yaml"]
    assert cm["data"]["tiny.yaml"] == (CONFIGS / "tiny.yaml").read_text()


def test_builder_reads_api_keys_from_the_named_variable(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("K8S_TEST_KEYS", "a, b")
    assert AppArgs(configs=["x.yaml"], api_keys_env="K8S_TEST_KEYS").key_list() == ["a", "b"]
    assert AppArgs(configs=["x.yaml"], api_keys=["c"], api_keys_env="K8S_TEST_KEYS").key_list() == ["c"]
    assert AppArgs(configs=["x.yaml"]).key_list() == []


# ----------------------------------------------------------------------------- properties


def test_no_secret_value_anywhere(full: list[dict[str, Any]]) -> None:
    text = "\n".join(dump(o) for o in [*full, *render(deepspeed_as="lws")])
    for name, value in SECRETS.items():
        for part in value.split(","):
            assert part not in text, f"{name} leaked"
    assert not any(o["kind"] == "Secret" for o in full)
    refs = [e for o in full for spec in pod_specs(o) for c in spec["containers"] for e in c.get("env", [])
            if e["name"] in ("HF_TOKEN", "API_KEYS")]
    assert refs and all("secretKeyRef" in e["valueFrom"] and "value" not in e for e in refs)


def test_every_service_is_cluster_ip(full: list[dict[str, Any]]) -> None:
    services = kinds(full)["Service"]
    assert {s["metadata"]["name"] for s in services} == {"llmkit-api", "llmkit-fallback", "llmkit-deepspeed"}
    assert all(s["spec"]["type"] == "ClusterIP" for s in services)
    assert "serveService" not in kinds(full)["RayService"][0]["spec"]  # KubeRay's own serve Service: ClusterIP


def test_every_gpu_request_is_tolerated(full: list[dict[str, Any]]) -> None:
    gpu_pods = 0
    for obj in [*full, *render(deepspeed_as="lws")]:
        for spec in pod_specs(obj):
            gpus = [c for c in spec["containers"] if c.get("resources", {}).get("limits", {}).get("nvidia.com/gpu")]
            if gpus:
                gpu_pods += 1
                assert any(t["key"] == "nvidia.com/gpu" for t in spec.get("tolerations", [])), obj["kind"]
    assert gpu_pods >= 4


def test_worker_groups_carry_the_tiers_the_configs_request(full: list[dict[str, Any]]) -> None:
    rc = kinds(full)["RayService"][0]["spec"]["rayClusterConfig"]
    assert rc["enableInTreeAutoscaling"] is True
    assert rc["headGroupSpec"]["rayStartParams"]["num-gpus"] == "0"
    [group] = rc["workerGroupSpecs"]  # qwen (1 GPU) and tiny (0 GPU) both request small-model-workers: t4
    assert group["groupName"] == "t4" and group["minReplicas"] == 0 and group["maxReplicas"] == 4
    [container] = group["template"]["spec"]["containers"]
    assert container["resources"]["limits"]["nvidia.com/gpu"] == 1
    line = ray_start_line(group["rayStartParams"], head=False, address="llmkit-head-svc:6379")
    argv = shlex.split(line)  # what the container's shell hands `ray start`
    resources = next(a for a in argv if a.startswith("--resources="))
    assert json.loads(resources.split("=", 1)[1]) == {"small-model-workers": 1}
    assert "--num-gpus=1" in argv and argv[:3] == ["ray", "start", "--address=llmkit-head-svc:6379"]
    groups = kinds(render(CONFIGS / "qwen2.5-0.5b.yaml"))["RayService"][0]
    assert [g["groupName"] for g in groups["spec"]["rayClusterConfig"]["workerGroupSpecs"]] == ["t4"]


def test_kuberay_start_line_translation() -> None:
    params = {"num-gpus": "0", "resources": '"{\\"cpu-workers\\": 2}"', "disable-usage-stats": "true",
              "object-store-memory": "1"}
    argv = shlex.split(ray_start_line(params, head=True))
    assert argv == ["ray", "start", "--head", "--disable-usage-stats", "--num-gpus=0", "--object-store-memory=1",
                    '--resources={"cpu-workers": 2}', "--block"]
    inp = gather(env_of(), configs=[CONFIGS / "tiny.yaml"])
    assert worker_params(inp, inp.catalogue.tiers["cpu"])["resources"] == '"{\\"cpu-workers\\": 1}"'


def test_monitors_select_what_exists_and_are_off_by_default(full: list[dict[str, Any]]) -> None:
    assert not {"PodMonitor", "ServiceMonitor"} & set(kinds(render()))
    pm, sm = kinds(full)["PodMonitor"][0], kinds(full)["ServiceMonitor"][0]
    ray = kinds(full)["RayService"][0]["spec"]["rayClusterConfig"]
    for tpl in [ray["headGroupSpec"]["template"], *(g["template"] for g in ray["workerGroupSpecs"])]:
        labels = tpl["metadata"]["labels"]
        assert all(labels.get(k) == v for k, v in pm["spec"]["selector"]["matchLabels"].items())
        assert any(p.get("name") == "metrics" for p in tpl["spec"]["containers"][0]["ports"])
    fallback_svc = next(s for s in kinds(full)["Service"] if s["metadata"]["name"] == "llmkit-fallback")
    assert sm["spec"]["selector"]["matchLabels"] == fallback_svc["metadata"]["labels"]
    assert sm["spec"]["endpoints"][0]["port"] == fallback_svc["spec"]["ports"][0]["name"]


def test_network_policies_deny_by_default_and_open_the_api_to_named_namespaces(full: list[dict[str, Any]]) -> None:
    pols = {p["metadata"]["name"]: p["spec"] for p in kinds(full)["NetworkPolicy"]}
    assert pols["llmkit-default-deny"] == {"podSelector": {}, "policyTypes": ["Ingress"]}
    api = pols["llmkit-api"]["ingress"][0]
    assert api["from"] == [{"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "apps"}}}]
    assert "llmkit-api" not in {p["metadata"]["name"] for p in kinds(render())["NetworkPolicy"]}
    for spec in pols.values():
        for rule in spec.get("ingress", []):
            assert rule.get("from"), "an ingress rule without `from` would admit every source"


def test_deepspeed_pods_run_the_compose_entrypoints_on_host_network(full: list[dict[str, Any]]) -> None:
    job = kinds(full)["MPIJob"][0]["spec"]
    launcher = job["mpiReplicaSpecs"]["Launcher"]["template"]["spec"]
    assert launcher["hostNetwork"] is True and job["runLauncherAsWorker"] is True
    cmds = {c["name"]: c["command"] for c in launcher["containers"]}
    assert cmds == {"rank": ["python", "-m", "app", "deepspeed", "sshd"],
                    "launcher": ["python", "-m", "app", "deepspeed", "launch"]}
    env = {e["name"]: e.get("value") for e in launcher["containers"][1]["env"]}
    assert env["DS_HOSTS"] == ("llmkit-deepspeed-launcher.llmkit-deepspeed.llmkit.svc:2,"
                               "llmkit-deepspeed-worker-0.llmkit-deepspeed.llmkit.svc:2")
    assert env["DS_MODEL"] == "/cache/hf/models/qwen"


# ----------------------------------------------------------------------------- the CLI on the shipped configs


def test_cli_renders_the_shipped_configs_into_a_tree_that_validates(tmp_path: Path,
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    from app.cli import _load_plugins, cli

    _load_plugins()
    env_file = tmp_path / ".env"
    env_file.write_text("".join(f"{k}={v}\n" for k, v in env_of().items()))
    for key in ("MODEL_CONFIGS", "MODEL_CONFIG_DIR", "HF_TOKEN", "API_KEYS"):
        monkeypatch.delenv(key, raising=False)
    out = tmp_path / "k8s"
    res = CliRunner().invoke(cli, ["k8s", "render", "--out", str(out), "--env-file", str(env_file)])
    assert res.exit_code == 0, res.output
    kust = yaml.safe_load((out / "kustomization.yaml").read_text())
    assert kust["namespace"] == "llmkit" and len(kust["resources"]) >= 12
    for name in kust["resources"]:
        validate(yaml.safe_load((out / name).read_text()))
    text = "".join((out / n).read_text() for n in kust["resources"])
    assert SECRETS["HF_TOKEN"] not in text and "sk-" not in text
    cm = yaml.safe_load((out / "configmap-llmkit-model-configs.yaml").read_text())
    assert list(cm["data"]) == ["qwen2.5-0.5b.yaml"]  # MODEL_CONFIGS of .env.example


def test_a_request_router_config_reaches_the_rayservice_unchanged(tmp_path: Path) -> None:
    """Serve's `request_router_config` (the prefix-aware router) lives in the model config file: the ConfigMap carries
    the file as written and the builder, reading it from there, hands it to the deployment as the VM deploy does."""
    need(importlib.util.find_spec("ray") is not None, "needs ray[serve] (installed by tests/run.sh)")
    from app.models.config import load_model_config

    router = ("  request_router_config:\n    request_router_class: app.ray_serve.prefix_router.PrefixAwareRouter\n"
              "    request_router_kwargs: {imbalance_threshold: 2}\n")
    text = (CONFIGS / "tiny.yaml").read_text()
    assert "  name: tiny\n" in text
    src = tmp_path / "tiny-prefix.yaml"
    src.write_text(text.replace("  name: tiny\n", "  name: tiny\n" + router, 1))
    cm = next(o for o in render(src) if o["metadata"]["name"] == "llmkit-model-configs")
    assert cm["data"] == {"tiny-prefix.yaml": src.read_text()}
    mounted = tmp_path / "mounted"
    mounted.mkdir()
    (mounted / "tiny-prefix.yaml").write_text(cm["data"]["tiny-prefix.yaml"])
    opts = load_model_config(mounted / "tiny-prefix.yaml").deployment_options()
    assert opts["request_router_config"] == {"request_router_class": "app.ray_serve.prefix_router.PrefixAwareRouter",
                                             "request_router_kwargs": {"imbalance_threshold": 2}}


def test_a_keys_secret_is_mounted_where_every_api_server_reads_it() -> None:
    """`--keys-secret`: the keys file (a Secret's keys.yaml, mounted as a folder so kubelet's in-place updates reach
    the servers' re-read) in the Ray head (serveConfigV2 names it for the ingress), the fallback and DeepSpeed
    rank 0; without it nothing changes. Everything still validates strictly."""
    plain = render(deepspeed_as="mpijob")
    objs = render(deepspeed_as="mpijob", keys_secret="llmkit-keys")
    for obj in objs:
        if obj["kind"] not in ("PodMonitor", "ServiceMonitor"):
            validate(obj)
    assert "keys_file" not in yaml.safe_load(kinds(plain)["RayService"][0]["spec"]["serveConfigV2"])[
        "applications"][0]["args"]
    args = yaml.safe_load(kinds(objs)["RayService"][0]["spec"]["serveConfigV2"])["applications"][0]["args"]
    assert args["keys_file"] == "/etc/llmkit/keys/keys.yaml" and args["usage_db"].startswith("/var/lib/")

    def secret_volumes(obj: dict[str, Any]) -> list[str]:
        return [v["secret"]["secretName"] for spec in pod_specs(obj) for v in spec.get("volumes", [])
                if "secret" in v and v["name"] == "api-keys"]

    head = kinds(objs)["RayService"][0]["spec"]["rayClusterConfig"]["headGroupSpec"]["template"]["spec"]
    assert any(m["mountPath"] == "/etc/llmkit/keys" and m["readOnly"] and "subPath" not in m
               for m in head["containers"][0]["volumeMounts"])
    fallback = next(o for o in objs if o["kind"] == "Deployment" and o["metadata"]["name"] == "llmkit-fallback")
    assert secret_volumes(fallback) == ["llmkit-keys"]
    env = {e["name"]: e.get("value") for e in fallback["spec"]["template"]["spec"]["containers"][0]["env"]}
    assert env["KEYS_FILE"] == "/etc/llmkit/keys/keys.yaml" and env["LLM_USAGE_DB"].startswith("/var/lib/")
    mpijob = kinds(objs)["MPIJob"][0]
    launcher = mpijob["spec"]["mpiReplicaSpecs"]["Launcher"]["template"]["spec"]
    assert secret_volumes(mpijob) and any(e["name"] == "KEYS_FILE" for c in launcher["containers"]
                                          for e in c["env"] if c["name"] == "launcher")
    assert not any(secret_volumes(o) for o in plain)
