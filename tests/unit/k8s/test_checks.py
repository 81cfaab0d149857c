"""`k8s render` refuses what cannot work, before writing anything, with one line naming the file and the key:
a tier the catalogue lacks (or none), more GPUs than a tier's worker has, tensor x pipeline parallel beyond one
worker, replicas beyond the worker group, a secret written inline, DeepSpeed ranks beyond a pod's GPUs, and a
misspelt key in the tier catalogue.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from app.k8s.catalogue import DEFAULT_TIERS, K8sError, load_catalogue
from app.k8s.render import gather, render_objects

BASE = {
    "model_loading_config": {"model_id": "m", "model_source": "org/m"},
    "engine": "vllm",
    "deployment_config": {"name": "m", "num_replicas": 1,
                          "ray_actor_options": {"num_cpus": 1, "num_gpus": 1, "resources": {"l4-workers": 1}}},
    "engine_kwargs": {"max_model_len": 1024},
}


ENV = {"FALLBACK_MODEL": "org/m"}  # compose's one required variable of the head services


def config(tmp_path: Path, **changes: object) -> Path:
    """BASE with dotted-key changes (None deletes), written to tmp_path/m.yaml."""
    doc = yaml.safe_load(yaml.safe_dump(BASE))
    for dotted, value in changes.items():
        *parents, key = dotted.split("__")
        node = doc
        for p in parents:
            node = node.setdefault(p, {})
        if value is None:
            node.pop(key, None)
        else:
            node[key] = value
    path = tmp_path / "m.yaml"
    path.write_text(yaml.safe_dump(doc))
    return path


def refusal(path: Path, env: dict[str, str] | None = None, **options: object) -> str:
    with pytest.raises(K8sError) as info:
        render_objects(gather({**ENV, **(env or {})}, configs=[path], **options))  # type: ignore[arg-type]
    msg = str(info.value)
    assert "\n" not in msg
    return msg


def test_the_base_config_renders(tmp_path: Path) -> None:
    objs = render_objects(gather(ENV, configs=[config(tmp_path)]))
    ray = next(o for o in objs if o["kind"] == "RayService")
    assert [g["groupName"] for g in ray["spec"]["rayClusterConfig"]["workerGroupSpecs"]] == ["l4"]


def test_tier_not_in_the_catalogue(tmp_path: Path) -> None:
    path = config(tmp_path, deployment_config__ray_actor_options__resources={"h100-workers": 1})
    msg = refusal(path)
    assert msg.startswith(f"{path}: deployment_config.ray_actor_options.resources.h100-workers: ")
    assert "not in the tier catalogue" in msg and str(DEFAULT_TIERS) in msg


def test_no_tier_at_all(tmp_path: Path) -> None:
    path = config(tmp_path, deployment_config__ray_actor_options__resources=None)
    assert refusal(path).startswith(f"{path}: deployment_config.ray_actor_options.resources: names no tier")


def test_more_gpus_than_a_worker_of_the_tier_has(tmp_path: Path) -> None:
    path = config(tmp_path, deployment_config__ray_actor_options__num_gpus=2)
    msg = refusal(path)
    assert msg.startswith(f"{path}: deployment_config.ray_actor_options.num_gpus: 2 GPUs per replica")
    assert "'l4' worker has 1" in msg


def test_tensor_parallel_beyond_one_worker(tmp_path: Path) -> None:
    path = config(tmp_path, engine_kwargs__tensor_parallel_size=2, engine_kwargs__pipeline_parallel_size=2,
                  deployment_config__ray_actor_options__resources={"medium-model-workers": 1})
    msg = refusal(path)
    assert msg.startswith(f"{path}: engine_kwargs.tensor_parallel_size: 2 x pipeline 2 = 4 GPUs")
    assert "'2xl4' worker has 2" in msg


def test_replicas_beyond_the_worker_group(tmp_path: Path) -> None:
    path = config(tmp_path, deployment_config__num_replicas=None,
                  deployment_config__autoscaling_config={"min_replicas": 1, "max_replicas": 5})
    msg = refusal(path)
    assert msg.startswith(f"{path}: deployment_config.autoscaling_config.max_replicas: 5 replicas x 1 GPUs")


@pytest.mark.parametrize(("dotted", "value", "key"), [
    ("runtime_env__env_vars", {"HF_TOKEN": "abc"}, "runtime_env.env_vars.HF_TOKEN"),
    ("engine_kwargs__hf_token", "abc", "engine_kwargs.hf_token"),
    ("runtime_env__env_vars", {"SOMETHING": "hf_" + "x" * 30}, "runtime_env.env_vars.SOMETHING"),
])
def test_a_secret_inline(tmp_path: Path, dotted: str, value: object, key: str) -> None:
    path = config(tmp_path, **{dotted: value})
    msg = refusal(path)
    assert msg.startswith(f"{path}: {key}: a secret value inline")
    assert "abc" not in msg and "x" * 30 not in msg


def test_tokenizer_settings_are_not_secrets(tmp_path: Path) -> None:
    path = config(tmp_path, runtime_env__env_vars={"TOKENIZERS_PARALLELISM": "false"},
                  default_max_tokens=32)
    render_objects(gather(ENV, configs=[path]))


def test_deepspeed_ranks_beyond_a_pods_gpus(tmp_path: Path) -> None:
    env = {"DS_MODEL": "/cache/hf/m", "DS_HOSTS": "10.0.0.1:4,10.0.0.2:4"}
    msg = refusal(config(tmp_path), env, deepspeed_as="mpijob", deepspeed_tier="2xa100")
    assert msg.startswith(".env: DS_HOSTS: '10.0.0.1:4' runs 4 ranks but a '2xa100' pod has 2 GPUs")
    assert refusal(config(tmp_path), {}, deepspeed_as="mpijob").startswith(".env: DS_MODEL: empty")


def test_a_secret_value_in_a_passed_env_knob(tmp_path: Path) -> None:
    msg = refusal(config(tmp_path), {"LLM_EXTRA_HEADER": "hf_" + "y" * 30}, env_file="/etc/llmkit/.env")
    assert msg.startswith("/etc/llmkit/.env: LLM_EXTRA_HEADER: a secret value inline") and "y" * 30 not in msg


def test_catalogue_errors_name_file_and_key(tmp_path: Path) -> None:
    doc = yaml.safe_load(DEFAULT_TIERS.read_text())
    doc["tiers"]["t4"]["gpu"] = doc["tiers"]["t4"].pop("gpus")
    bad = tmp_path / "tiers.yaml"
    bad.write_text(yaml.safe_dump(doc))
    with pytest.raises(K8sError, match=rf"^{bad}: tiers\.t4\.gpu"):
        load_catalogue(bad)
    doc["tiers"]["t4"]["gpus"] = doc["tiers"]["t4"].pop("gpu")
    doc["tiers"]["t4"]["memory"]["limit"] = "lots"
    bad.write_text(yaml.safe_dump(doc))
    with pytest.raises(K8sError, match=rf"^{bad}: tiers\.t4\.memory\.limit: .*not a Kubernetes quantity"):
        load_catalogue(bad)


def test_cli_prints_one_line_and_writes_nothing(tmp_path: Path) -> None:
    from app.cli import _load_plugins, cli

    _load_plugins()
    path = config(tmp_path, deployment_config__ray_actor_options__num_gpus=4)
    out = tmp_path / "out"
    res = CliRunner().invoke(cli, ["k8s", "render", "--out", str(out), "--env-file", str(tmp_path / "none"),
                                   str(path)], env=ENV)
    assert res.exit_code == 2
    lines = [line for line in res.output.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith(f"error: {path}: deployment_config.ray_actor_options.num_gpus")
    assert not out.exists()
