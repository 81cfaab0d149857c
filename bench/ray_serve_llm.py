"""Ray Serve LLM's own OpenAI app on a local Ray: the anchor `bench.compare_layers` measures the kit's Ray path against.

    .venv-vllm/bin/python -m bench.ray_serve_llm --model DIR --port 8123 --settings '{"max_num_seqs": 16, ...}'

Starts a private one-node Ray in this process (`ray.init(num_cpus=...)`: logical CPUs, so the replica's one-CPU
bundle and Serve's own actors fit on a 2-core box; 127.0.0.1 only, no dashboard), then
`ray.serve.llm.build_openai_app` with one `LLMConfig` made from the benchmark's shared `EngineSettings`, its HTTP
proxy on 127.0.0.1:PORT. It serves until SIGTERM/SIGINT, then shuts Serve and Ray down (Ray's daemons are this
process's children and go with it). Needs vLLM's CPU build and `ray[serve]` (.venv-vllm) plus the packages Ray
Serve LLM imports that vLLM does not bring: the `anchors` extra (`LLM_KIT_ANCHORS=1 bash tests/vllm_venv.sh`).
"""

from __future__ import annotations

import argparse
import os
import secrets
import signal
import sys
import threading
from pathlib import Path

from bench.engine_settings import EngineSettings


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.ray_serve_llm", description=__doc__.split("\n")[0])
    ap.add_argument("--model", type=Path, required=True)
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--settings", required=True, help="EngineSettings as JSON (bench/engine_settings.py)")
    ap.add_argument("--num-cpus", type=int, default=4, help="Ray's logical CPUs (not cores: admission only)")
    ap.add_argument("--replica-env", action="append", default=[], metavar="KEY=VALUE",
                    help="an environment variable of the LLM replica (its runtime_env)")
    ap.add_argument("--temp-dir", default=None, help="Ray's session folder (short: AF_UNIX paths)")
    args = ap.parse_args(argv)
    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")  # keeps Ray on 127.0.0.1 (DESIGN.md)
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    # a token of this run's own: without one Ray writes a new one to ~/.ray/auth_token, which every later Ray on
    # this machine would then read silently (DESIGN.md)
    os.environ.setdefault("RAY_AUTH_TOKEN", secrets.token_hex(32))
    settings = EngineSettings.from_json(args.settings)
    replica_env = dict(kv.split("=", 1) for kv in args.replica_env)

    import ray
    from ray import serve
    from ray.serve.llm import LLMConfig, build_openai_app

    ray.init(num_cpus=args.num_cpus, num_gpus=0, include_dashboard=False, _node_ip_address="127.0.0.1",
             object_store_memory=256 * 2**20, _temp_dir=args.temp_dir,
             runtime_env={"env_vars": {k: os.environ[k] for k in ("VLLM_CPU_OMP_THREADS_BIND", "OMP_NUM_THREADS",
                                                                  "HF_HUB_OFFLINE") if k in os.environ}})
    stopping = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stopping.set())
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": args.port})
        app = build_openai_app({"llm_configs": [LLMConfig(**settings.ray_llm_config(args.model, replica_env))]})
        serve.run(app, name="ray-serve-llm", blocking=False)
        print(f"ray-serve-llm: serving on http://127.0.0.1:{args.port}", flush=True)
        stopping.wait()
    finally:
        try:
            serve.shutdown()
        finally:
            ray.shutdown()
    return 0


if __name__ == "__main__":  # vLLM spawns its EngineCore: the guard keeps the child from re-running this
    sys.exit(main())
