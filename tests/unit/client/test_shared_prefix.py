"""The shared-prefix benchmark load and the reading of vLLM's prefix-cache counters (in process)."""

from __future__ import annotations

from collections import Counter

from app.client.shared_prefix import SharedPrefixLoad, cache_counters, counter_delta, hit_rate

RAY_TEXT = """# HELP ray_vllm_prefix_cache_queries_total x
# TYPE ray_vllm_prefix_cache_queries_total counter
ray_vllm_prefix_cache_queries_total{ReplicaId="r1",engine="0",model_name="tiny"} 1000.0
ray_vllm_prefix_cache_queries_total{ReplicaId="r2",engine="0",model_name="tiny"} 500.0
ray_vllm_prefix_cache_queries_total{ReplicaId="r3",engine="0",model_name="other"} 99.0
# HELP ray_vllm_prefix_cache_hits_total x
# TYPE ray_vllm_prefix_cache_hits_total counter
ray_vllm_prefix_cache_hits_total{ReplicaId="r1",engine="0",model_name="tiny"} 640.0
ray_vllm_prefix_cache_hits_total{ReplicaId="r2",engine="0",model_name="tiny"} 0.0
# HELP ray_vllm_external_prefix_cache_hits_total x
# TYPE ray_vllm_external_prefix_cache_hits_total counter
ray_vllm_external_prefix_cache_hits_total{ReplicaId="r1",engine="0",model_name="tiny"} 7.0
"""
STANDALONE_TEXT = """# TYPE vllm:prefix_cache_queries_total counter
vllm:prefix_cache_queries_total{engine="0",model_name="tiny"} 10.0
# TYPE vllm:prefix_cache_hits_total counter
vllm:prefix_cache_hits_total{engine="0",model_name="tiny"} 5.0
"""


def test_documents_never_share_a_prefix_and_the_load_is_seeded() -> None:
    load = SharedPrefixLoad(documents=5, doc_words=40, questions=4, seed=3, nonce="n")
    items = load.items()
    assert len(items) == 20 and Counter(i.document for i in items) == {d: 4 for d in range(5)}
    docs = [load.document(d) for d in range(5)]
    # two documents differ from their first characters on: no block of one can be cached for another
    assert len({d[:len("[n document 0")] for d in docs}) == 5
    assert all(i.prompt.startswith(docs[i.document]) for i in items)
    assert [i.prompt for i in items] == [i.prompt for i in SharedPrefixLoad(5, 40, 4, seed=3, nonce="n").items()]
    assert [(i.document, i.question) for i in items] != sorted((i.document, i.question) for i in items)  # shuffled
    other = SharedPrefixLoad(5, 40, 4, seed=3, nonce="m")  # another run: same words, its own documents
    assert other.document(0)[len("[m"):] == docs[0][len("[n"):] and other.document(0) != docs[0]


def test_counters_per_replica_from_rays_and_vllms_own_names() -> None:
    assert cache_counters(RAY_TEXT, "tiny") == {"r1": {"queries": 1000.0, "hits": 640.0},
                                               "r2": {"queries": 500.0, "hits": 0.0}}
    assert cache_counters(STANDALONE_TEXT, "tiny") == {"engine 0": {"queries": 10.0, "hits": 5.0}}
    before = {"r1": {"queries": 400.0, "hits": 40.0}, "r2": {"queries": 900.0, "hits": 9.0}}
    delta = counter_delta(before, cache_counters(RAY_TEXT, "tiny"))
    assert delta == {"r1": {"queries": 600.0, "hits": 600.0}, "r2": {"queries": 500.0, "hits": 0.0}}  # r2 restarted
    assert hit_rate(delta) == round(600 / 1100, 4) and hit_rate({}) is None
