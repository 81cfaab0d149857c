"""`PrefixAwareRouter`: Ray Serve's custom request router that sends requests sharing a prompt prefix to one replica.

vLLM caches the KV of prompt prefixes on the replica that computed them; Serve's default router (power of two
choices) scatters requests that share a document over the replicas, and each recomputes it. This router
(Serve's public `ray.serve.request_router.RequestRouter`, chosen per model config)::

    deployment_config:
      request_router_config:
        request_router_class: app.ray_serve.prefix_router.PrefixAwareRouter
        request_router_kwargs: {block_chars: 128, imbalance_threshold: 4, max_blocks_per_replica: 16384}

runs in the ingress's deployment handle (on the head: it imports neither vLLM nor a tokenizer). For each
`generate` call it keys the `GenerationRequest`'s prompt text in blocks (`app.ray_serve.prefix_affinity`),
ranks the candidates with the `AffinityTable` (longest match while balanced, else least loaded) and records the
keys for the replica the request was finally routed to (`on_request_routed`). Load is the larger of the
requests this router has in flight on a replica and Serve's own queue-length cache. Replicas that leave or die
are forgotten. Requests for a multiplexed model id (LoRA `base:adapter`) choose among the replicas Serve's
multiplexing offers and key under that id. Calls without a prompt (`report`) go to the least-loaded replica.

The table lives in this router, one per deployment handle: with one ingress replica (the default) it sees all
of a model's traffic; with several, each ingress keeps its own table (affinity holds per ingress).
"""

from __future__ import annotations

import logging
from collections import Counter
from typing import Any

from ray.serve.request_router import MultiplexMixin, PendingRequest, ReplicaID, RequestRouter, RunningReplica

from app.ray_serve.prefix_affinity import (
    DEFAULT_BLOCK_CHARS,
    DEFAULT_IMBALANCE_THRESHOLD,
    DEFAULT_MAX_BLOCKS_PER_REPLICA,
    DEFAULT_MIN_MATCH_RATIO,
    AffinityTable,
    Choice,
    block_keys,
    prompt_text,
)

log = logging.getLogger("ray.serve")

ROUTER_CLASS = f"{__name__}.PrefixAwareRouter"
ROUTED_METHOD = "generate"


class PrefixAwareRouter(MultiplexMixin, RequestRouter):
    """Longest prompt-prefix match while load is balanced, least loaded otherwise (see the module docstring)."""

    KWARGS = ("block_chars", "imbalance_threshold", "max_blocks_per_replica", "min_match_ratio")

    @classmethod
    def check_kwargs(cls, kwargs: dict[str, Any]) -> list[str]:
        """Problems of a `request_router_kwargs` mapping (the model config loader calls this before deploying)."""
        unknown = sorted(set(kwargs) - set(cls.KWARGS))
        if unknown:
            return [f"unknown key(s) {unknown}; known: {', '.join(cls.KWARGS)}"]
        try:
            cls._table(**kwargs)
        except (TypeError, ValueError) as exc:
            return [str(exc)]
        return []

    @staticmethod
    def _table(block_chars: int = DEFAULT_BLOCK_CHARS, imbalance_threshold: float = DEFAULT_IMBALANCE_THRESHOLD,
               max_blocks_per_replica: int = DEFAULT_MAX_BLOCKS_PER_REPLICA,
               min_match_ratio: float = DEFAULT_MIN_MATCH_RATIO) -> tuple[int, AffinityTable]:
        if not isinstance(block_chars, int) or block_chars < 1:
            raise ValueError(f"block_chars must be an integer >= 1 (got {block_chars!r})")
        return block_chars, AffinityTable(max_blocks_per_replica=max_blocks_per_replica,
                                          imbalance_threshold=imbalance_threshold, min_match_ratio=min_match_ratio)

    def initialize_state(self, **kwargs: Any) -> None:
        """Serve calls this with `request_router_kwargs`."""
        problems = self.check_kwargs(kwargs)
        if problems:
            raise ValueError(f"{type(self).__name__}: request_router_kwargs: {'; '.join(problems)}")
        self.block_chars, self.table = self._table(**kwargs)
        self.inflight: dict[str, ReplicaID] = {}  # internal request id -> the replica it was routed to
        self.decisions: Counter[str] = Counter()  # reason -> count (for logs and tests)

    def _state(self) -> None:
        if not hasattr(self, "table"):  # Serve calls initialize_state only with kwargs; be safe without
            self.initialize_state()

    # ------------------------------------------------------------------ keys and load

    def keys_of(self, pending_request: PendingRequest | None) -> list[int]:
        """Block keys of a `generate` call's prompt (none for other calls)."""
        if pending_request is None or pending_request.metadata.call_method != ROUTED_METHOD:
            return []
        request = next((a for a in pending_request.args if hasattr(a, "prompt") and hasattr(a, "messages")), None)
        if request is None:
            return []
        text = prompt_text(request.prompt, request.messages, getattr(request, "tools", None))
        namespace = pending_request.metadata.multiplexed_model_id or ""
        return block_keys(namespace, text, self.block_chars)

    def load(self, replicas: list[RunningReplica]) -> dict[ReplicaID, float]:
        """Requests in flight per replica: ours, or Serve's queue-length cache where that says more."""
        ours = Counter(self.inflight.values())
        out: dict[ReplicaID, float] = {}
        for r in replicas:
            cached = self.replica_queue_len_cache.get(r.replica_id)
            out[r.replica_id] = max(ours.get(r.replica_id, 0), cached or 0)
        return out

    # ------------------------------------------------------------------ Serve's hooks

    async def choose_replicas(self, candidate_replicas: list[RunningReplica],
                              pending_request: PendingRequest | None = None) -> list[list[RunningReplica]]:
        self._state()
        candidates = candidate_replicas
        if pending_request is not None and pending_request.metadata.multiplexed_model_id:
            with_model = self.apply_multiplex_routing(pending_request=pending_request)
            candidates = [r for r in candidate_replicas if r.replica_id in with_model]
        if not candidates:
            return []
        choice = self.rank(candidates, pending_request)
        by_id = {r.replica_id: r for r in candidates}
        return [[by_id[i] for i in tier if i in by_id] for tier in choice.tiers if tier]

    def rank(self, candidates: list[RunningReplica], pending_request: PendingRequest | None) -> Choice:
        choice = self.table.rank([r.replica_id for r in candidates], self.keys_of(pending_request),
                                 dict(self.load(candidates)))
        self.decisions[choice.reason] += 1
        return choice

    def on_request_routed(self, pending_request: PendingRequest, replica_id: ReplicaID, result: Any) -> None:
        self._state()
        if replica_id not in self.curr_replicas:
            return
        self.inflight[pending_request.metadata.internal_request_id] = replica_id
        keys = self.keys_of(pending_request)
        if keys:
            self.table.record(replica_id, keys)

    def on_request_completed(self, replica_id: ReplicaID, internal_request_id: str) -> None:
        self._state()
        self.inflight.pop(internal_request_id, None)

    def update_replicas(self, replicas: list[RunningReplica]) -> None:
        super().update_replicas(replicas)
        self._state()
        self._forget_gone()

    def on_replica_actor_died(self, replica_id: ReplicaID) -> None:
        super().on_replica_actor_died(replica_id)
        self._state()
        self._forget_gone()

    def _forget_gone(self) -> None:
        live = set(self.curr_replicas)
        gone = [r for r in self.table.replicas() if r not in live]
        self.table.retain(live)
        self.inflight = {rid: r for rid, r in self.inflight.items() if r in live}
        if gone:
            log.info("prefix router: forgot %d replica(s) that left: %s", len(gone), [str(r) for r in gone])
