"""Model config files: strict parsing (unknown keys, wrong types, missing source) and the CLI's errors."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from app.models.config import ConfigError, load_engine_specs, load_model_config, load_model_configs

ROOT = Path(__file__).resolve().parents[1]

GOOD = """
model_loading_config: {model_id: m1, model_source: org/model}
engine: transformers
deployment_config:
  ray_actor_options: {num_cpus: 1, num_gpus: 1, resources: {small-model-workers: 1}}
  autoscaling_config: {min_replicas: 1, max_replicas: 3, target_ongoing_requests: 2,
                       upscale_delay_s: 1, downscale_delay_s: 5}
  max_ongoing_requests: 8
engine_kwargs: {dtype: float16, max_model_len: 2048, max_num_seqs: 4, tensor_parallel_size: 1}
"""


def _write(tmp_path: Path, text: str, name: str = "m.yaml") -> Path:
    p = tmp_path / name
    p.write_text(text)
    return p


def test_shipped_configs_parse() -> None:
    # each file on its own: tiny.yaml and tiny-vllm.yaml are alternatives serving the same model id
    configs = [load_model_config(p) for p in sorted((ROOT / "app/configs").glob("*.yaml"))]
    ids = {c.model_id for c in configs}
    assert {c.engine for c in configs if c.model_id == "tiny"} == {"transformers", "vllm"}
    assert {"qwen2.5-0.5b-instruct", "tiny"} <= ids
    qwen = next(c for c in configs if c.model_id == "qwen2.5-0.5b-instruct")
    assert qwen.deployment_config.ray_actor_options.num_gpus == 1
    assert qwen.deployment_config.ray_actor_options.resources == {"small-model-workers": 1}
    assert qwen.model_loading_config.model_source == "Qwen/Qwen2.5-0.5B-Instruct"


def test_good_config_to_engine_spec(tmp_path: Path) -> None:
    (spec,) = load_engine_specs([_write(tmp_path, GOOD)])
    assert spec.model_id == "m1" and spec.engine == "transformers"
    assert spec.engine_kwargs == {"dtype": "float16", "max_model_len": 2048, "max_num_seqs": 4,
                                  "tensor_parallel_size": 1}
    # the comma-separated MODEL_CONFIGS form
    other = _write(tmp_path, GOOD.replace("m1", "m2"), "m2.yaml")
    assert [s.model_id for s in load_engine_specs(f"{tmp_path / 'm.yaml'},{other}")] == ["m1", "m2"]


@pytest.mark.parametrize(
    ("mutate", "expected"),
    [
        (lambda t: t.replace("upscale_delay_s: 1", "upscale_delay: 1"),
         "unknown key 'deployment_config.autoscaling_config.upscale_delay'"),
        (lambda t: t.replace("engine: transformers", "engine: transformers\nenigne_kwargs: {}"),
         "unknown key 'enigne_kwargs'"),
        (lambda t: t.replace("max_model_len: 2048", "max_model_len: lots"),
         "engine_kwargs.max_model_len"),
        (lambda t: t.replace("max_ongoing_requests: 8", "max_ongoing_requests: [8]"),
         "deployment_config.max_ongoing_requests"),
        (lambda t: t.replace(", model_source: org/model", ""),
         "missing required key 'model_loading_config.model_source'"),
        (lambda t: t.replace("min_replicas: 1", "min_replicas: 5"), "min_replicas (5) > max_replicas (3)"),
        (lambda t: t.replace("engine: transformers", "engine: tensorrt"), "engine:"),
    ],
)
def test_config_errors_name_file_and_key(tmp_path: Path, mutate, expected: str) -> None:  # type: ignore[no-untyped-def]
    path = _write(tmp_path, mutate(GOOD))
    with pytest.raises(ConfigError) as err:
        load_model_configs([path])
    assert str(path) in str(err.value)
    assert expected in str(err.value)


def test_duplicate_model_ids_rejected(tmp_path: Path) -> None:
    a, b = _write(tmp_path, GOOD, "a.yaml"), _write(tmp_path, GOOD, "b.yaml")
    with pytest.raises(ConfigError, match="also used by"):
        load_model_configs([a, b])


def test_not_yaml_and_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_model_configs([_write(tmp_path, "a: [b")])
    with pytest.raises(ConfigError, match="file not found"):
        load_model_configs([tmp_path / "nope.yaml"])


@pytest.mark.parametrize("command", [["cluster", "deploy"], ["serve", "--config"]])
def test_cli_rejects_bad_config_with_nonzero_exit(tmp_path: Path, command: list[str]) -> None:
    bad = _write(tmp_path, GOOD.replace("target_ongoing_requests", "target_ongoing_request"))
    proc = subprocess.run([sys.executable, "-m", "app", *command, str(bad)], cwd=ROOT, capture_output=True,
                          text=True, timeout=120, env={"PATH": "/usr/bin:/bin", "HOME": str(tmp_path)})
    assert proc.returncode != 0
    assert str(bad) in proc.stderr and "target_ongoing_request" in proc.stderr, proc.stderr
