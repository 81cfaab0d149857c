"""vLLM (CPU build) against the transformers engine: same model, same server, same harness, one run.

    .venv-vllm/bin/python -m bench.compare_engines --levels 1,8,16 --duration 10 --out bench/results

Each engine serves the tiny model through `python -m app serve --config`, with one model config rendered from
the same `EngineSettings` (bench/engine_settings.py: `max_num_seqs`, `max_waiting`, `max_model_len`, dtype,
eager, KV cache), and `--engines ...,vllm-server` adds the anchor: vLLM's own OpenAI server on those very
settings (bench/anchors.py). They start one after the other from this
Python (so from .venv-vllm, which has both engines); the harness of `python -m app bench`
(`app.client.loadgen.bench_endpoint`, streamed completions, exactly --max-tokens tokens each) drives it at
each concurrency level. Output: OUT/engines.json and OUT/engines.md (also printed).
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

from app.client.loadgen import bench_endpoint, machine_info
from app.client.stats import fmt_s
from bench import anchors
from bench.compare_layers import ROOT, ensure_model, free_port, log, stop, versions, wait_http
from bench.engine_settings import EngineSettings
from bench.threads import threads_by_role


def engine_config(engine: str, model: Path, settings: EngineSettings, out: Path) -> Path:
    """The kit's model config of `engine` on `model` with the comparison's shared engine settings
    (bench/engine_settings.py: the same `engine_kwargs` for both engines and vLLM's own server)."""
    return settings.write_model_config(out / f"{engine}.yaml", model, engine)


def run_engine(engine: str, args: argparse.Namespace, model: Path, work: Path) -> dict[str, Any]:
    port = free_port()
    settings = EngineSettings.from_args(args)
    env = {**os.environ, "VLLM_CPU_OMP_THREADS_BIND": os.environ.get("VLLM_CPU_OMP_THREADS_BIND", "nobind")}
    if engine == "vllm-server":  # the anchor: vLLM's own OpenAI server, same settings
        system = anchors.start("vllm-server", model=model, settings=settings, port=port, work=work, omp1=False,
                               env=env)
        proc, url = system.proc, system.url

        def stop_it() -> None:
            system.stop()
        ready_url, describe = f"{url}/v1/models", {"engine": "vllm (its own server)", "device": "cpu",
                                                   "dtype": settings.dtype}
    else:
        cfg = engine_config(engine, model, settings, work)
        logf = open(work / f"{engine}.log", "wb")  # closed with the process (stop_it)
        proc = subprocess.Popen([sys.executable, "-m", "app", "serve", "--config", str(cfg), "--host", "127.0.0.1",
                                 "--port", str(port)], cwd=ROOT, env=env, stdout=logf, stderr=subprocess.STDOUT)
        url, ready_url, describe = f"http://127.0.0.1:{port}", f"http://127.0.0.1:{port}/readyz", {}

        def stop_it() -> None:
            stop(proc)
            logf.close()
    try:
        wait_http(ready_url, 600, proc, f"{engine} server")
        if not describe:
            ready = json_get(f"{url}/readyz")["models"]["tiny"]
            describe = {"engine": ready["engine"], "device": ready["device"], "dtype": ready["dtype"],
                        "threads": ready.get("threads")}
        log(f"{engine}: serving on {describe['device']} ({describe['dtype']}); benchmarking")
        report = asyncio.run(bench_endpoint(
            url, model="tiny", api_key=None, chat=False, levels=args.level_list,
            duration_s=args.duration, max_tokens=args.max_tokens, prompt_words=args.prompt_words, warmup=None,
            log=log))
        report["target"].update(describe)
        report["threads"] = threads_by_role()
        report["load_after"] = round(os.getloadavg()[0], 2)
        return report
    finally:
        stop_it()


def json_get(url: str) -> Any:
    import httpx

    return httpx.get(url, timeout=10).json()


def markdown(result: dict[str, Any]) -> str:
    m = result["machine"]
    lines = [
        f"Engine comparison, {result['date']} · machine: {m.get('cpus')} × {m.get('cpu', '?')}, "
        f"{m.get('mem_gib')} GiB, load average {result['load_before']} before · model: tiny "
        f"(app/models/tiny.py, head_dim 32, random weights), dtype {result['config']['dtype']} · "
        f"{result['config']['max_tokens']} output tokens (ignore_eos), "
        f"{result['config']['duration_s']:g} s per level, max_num_seqs {result['config']['max_num_seqs']} · "
        f"versions: " + ", ".join(f"{k} {v}" for k, v in result["versions"].items() if v),
        f"Command: `{result['command']}`",
        "",
        "| engine | c | req/s | out tok/s | TTFT p50 | ITL p50 | e2e p50 | e2e p95 | ok/failed | load 1m after |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for engine, rep in result["reports"].items():
        for lv in rep["levels"]:
            lines.append(
                f"| {engine} ({rep['target']['device']}) | {lv['concurrency']} | {lv['req_per_s']:.1f} | "
                f"{lv['output_tokens_per_s']:.0f} | {fmt_s(lv['ttft_s']['p50'])} | {fmt_s(lv['itl_s']['p50'])} | "
                f"{fmt_s(lv['e2e_s']['p50'])} | {fmt_s(lv['e2e_s']['p95'])} | {lv['ok']}/{lv['failed']} | "
                f"{rep['load_after']} |")
    for engine, err in result["errors"].items():
        lines.append(f"| {engine} | – | failed: {err[:150]} | | | | | | | |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.compare_engines", description=__doc__.split("\n\n")[0])
    p.add_argument("--engines", default="transformers,vllm",
                   help="comma list of transformers, vllm (the kit's server on each) and vllm-server (the anchor: "
                        "vLLM's own OpenAI server on the same settings)")
    p.add_argument("--levels", default="1,8,16")
    p.add_argument("--duration", type=float, default=10.0)
    p.add_argument("--max-tokens", type=int, default=32)
    p.add_argument("--prompt-words", type=int, default=16)
    EngineSettings.add_arguments(p)  # the engine settings of every engine and of vLLM's own server, said once
    p.add_argument("--model", help="model folder (default: .cache/tiny-model, built when missing)")
    p.add_argument("--out", type=Path, default=ROOT / "bench" / "results")
    args = p.parse_args(argv)
    args.level_list = [int(x) for x in args.levels.split(",")]
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    result: dict[str, Any] = {
        "date": dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC"), "machine": machine_info(),
        "load_before": round(os.getloadavg()[0], 2), "versions": versions(),
        "command": "python -m bench.compare_engines " + " ".join(argv if argv is not None else sys.argv[1:]),
        "config": {"levels": args.level_list, "duration_s": args.duration, "max_tokens": args.max_tokens,
                   "prompt_words": args.prompt_words, "max_num_seqs": args.max_num_seqs, "dtype": args.dtype,
                   "max_waiting": args.max_waiting, "settings": EngineSettings.from_args(args).as_dict()},
        "reports": {}, "errors": {},
    }
    with tempfile.TemporaryDirectory(prefix="cmp-engines-") as tmp:
        work = Path(tmp)
        model = ensure_model(args.model, work)
        for engine in args.engines.split(","):
            try:
                result["reports"][engine] = run_engine(engine, args, model, work)
            except Exception as exc:  # report the failure and go on with the other engine
                result["errors"][engine] = f"{type(exc).__name__}: {exc}"
                logs = [p for p in (work / f"{engine}.log",) if p.exists()]
                tail = logs[0].read_text(errors="replace")[-2000:] if logs else ""
                log(f"{engine} failed: {exc}; log tail:\n{tail}")
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "engines.json").write_text(json.dumps(result, indent=2) + "\n")
    md = markdown(result)
    (args.out / "engines.md").write_text(md)
    print(md)
    return 0 if not result["errors"] else 1


if __name__ == "__main__":
    sys.exit(main())
