"""The DeepSpeed launcher's preflight: DS_HOSTS parsing, hostfile, `.deepspeed_env`, command, clear errors.

Runs the real CLI (`python -m app deepspeed launch --dry-run`) as a subprocess; no root,
no ssh, nothing is launched. The multi-VM launch itself is tests/deepspeed/test_deepspeed_tp.py.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from app.deepspeed.config import DSSettings, Host, parse_hosts
from tests.support.env import ROOT


def _cli(*args: str, env: dict[str, str] | None = None, cwd: Path = ROOT) -> subprocess.CompletedProcess[str]:
    launcher_vars = {"API_KEYS", "RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "LOCAL_RANK", "LOCAL_SIZE"}
    clean = {k: v for k, v in os.environ.items() if not k.startswith("DS_") and k not in launcher_vars}
    return subprocess.run([sys.executable, "-m", "app", "deepspeed", *args], cwd=cwd, env={**clean, **(env or {})},
                          capture_output=True, text=True, timeout=120)


def test_parse_hosts() -> None:
    assert parse_hosts("10.0.0.1, 10.0.0.2:2") == [Host("10.0.0.1", 1), Host("10.0.0.2", 2)]
    for bad, msg in [("", "empty"), ("10.0.0.1,10.0.0.1", "twice"), ("10.0.0.1:x", "integer"),
                     ("10.0.0.1:0", ">= 1"), (":2", "no address")]:
        with pytest.raises(ValueError, match=msg):
            parse_hosts(bad)
    s = DSSettings(hosts="10.0.0.1:2,10.0.0.2", collective_timeout_s=8, _env_file=None)  # type: ignore[call-arg]
    assert s.world_size == 3
    assert s.heartbeat_period_s == 2.0  # a quarter of the collective timeout: idle ranks never time out


def test_dry_run_writes_hostfile_env_file_and_pdsh_command(tmp_path: Path) -> None:
    env = {
        "DS_HOSTS": "10.9.0.1,10.9.0.2:2", "DS_NET_IFNAME": "ens5", "DS_MODEL": "/models/big",
        "DS_SERVED_MODEL_NAME": "big", "DS_COLLECTIVE_TIMEOUT_S": "30", "DS_MASTER_PORT": "29555",
        "API_KEYS": "sk-secret", "TORCH_EXTENSIONS_DIR": "/cache/ext", "PATH": "/opt/venv/bin:/usr/bin:/bin",
        "HF_HUB_OFFLINE": "0",  # not the default "1": the launcher's own value must be what arrives
    }
    res = _cli("launch", "--dry-run", "--run-dir", str(tmp_path / "run"), "--ssh-key", "/keys/id", env=env,
               cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    assert (tmp_path / "run" / "hostfile").read_text() == "10.9.0.1 slots=1\n10.9.0.2 slots=2\n"
    lines = (tmp_path / "run" / ".deepspeed_env").read_text().splitlines()
    exported = dict(line.split("=", 1) for line in lines)
    assert exported["GLOO_SOCKET_IFNAME"] == exported["NCCL_SOCKET_IFNAME"] == "ens5"
    assert exported["DS_COLLECTIVE_TIMEOUT_S"] == "30.0"
    assert exported["DS_MODEL"] == "/models/big" and exported["DS_SERVED_MODEL_NAME"] == "big"
    assert exported["HF_HUB_OFFLINE"] == "0" and exported["TRANSFORMERS_OFFLINE"] == "1"
    assert exported["TORCH_EXTENSIONS_DIR"] == "/cache/ext"
    assert exported["PATH"] == "/opt/venv/bin:/usr/bin:/bin"
    assert "sk-secret" not in "\n".join(lines)  # secrets would end up on the pdsh command line
    assert oct((tmp_path / "run" / ".deepspeed_env").stat().st_mode & 0o777) == "0o600"
    cmd = res.stdout.strip().splitlines()[-1]
    for part in ("--launcher pdsh", "--master_addr 10.9.0.1", "--master_port 29555", "--no_local_rank",
                 f"--hostfile {tmp_path / 'run' / 'hostfile'}", "--module app deepspeed serve"):
        assert part in cmd, (part, cmd)


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({}, "DS_HOSTS is empty"),
        ({"DS_HOSTS": "10.9.0.1,10.9.0.2", "DS_MODEL": "/m"}, "DS_NET_IFNAME is empty"),
        ({"DS_HOSTS": "10.9.0.1,10.9.0.2", "DS_NET_IFNAME": "ens5"}, "DS_MODEL is empty"),
        ({"DS_HOSTS": "10.9.0.1,10.9.0.1", "DS_MODEL": "/m"}, "lists 10.9.0.1 twice"),
        ({"DS_HOSTS": "10.9.0.1", "DS_MODEL": "/m", "DS_COLLECTIVE_TIMEOUT_S": "-1"}, "DS_COLLECTIVE_TIMEOUT_S"),
    ],
)
def test_preflight_errors_name_the_setting(tmp_path: Path, env: dict[str, str], message: str) -> None:
    res = _cli("launch", "--dry-run", "--run-dir", str(tmp_path), env=env, cwd=tmp_path)
    assert res.returncode == 2
    assert message in res.stderr, res.stderr


def test_serve_without_launcher_env_fails_cleanly(tmp_path: Path) -> None:
    res = _cli("serve", cwd=tmp_path)
    assert res.returncode == 2 and "DS_MODEL is empty" in res.stderr, res.stderr
    res = _cli("serve", "--model", "/m", cwd=tmp_path)
    assert res.returncode == 2 and "started by `python -m app deepspeed launch`" in res.stderr, res.stderr


def test_rank_names_a_missing_model_folder(tmp_path: Path) -> None:
    from app.deepspeed.tp import RankInfo, load_sharded

    missing = tmp_path / "models" / "qwen"
    with pytest.raises(RuntimeError) as err:
        load_sharded(DSSettings(model=str(missing)), RankInfo(rank=1, world_size=2, local_rank=0, local_size=1), None)
    message = str(err.value)
    assert message.startswith("rank 1 (") and "DS_MODEL" in message
    assert str(missing) in message and "does not exist" in message and "make-tiny-model" in message
