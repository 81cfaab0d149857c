"""CPU the API layer spends per streamed token, in-process: the router, SSE framing and the stream plumbing.

    python -m bench.api_overhead --streams 8 --tokens 400 --repeats 5

Serves the ONE API app (`create_app` + `LocalBackend`) over an in-process ASGI transport with the unit tests'
`FakeEngine` (tests/support/fakes.py: one word per token, no model), streams `--streams` concurrent completions of
`--tokens` tokens each and reports the process CPU time per streamed token (best of `--repeats`; the httpx
client parsing the SSE runs in the same process and is included). CPU time of one process, not wall time, so
it holds on a noisy shared box where req/s figures swing by a third between runs. The engine does no work, so
the figure is what the API adds to every token the standalone server, the Ray ingress or DeepSpeed rank 0
streams.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


async def measure(streams: int, tokens: int, repeats: int) -> dict[str, float | int]:
    import httpx

    sys.path.insert(0, str(ROOT))
    from app.api.app import create_app
    from app.api.backend import LocalBackend
    from app.metrics import PrometheusSink
    from bench.fake_engine import FakeEngine

    sink = PrometheusSink()
    engine = FakeEngine("fake", metrics=sink, max_num_seqs=streams, max_waiting=streams, max_context=tokens + 64)
    await engine.start()
    app = create_app(LocalBackend({"fake": engine}), metrics=sink, manage_backend=False)
    body = {"model": "fake", "prompt": "x", "max_tokens": tokens, "stream": True}
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://api") as client:

        async def one() -> int:
            n = 0
            async with client.stream("POST", "/v1/completions", json=body) as resp:
                resp.raise_for_status()
                async for line in resp.aiter_lines():
                    n += line.startswith("data: {")
            return n

        await asyncio.gather(*(one() for _ in range(streams)))  # warm-up
        best = float("inf")
        counted = 0
        for _ in range(repeats):
            t0 = time.process_time()
            counted = sum(await asyncio.gather(*(one() for _ in range(streams))))
            best = min(best, (time.process_time() - t0) / max(counted, 1))
    return {"streams": streams, "tokens": tokens, "repeats": repeats, "events_per_round": counted,
            "cpu_us_per_token": round(best * 1e6, 1)}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--streams", type=int, default=8, help="concurrent streamed completions")
    ap.add_argument("--tokens", type=int, default=400, help="tokens per completion")
    ap.add_argument("--repeats", type=int, default=5, help="rounds; the best one is reported")
    ap.add_argument("--json", action="store_true", help="print the result as JSON")
    args = ap.parse_args(argv)
    result = asyncio.run(measure(args.streams, args.tokens, args.repeats))
    print(json.dumps(result) if args.json else
          f"{result['cpu_us_per_token']} us CPU per streamed token (best of {args.repeats} rounds of "
          f"{args.streams} x {args.tokens} tokens)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
