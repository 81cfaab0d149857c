"""Per-key budgets: requests per minute, tokens per minute and requests in flight.

RPM and TPM are token buckets (OpenAI's own model: a budget that refills continuously), each holding up to a
minute's allowance and refilling at limit/60 per second, so a key that spent its minute waits only for the next
request's share (`Retry-After`), not for a fixed window to end. A request is admitted while the request bucket
holds one and the token bucket is not in debt: tokens are not known before the engine has tokenized the prompt,
so they are charged as they become known (prompt tokens with the first chunk, completion tokens as they stream)
and may take the bucket below zero; the next request then waits until it has refilled.

State lives in this process only: each serving process (the Ray ingress, the fallback, DeepSpeed rank 0)
enforces its own budgets (README, "Keys, limits and usage").
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field

from app.tenants.keyfile import KeyEntry

WINDOW_S = 60.0
_REQUEST_HEADERS = (b"x-ratelimit-limit-requests", b"x-ratelimit-remaining-requests", b"x-ratelimit-reset-requests")
_TOKEN_HEADERS = (b"x-ratelimit-limit-tokens", b"x-ratelimit-remaining-tokens", b"x-ratelimit-reset-tokens")
CONCURRENCY_RETRY_S = 1.0


@dataclass
class Bucket:
    capacity: float
    level: float
    stamp: float = field(default_factory=time.monotonic)

    @property
    def rate(self) -> float:
        return self.capacity / WINDOW_S

    def refill(self, now: float) -> None:
        self.level = min(self.capacity, self.level + (now - self.stamp) * self.rate)
        self.stamp = now

    def wait_for(self, amount: float) -> float:
        """Seconds until the bucket holds `amount` (0: it does)."""
        return 0.0 if self.level >= amount else (amount - self.level) / self.rate

    def reset_s(self) -> float:
        """Seconds until the bucket is full again (OpenAI's x-ratelimit-reset-*)."""
        return (self.capacity - self.level) / self.rate

    def resize(self, capacity: float) -> None:
        if capacity != self.capacity:
            self.level = min(self.level, capacity) if self.level < self.capacity else capacity
            self.capacity = capacity


@dataclass
class Refusal:
    """Why a request is refused now: which limit, and when to retry."""

    limit: str  # requests | tokens | concurrency
    message: str
    retry_after_s: float


@dataclass
class KeyBudget:
    """One key's buckets and in-flight count; `entry` is re-pointed when the keys file changes."""

    entry: KeyEntry
    requests: Bucket | None = None
    tokens: Bucket | None = None
    in_flight: int = 0

    def sync(self, entry: KeyEntry, now: float) -> None:
        self.entry = entry
        self.requests = _synced(self.requests, entry.rpm, now)
        self.tokens = _synced(self.tokens, entry.tpm, now)

    def admit(self) -> Refusal | None:
        """Take one request from the budget (and one concurrency slot), or say why not."""
        now = time.monotonic()
        e = self.entry
        if e.concurrency is not None and self.in_flight >= e.concurrency:
            return Refusal("concurrency", f"Rate limit reached for key {e.name!r} on concurrent requests: limit "
                           f"{e.concurrency}, in flight {self.in_flight}. Retry when one has finished.",
                           CONCURRENCY_RETRY_S)
        if self.requests is not None:
            self.requests.refill(now)
            if (wait := self.requests.wait_for(1.0)) > 0:
                return Refusal("requests", f"Rate limit reached for key {e.name!r} on requests per min (RPM): "
                               f"limit {e.rpm}. Please try again in {_duration(wait)}.", wait)
        if self.tokens is not None:
            self.tokens.refill(now)
            if (wait := self.tokens.wait_for(0.0)) > 0:
                return Refusal("tokens", f"Rate limit reached for key {e.name!r} on tokens per min (TPM): limit "
                               f"{e.tpm}. Please try again in {_duration(wait)}.", wait)
        if self.requests is not None:
            self.requests.level -= 1.0
        self.in_flight += 1
        return None

    def release(self) -> None:
        self.in_flight = max(0, self.in_flight - 1)

    def charge(self, tokens: int) -> None:
        if self.tokens is not None and tokens:
            self.tokens.refill(time.monotonic())
            self.tokens.level -= tokens

    def headers(self) -> list[tuple[bytes, bytes]]:
        """OpenAI's x-ratelimit-* headers for the limits this key has."""
        out: list[tuple[bytes, bytes]] = []
        now = time.monotonic()
        for names, bucket in ((_REQUEST_HEADERS, self.requests), (_TOKEN_HEADERS, self.tokens)):
            if bucket is None:
                continue
            bucket.refill(now)
            out += [(names[0], b"%d" % bucket.capacity), (names[1], b"%d" % max(0, math.floor(bucket.level))),
                    (names[2], _duration(bucket.reset_s()).encode())]
        return out


def _synced(bucket: Bucket | None, limit: int | None, now: float) -> Bucket | None:
    if limit is None:
        return None
    if bucket is None:
        return Bucket(float(limit), float(limit), now)
    bucket.refill(now)
    bucket.resize(float(limit))
    return bucket


def _duration(seconds: float) -> str:
    """OpenAI's reset format: `20ms`, `1.5s`, `6m0s`."""
    if seconds < 1.0:
        return f"{max(0, math.ceil(seconds * 1000))}ms"
    if seconds < 60.0:
        return f"{math.ceil(seconds * 10) / 10:g}s"
    minutes, rest = divmod(math.ceil(seconds), 60)
    return f"{minutes}m{rest}s"


class Limiter:
    """Every key's budget in this process, keyed by name (a key's budget survives re-reads of the file)."""

    def __init__(self) -> None:
        self._budgets: dict[str, KeyBudget] = {}

    def budget(self, entry: KeyEntry) -> KeyBudget:
        b = self._budgets.get(entry.name)
        if b is None:
            b = self._budgets[entry.name] = KeyBudget(entry)
            b.sync(entry, time.monotonic())
        elif b.entry is not entry:
            b.sync(entry, time.monotonic())
        return b
