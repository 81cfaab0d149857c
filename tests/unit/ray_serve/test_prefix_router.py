"""The prefix-aware request router's choice on synthetic replicas and queues (no cluster).

`PrefixAwareRouter` is Serve's `RequestRouter` subclass as Serve builds it in a handle; the replicas are small
stand-ins with the `RunningReplica` attributes the router reads (id, queue length probe, multiplexed ids).
Each request goes the way Serve's routing loop takes it: `choose_replicas` -> the first tier's least-loaded
replica -> `on_request_routed`; finishing it calls `on_request_completed`.
"""

from __future__ import annotations

import asyncio
import itertools
import random
import re
from collections import Counter
from typing import Any

import pytest
from ray.serve._private.common import (
    DeploymentHandleSource,
    DeploymentID,
    ReplicaID,
    RequestMetadata,
)
from ray.serve.request_router import PendingRequest

from app.engines.base import GenerationRequest
from app.ray_serve.prefix_affinity import AffinityTable, block_keys, prompt_text
from app.ray_serve.prefix_router import PrefixAwareRouter

DEPLOYMENT = DeploymentID(name="tiny", app_name="llm")
_ids = itertools.count()


class Replica:
    """The `RunningReplica` attributes a router reads; `queue_len` is what a probe answers."""

    def __init__(self, name: str, models: set[str] | None = None, max_ongoing: int = 64) -> None:
        self.replica_id = ReplicaID(unique_id=name, deployment_id=DEPLOYMENT)
        self.node_id = "node"
        self.availability_zone = None
        self.multiplexed_model_ids = models or set()
        self.max_ongoing_requests = max_ongoing
        self.is_cross_language = False
        self.queue_len = 0

    async def get_queue_len(self, *, deadline_s: float) -> int:
        return self.queue_len


def make_router(replicas: list[Replica], **kwargs: Any) -> PrefixAwareRouter:
    router = PrefixAwareRouter(deployment_id=DEPLOYMENT, handle_source=DeploymentHandleSource.UNKNOWN,
                               use_replica_queue_len_cache=True)
    router.initialize_state(**{"block_chars": 16, **kwargs})
    router.update_replicas(replicas)
    return router


def pending(text: str | None = None, *, chat: bool = False, model: str = "", method: str = "generate",
            ) -> PendingRequest:
    if text is None:
        args: list[Any] = []
    elif chat:
        args = [GenerationRequest(messages=[{"role": "system", "content": "You answer from the document."},
                                            {"role": "user", "content": text}])]
    else:
        args = [GenerationRequest(prompt=text)]
    rid = f"r{next(_ids)}"
    return PendingRequest(args=args, kwargs={}, metadata=RequestMetadata(
        request_id=rid, internal_request_id=rid, call_method=method, multiplexed_model_id=model, is_streaming=True))


async def route(router: PrefixAwareRouter, pr: PendingRequest) -> ReplicaID:
    """What Serve's loop does: the first non-empty tier, its least-loaded replica (by our load), then the hook."""
    tiers = await router.choose_replicas(list(router.curr_replicas.values()), pr)
    first = next(t for t in tiers if t)
    load = router.load(first)
    chosen = min(first, key=lambda r: load[r.replica_id]).replica_id
    router.on_request_routed(pr, chosen, None)
    return chosen


def done(router: PrefixAwareRouter, pr: PendingRequest, replica: ReplicaID) -> None:
    router.on_request_completed(replica, pr.metadata.internal_request_id)


def document(i: int, chars: int = 400) -> str:
    rng = random.Random(i)
    return f"[doc {i}] " + "".join(rng.choice("abcdefghij ") for _ in range(chars))


async def test_requests_sharing_a_document_stick_to_one_replica_while_balanced() -> None:
    a, b = Replica("a"), Replica("b")
    router = make_router([a, b])
    where: dict[int, set[ReplicaID]] = {}
    order = [(d, q) for d in range(6) for q in range(5)]
    random.Random(7).shuffle(order)
    for d, q in order:  # one at a time, each finished before the next: load stays balanced
        pr = pending(document(d) + f"\nQuestion {q}: why?")
        rid = await route(router, pr)
        where.setdefault(d, set()).add(rid)
        done(router, pr, rid)
    assert all(len(r) == 1 for r in where.values()), where
    per_replica = Counter(next(iter(r)).unique_id for r in where.values())
    assert per_replica == {"a": 3, "b": 3}, per_replica  # new documents go to the replica holding fewer blocks
    assert router.decisions["prefix"] == 30 - 6 and router.decisions["no_match"] == 6, router.decisions


async def test_longest_match_wins() -> None:
    a, b = Replica("a"), Replica("b")
    router = make_router([a, b])
    shared = document(1)
    done(router, pr := pending(shared), await route(router, pr))  # the bare document -> one replica
    first = router.table.replicas()[0]
    other = next(r for r in router.curr_replicas if r != first)
    longer = shared + document(2)  # the document with a long addendum, sent to the other replica by hand
    router.on_request_routed(pending(longer), other, None)
    choice = router.rank(list(router.curr_replicas.values()), pending(longer + " and a question"))
    assert choice.reason == "prefix" and choice.tiers[0] == [other], choice
    choice = router.rank(list(router.curr_replicas.values()), pending(shared + "a different addendum"))
    assert choice.reason == "prefix" and set(choice.tiers[0]) == {first, other}  # both hold the document


async def test_a_replica_running_ahead_loses_its_documents_to_the_least_loaded() -> None:
    a, b = Replica("a"), Replica("b")
    router = make_router([a, b], imbalance_threshold=3)
    doc = document(3)
    held = []
    home = None
    for q in range(4):  # four in flight on the document's replica: 4 - 0 > 3
        pr = pending(doc + f" q{q}")
        rid = await route(router, pr)
        home = home or rid
        assert rid == home  # balanced enough until then (3 - 0 <= 3)
        held.append((pr, rid))
    pr = pending(doc + " one more")
    spill = await route(router, pr)
    assert spill != home and router.decisions["imbalance"] == 1
    # now both hold the document: the next one goes to the less loaded of the two, still a prefix match
    nxt = await route(router, pending(doc + " and another"))
    assert nxt == spill and router.decisions["prefix"] >= 4
    for p, rid in held:
        done(router, p, rid)
    assert router.load(list(router.curr_replicas.values()))[home] == 0


async def test_serves_queue_length_cache_counts_as_load() -> None:
    """Load this router did not send (another ingress) shows in Serve's queue-length cache and counts too."""
    a, b = Replica("a"), Replica("b")
    router = make_router([a, b], imbalance_threshold=2)
    doc = document(4)
    home = await route(router, pr := pending(doc))
    done(router, pr, home)
    router.on_new_queue_len_info(home, 10)
    assert await route(router, pending(doc + "?")) != home


async def test_memory_is_bounded_and_the_oldest_prefixes_are_forgotten() -> None:
    a, b = Replica("a"), Replica("b")
    router = make_router([a, b], max_blocks_per_replica=40)
    for d in range(60):
        done(router, pr := pending(document(d, chars=200)), await route(router, pr))  # 13 blocks a document
    assert router.table.size() <= 40 * 2
    assert max(router.table.blocks_of(r) for r in router.curr_replicas) <= 40
    replicas = list(router.curr_replicas.values())
    old = router.rank(replicas, pending(document(0, chars=200) + "?"))
    recent = router.rank(replicas, pending(document(59, chars=200) + "?"))
    assert old.reason == "no_match" and recent.reason == "prefix"


def test_the_table_bound_holds_for_any_sequence() -> None:
    table = AffinityTable(max_blocks_per_replica=5)
    rng = random.Random(1)
    for _ in range(2000):
        table.record(rng.choice("xyz"), [rng.randrange(100) for _ in range(rng.randrange(1, 9))])
        assert table.size() <= 5 * 3
    assert all(table._holders.values())  # no empty holder sets are kept
    for r in "xyz":
        table.forget(r)
    assert table.size() == 0 and not table._holders


async def test_equal_prompts_of_different_models_or_adapters_never_match() -> None:
    models = {"tiny:a", "tiny:b"}
    a, b = Replica("a", models), Replica("b", models)
    router = make_router([a, b])
    doc = document(5)
    done(router, pr := pending(doc, model="tiny:a"), await route(router, pr))
    replicas = list(router.curr_replicas.values())
    assert router.rank(replicas, pending(doc, model="tiny:a")).reason == "prefix"
    assert router.rank(replicas, pending(doc, model="tiny:b")).reason == "no_match"
    assert router.rank(replicas, pending(doc)).reason == "no_match"  # the base model
    # and a chat carrying the same text as a completion's prompt is rendered differently: no match either
    done(router, pr := pending(doc), await route(router, pr))
    assert router.rank(replicas, pending(doc, chat=True)).reason == "no_match"
    assert block_keys("m1", "x" * 64, 16) != block_keys("m2", "x" * 64, 16)
    assert not set(block_keys("m1", "x" * 64, 16)) & set(block_keys("m2", "x" * 64, 16))


async def test_multiplexed_requests_choose_among_replicas_holding_the_adapter() -> None:
    a, b = Replica("a", {"tiny:a"}), Replica("b", {"tiny:b"})
    router = make_router([a, b])
    for _ in range(3):
        assert (await route(router, pending(document(6), model="tiny:b"))).unique_id == "b"


async def test_replicas_that_leave_are_forgotten_and_their_documents_move() -> None:
    a, b = Replica("a"), Replica("b")
    router = make_router([a, b])
    docs = [document(d) for d in range(4)]
    home = {}
    for i, doc in enumerate(docs):
        home[i] = await route(router, pr := pending(doc))
        done(router, pr, home[i])
    lost = a.replica_id
    assert lost in home.values() and b.replica_id in home.values()
    router.on_replica_actor_died(lost)
    assert lost not in router.table.replicas()
    router.update_replicas([b])  # what Serve's controller then broadcasts
    for doc in docs:
        assert await route(router, pending(doc + "?")) == b.replica_id
    c = Replica("c")  # the replacement starts empty: new documents go there, old ones stay on b (a match)
    router.update_replicas([b, c])
    assert await route(router, pending(docs[0] + "!")) == b.replica_id
    assert await route(router, pending(document(9))) == c.replica_id
    assert router.inflight and all(r in (b.replica_id, c.replica_id) for r in router.inflight.values())


async def test_calls_without_a_prompt_go_to_the_least_loaded() -> None:
    a, b = Replica("a"), Replica("b")
    router = make_router([a, b])
    busy = await route(router, pending(document(7)))  # in flight
    for _ in range(2):
        rid = await route(router, pr := pending(None, method="report"))
        assert rid != busy
        done(router, pr, rid)
    assert router.decisions["no_prompt"] == 2
    short = await route(router, pending("hi"))  # shorter than a block: nothing to key
    assert short != busy and router.decisions["no_prompt"] == 3


def test_prompt_text_follows_the_rendered_prompts_prefixes() -> None:
    msgs: list[dict[str, Any]] = [{"role": "system", "content": "S"},
                                  {"role": "user", "content": [{"type": "text", "text": "doc"}]}]
    one = prompt_text(None, msgs)
    two = prompt_text(None, [*msgs, {"role": "assistant", "content": "A"}, {"role": "user", "content": "Q"}])
    assert two.startswith(one) and one.startswith("c")
    assert prompt_text("doc", None) == "pdoc" and prompt_text(None, None) == ""
    tools = [{"type": "function", "function": {"name": "f"}}]
    assert prompt_text(None, msgs, tools) != one


def test_bad_router_kwargs_are_refused() -> None:
    async def make(**kw: Any) -> None:
        make_router([], **kw)

    for kw, needle in (({"block_char": 8}, "unknown key(s) ['block_char']"),
                       ({"block_chars": 0}, "block_chars must be an integer >= 1"),
                       ({"max_blocks_per_replica": 0}, "max_blocks_per_replica must be an integer >= 1"),
                       ({"imbalance_threshold": -1}, "imbalance_threshold must be a number >= 0"),
                       ({"min_match_ratio": 2}, "min_match_ratio must be a number within 0..1")):
        with pytest.raises(ValueError, match=re.escape(needle)):
            asyncio.run(make(**kw))
