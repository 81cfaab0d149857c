"""How much a multi-MB prompt in flight stalls the rest of a standalone server (issue 17's third target).

    python -m bench.large_prompt                      # 3.9 MB chat prompt, tiny model with a 64k context

Starts `python -m app serve` (transformers engine) on 127.0.0.1 with the tiny model built with a 64k context
(so the prompt is not refused by its length alone: it is rendered through the chat template and tokenized,
then refused as longer than the context), then, while that request is in flight, polls `/healthz` and runs
a second streamed completion. Reports the slowest /healthz answer and the longest gap between two chunks of
the other stream, both measured only while the big request was in flight, and the big request's own time
and status. Target: both under 100 ms.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx

from bench.compare_layers import free_port, stop, wait_http

BIG_BYTES = 3_900_000


def _body(big_bytes: int) -> bytes:
    """The big chat request, JSON-encoded up front (sent from another thread: this loop only measures)."""
    text = ("The quick brown fox jumps over the lazy dog. " * (big_bytes // 45 + 1))[:big_bytes]
    return json.dumps({"model": "tiny", "messages": [{"role": "user", "content": text}], "max_tokens": 4}).encode()


async def measure(base: str, big_bytes: int) -> dict[str, Any]:
    async with httpx.AsyncClient(base_url=base, timeout=600) as client:
        t0 = time.monotonic()
        if big_bytes <= 0:  # baseline: the same measurements for 10 s without a big request
            big: asyncio.Future[Any] = asyncio.ensure_future(asyncio.sleep(10, httpx.Response(200)))
        else:
            big = asyncio.ensure_future(asyncio.to_thread(
                httpx.post, f"{base}/v1/chat/completions", content=_body(big_bytes), timeout=600,
                headers={"content-type": "application/json"}))
        health: list[float] = []
        gaps: list[float] = []
        slow: list[tuple[float, float]] = []  # (seconds since the big request was sent, gap ms)

        async def poll() -> None:
            while not big.done():
                t = time.monotonic()
                assert (await client.get("/healthz")).status_code == 200
                health.append(time.monotonic() - t)
                await asyncio.sleep(0.01)

        async def other() -> None:
            while not big.done():
                body = {"model": "tiny", "prompt": "meanwhile", "max_tokens": 64, "ignore_eos": True, "stream": True}
                async with client.stream("POST", "/v1/completions", json=body) as resp:
                    last = None
                    async for line in resp.aiter_lines():
                        if line.startswith("data: ") and not big.done():
                            now = time.monotonic()
                            if last is not None:  # between two chunks of one stream (its TTFT is not a pause)
                                gaps.append(now - last)
                                slow.append((round(now - t0, 2), round(1000 * (now - last), 1)))
                            last = now

        await asyncio.gather(poll(), other())
        resp = big.result()
        return {"big_prompt_bytes": big_bytes, "big_status": resp.status_code,
                "big_seconds": round(time.monotonic() - t0, 2), "healthz_polls": len(health),
                "healthz_max_ms": round(1000 * max(health, default=0), 1),
                "other_stream_chunks": len(gaps), "other_stream_max_gap_ms": round(1000 * max(gaps, default=0), 1),
                "other_stream_slowest_gaps": sorted(slow, key=lambda g: -g[1])[:5]}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--bytes", type=int, default=BIG_BYTES, help="size of the big prompt (0: a 10 s baseline "
                    "of the same measurements without it)")
    args = ap.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="large-prompt-") as tmp:
        work = Path(tmp)
        model = work / "tiny-64k"
        subprocess.run([sys.executable, "-m", "app", "make-tiny-model", str(model), "--max-context", "65536"],
                       check=True, capture_output=True, timeout=600)
        port = free_port()
        with open(work / "server.log", "wb") as logf:
            proc = subprocess.Popen(
                [sys.executable, "-m", "app", "serve", "--model", str(model), "--served-model-name", "tiny",
                 "--host", "127.0.0.1", "--port", str(port), "--engine", "transformers"],
                cwd=work, stdout=logf, stderr=subprocess.STDOUT)
        try:
            wait_http(f"http://127.0.0.1:{port}/readyz", 300, proc, "server")
            result = asyncio.run(measure(f"http://127.0.0.1:{port}", args.bytes))
        finally:
            stop(proc)
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
