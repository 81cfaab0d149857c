"""Prefix affinity, the policy of the prefix-aware router: which replica probably holds a request's prompt prefix.

Pure Python (no Ray, no vLLM: it runs in the ingress on the head). The prompt is keyed as the engine will see
it, without rendering it (the ingress has no tokenizer): `prompt_text` writes a request's `prompt`, or its
`tools` and `messages` in order, as one string whose prefixes follow the rendered prompt's prefixes (a chat
template renders tools first and messages in order). `block_keys` cuts that string into blocks of `block_chars`
characters and chains their hashes: key i stands for the whole text up to the end of block i, rooted at the
namespace (the model id: a LoRA adapter `base:adapter` is its own namespace), so equal text of two models, or
of a chat and a completion, never shares a key. A trailing partial block is not keyed (vLLM caches full blocks).

`AffinityTable` remembers, per replica, the block keys of the prompts it was sent, least recently used first,
at most `max_blocks_per_replica` keys per replica (the oldest are forgotten, as the replica's KV cache evicts
them): memory is bounded by max_blocks_per_replica x live replicas entries (~200 bytes each: the key in the
replica's LRU and in the key -> replicas index). A replica that leaves is forgotten at once (`retain`/`forget`).

`AffinityTable.rank` is the decision: among the candidates, the replicas holding the longest run of the
request's leading blocks win while their load is within `imbalance_threshold` requests of the least loaded
candidate; a match shorter than `min_match_ratio` of the prompt's blocks counts as none; otherwise (no match,
or every holder is too far ahead) the least-loaded candidate wins, the one holding the fewest blocks among equals
(so new documents spread over the replicas). It returns Serve's ranked tiers: the chosen replicas first, then
every other candidate by load, so a full first choice falls through to the next.
"""

from __future__ import annotations

import json
from collections import OrderedDict
from collections.abc import Hashable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any, Literal

DEFAULT_BLOCK_CHARS = 128
DEFAULT_MAX_BLOCKS_PER_REPLICA = 16384  # 2 M characters of prompt per replica at 128 characters a block
DEFAULT_IMBALANCE_THRESHOLD = 4
DEFAULT_MIN_MATCH_RATIO = 0.1

Reason = Literal["prefix", "imbalance", "no_match", "no_prompt"]


def _text_of(content: Any) -> str:
    """A message's content as text: a string, or its parts (text parts as text, other parts as JSON)."""
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "".join(p["text"] if isinstance(p, dict) and isinstance(p.get("text"), str)
                       else json.dumps(p, sort_keys=True, default=str) for p in content)
    return json.dumps(content, sort_keys=True, default=str)


def prompt_text(prompt: str | None, messages: Sequence[dict[str, Any]] | None,
                tools: Sequence[dict[str, Any]] | None = None) -> str:
    """The text the prefix key is cut from: a completion's prompt, or a chat's tools then messages in order.

    The first character says which (a chat template wraps the same text differently)."""
    if messages is None:
        return "p" + (prompt or "") if prompt is not None else ""
    parts = ["c"]
    if tools:
        parts.append(json.dumps(list(tools), sort_keys=True, separators=(",", ":"), default=str) + "\n")
    for message in messages:
        parts.append(f"<{message.get('role', '')}>{_text_of(message.get('content'))}"
                     f"{_text_of(message.get('tool_calls')) if message.get('tool_calls') else ''}\n")
    return "".join(parts)


def block_keys(namespace: str, text: str, block_chars: int = DEFAULT_BLOCK_CHARS) -> list[int]:
    """Chained hashes of the full `block_chars` blocks of `text`, rooted at `namespace` (this process only)."""
    key = hash(("llm-kit-prefix", namespace))
    keys = []
    for start in range(0, len(text) - block_chars + 1, block_chars):
        key = hash((key, text[start:start + block_chars]))
        keys.append(key)
    return keys


@dataclass(frozen=True)
class Choice:
    """`rank`'s answer: Serve's tiers of replica ids, why, and the matched blocks of the chosen replica(s)."""

    tiers: list[list[Hashable]]
    reason: Reason
    matched_blocks: int = 0


class AffinityTable:
    """Per replica, the LRU-bounded set of block keys it was sent; and the ranking over candidates."""

    def __init__(self, *, max_blocks_per_replica: int = DEFAULT_MAX_BLOCKS_PER_REPLICA,
                 imbalance_threshold: float = DEFAULT_IMBALANCE_THRESHOLD,
                 min_match_ratio: float = DEFAULT_MIN_MATCH_RATIO) -> None:
        if not isinstance(max_blocks_per_replica, int) or max_blocks_per_replica < 1:
            raise ValueError(f"max_blocks_per_replica must be an integer >= 1 (got {max_blocks_per_replica!r})")
        if not isinstance(imbalance_threshold, int | float) or imbalance_threshold < 0:
            raise ValueError(f"imbalance_threshold must be a number >= 0 (got {imbalance_threshold!r})")
        if not isinstance(min_match_ratio, int | float) or not 0 <= min_match_ratio <= 1:
            raise ValueError(f"min_match_ratio must be a number within 0..1 (got {min_match_ratio!r})")
        self.max_blocks_per_replica = max_blocks_per_replica
        self.imbalance_threshold = imbalance_threshold
        self.min_match_ratio = min_match_ratio
        self._lru: dict[Hashable, OrderedDict[int, None]] = {}
        self._holders: dict[int, set[Hashable]] = {}

    # ------------------------------------------------------------------ state

    def record(self, replica: Hashable, keys: Sequence[int]) -> None:
        """`replica` was sent a prompt with these block keys: they become its most recently used ones.

        The first blocks are touched last, so they are the last to be forgotten (vLLM, too, frees a sequence's
        blocks tail first: a shared document outlives the questions after it)."""
        lru = self._lru.setdefault(replica, OrderedDict())
        for key in reversed(keys):
            if key in lru:
                lru.move_to_end(key)
            else:
                lru[key] = None
                self._holders.setdefault(key, set()).add(replica)
        while len(lru) > self.max_blocks_per_replica:
            old, _ = lru.popitem(last=False)
            self._drop_holder(old, replica)

    def forget(self, replica: Hashable) -> None:
        """Drop everything known about `replica` (it left, died or was replaced)."""
        for key in self._lru.pop(replica, {}):
            self._drop_holder(key, replica)

    def retain(self, live: Iterable[Hashable]) -> None:
        """Forget every replica not in `live`."""
        keep = set(live)
        for replica in [r for r in self._lru if r not in keep]:
            self.forget(replica)

    def _drop_holder(self, key: int, replica: Hashable) -> None:
        holders = self._holders.get(key)
        if holders is not None:
            holders.discard(replica)
            if not holders:
                del self._holders[key]

    def blocks_of(self, replica: Hashable) -> int:
        return len(self._lru.get(replica, ()))

    def size(self) -> int:
        """Entries held (keys summed over replicas): at most max_blocks_per_replica x replicas."""
        return sum(len(lru) for lru in self._lru.values())

    def replicas(self) -> list[Hashable]:
        return list(self._lru)

    # ------------------------------------------------------------------ decision

    def match(self, keys: Sequence[int], candidates: Iterable[Hashable]) -> tuple[int, list[Hashable]]:
        """The longest run of leading `keys` some candidate holds, and the candidates holding that run."""
        alive = [c for c in candidates]
        best: list[Hashable] = []
        matched = 0
        for key in keys:
            holders = self._holders.get(key)
            if not holders:
                break
            alive = [c for c in alive if c in holders]
            if not alive:
                break
            best, matched = alive, matched + 1
        return matched, best

    def rank(self, candidates: Sequence[Hashable], keys: Sequence[int], load: dict[Hashable, float]) -> Choice:
        """Serve's tiers for a request with these block keys, given each candidate's load (requests in flight)."""
        if not candidates:
            return Choice([], "no_prompt")

        def by_load(ids: Iterable[Hashable]) -> list[Hashable]:
            return sorted(ids, key=lambda r: (load.get(r, 0), self.blocks_of(r), str(r)))

        ordered = by_load(candidates)
        least = load.get(ordered[0], 0)
        if not keys:
            return Choice([ordered[:1], ordered[1:]], "no_prompt")
        matched, holders = self.match(keys, candidates)
        if matched and matched >= self.min_match_ratio * len(keys):
            near = [r for r in by_load(holders) if load.get(r, 0) - least <= self.imbalance_threshold]
            if near:
                return Choice([near, [r for r in ordered if r not in near]], "prefix", matched)
            return Choice([ordered[:1], ordered[1:]], "imbalance", matched)
        return Choice([ordered[:1], ordered[1:]], "no_match")
