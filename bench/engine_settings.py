"""The engine settings every system of a benchmark serves with, said once and rendered for each of them.

`EngineSettings` holds what the layers and anchors of `bench.compare_layers` must share (batch size, queue,
context length, dtype, eager mode, KV-cache size) and renders it as:

- the kit's `engine_kwargs` (in-process engine layer) and the kit's model config YAML (`python -m app serve
  --config`, `python -m app cluster local-up --config`), so no layer caps or drops a setting of its own;
- vLLM's own OpenAI server's command-line arguments (`python -m vllm.entrypoints.openai.api_server`);
- Ray Serve LLM's `LLMConfig` (`ray.serve.llm.build_openai_app`), as a plain dict.

vLLM-only keys (`enforce_eager`, `kv_cache_memory_bytes`) go to the transformers engine too: it ignores them by
name (`IGNORED_VLLM_KWARGS` in app/engines/hf/engine.py), so both engines read one identical `engine_kwargs`.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

MODEL_ID = "tiny"  # the name every system serves the model under (the load generator asks for it)


@dataclass(frozen=True)
class EngineSettings:
    max_num_seqs: int = 16
    max_waiting: int = 32
    max_model_len: int = 2048
    dtype: str = "float32"
    enforce_eager: bool = True
    kv_cache_gib: float = 1.0

    @classmethod
    def add_arguments(cls, ap: argparse.ArgumentParser) -> None:
        d = cls()
        ap.add_argument("--max-num-seqs", type=int, default=d.max_num_seqs, help="sequences the engine batches")
        ap.add_argument("--max-waiting", type=int, default=d.max_waiting, help="engine queue before 429")
        ap.add_argument("--max-model-len", type=int, default=d.max_model_len, help="context length, every system")
        ap.add_argument("--dtype", default=d.dtype, help="every system (the tiny model is float32)")
        ap.add_argument("--no-enforce-eager", dest="enforce_eager", action="store_false",
                        help="let vLLM compile (start-up ~25 s longer); eager by default, every vLLM system")
        ap.add_argument("--kv-cache-gib", type=float, default=d.kv_cache_gib,
                        help="vLLM-CPU's KV cache, GiB (kv_cache_memory_bytes), every vLLM system")

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> EngineSettings:
        return cls(max_num_seqs=args.max_num_seqs, max_waiting=args.max_waiting, max_model_len=args.max_model_len,
                   dtype=args.dtype, enforce_eager=args.enforce_eager, kv_cache_gib=args.kv_cache_gib)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)

    @property
    def kv_cache_bytes(self) -> int:
        return int(self.kv_cache_gib * 2**30)

    def vllm_kwargs(self) -> dict[str, Any]:
        """The vLLM engine arguments (AsyncEngineArgs fields) every vLLM system gets."""
        return {"dtype": self.dtype, "max_model_len": self.max_model_len, "max_num_seqs": self.max_num_seqs,
                "enforce_eager": self.enforce_eager, "kv_cache_memory_bytes": self.kv_cache_bytes}

    def engine_kwargs(self, engine_process: bool | None = None, cpu_threads: int | None = None) -> dict[str, Any]:
        """The kit's `engine_kwargs` (either engine): vLLM's arguments plus the kit's own keys."""
        kw: dict[str, Any] = {"device": "cpu", **self.vllm_kwargs()}
        if engine_process is not None:
            kw["engine_process"] = engine_process
        if cpu_threads is not None:
            kw["cpu_threads"] = cpu_threads
        return kw

    def model_config(self, model: Path, engine: str, *, engine_process: bool | None = None,
                     coalesce_ms: float | None = None, replica_env: dict[str, str] | None = None,
                     replica_cpus: float = 0.5) -> dict[str, Any]:
        """The kit's model config (app/models/config.py) for `serve --config` and `cluster local-up --config`: one
        fixed replica, these settings."""
        cfg: dict[str, Any] = {
            "model_loading_config": {"model_id": MODEL_ID, "model_source": str(model)},
            "engine": engine,
            "deployment_config": {
                "name": MODEL_ID, "num_replicas": 1,
                "ray_actor_options": {"num_cpus": replica_cpus, "num_gpus": 0,
                                      "resources": {"small-model-workers": replica_cpus}},
                "max_ongoing_requests": self.max_num_seqs + self.max_waiting,
                "max_queued_requests": 2 * (self.max_num_seqs + self.max_waiting),
            },
            "engine_kwargs": self.engine_kwargs(engine_process=engine_process),
            "max_waiting": self.max_waiting,
            "default_max_tokens": 64,
        }
        if engine == "transformers":  # vLLM-only keys the transformers engine would only warn about
            for key in ("enforce_eager", "kv_cache_memory_bytes"):
                cfg["engine_kwargs"].pop(key)
        if replica_env:
            cfg["runtime_env"] = {"env_vars": dict(replica_env)}
        if coalesce_ms is not None:
            cfg["stream_coalesce_ms"] = coalesce_ms
        return cfg

    def write_model_config(self, path: Path, model: Path, engine: str, **kw: Any) -> Path:
        import yaml

        path.write_text(yaml.safe_dump(self.model_config(model, engine, **kw), sort_keys=False))
        return path

    def vllm_server_args(self, model: Path) -> list[str]:
        """vLLM's own OpenAI server: `python -m vllm.entrypoints.openai.api_server` + these arguments."""
        args = ["--model", str(model), "--served-model-name", MODEL_ID, "--dtype", self.dtype,
                "--max-model-len", str(self.max_model_len), "--max-num-seqs", str(self.max_num_seqs),
                "--kv-cache-memory-bytes", str(self.kv_cache_bytes)]
        return [*args, "--enforce-eager"] if self.enforce_eager else args

    def ray_llm_config(self, model: Path, replica_env: dict[str, str] | None = None) -> dict[str, Any]:
        """Ray Serve LLM's `LLMConfig` (as keyword arguments): one replica on one CPU bundle, these settings."""
        cfg: dict[str, Any] = {
            "model_loading_config": {"model_id": MODEL_ID, "model_source": str(model)},
            "accelerator_config": {"kind": "cpu"},
            "placement_group_config": {"bundles": [{"CPU": 1}]},
            "deployment_config": {"num_replicas": 1,
                                  "max_ongoing_requests": self.max_num_seqs + self.max_waiting},
            "engine_kwargs": self.vllm_kwargs(),
        }
        if replica_env:
            cfg["runtime_env"] = {"env_vars": dict(replica_env)}
        return cfg

    def to_json(self) -> str:
        return json.dumps(self.as_dict())

    @classmethod
    def from_json(cls, text: str) -> EngineSettings:
        return cls(**json.loads(text))
