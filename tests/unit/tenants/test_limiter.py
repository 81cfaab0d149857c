"""Token-bucket budgets per key: requests, tokens (charged after the fact) and concurrency; OpenAI's headers."""

from __future__ import annotations

import time

from app.tenants.keyfile import KeyEntry, hash_key
from app.tenants.limiter import Bucket, Limiter, _duration


def entry(**kw: int) -> KeyEntry:
    return KeyEntry(name="k", hash=hash_key("k"), **kw)  # type: ignore[arg-type]


def test_rpm_admits_a_minutes_allowance_then_says_when_the_next_one_fits() -> None:
    budget = Limiter().budget(entry(rpm=3))
    assert [budget.admit() for _ in range(3)] == [None, None, None]
    refusal = budget.admit()
    assert refusal is not None and refusal.limit == "requests" and 0 < refusal.retry_after_s <= 20.0
    assert "requests per min (RPM): limit 3" in refusal.message
    headers = dict(budget.headers())
    assert headers[b"x-ratelimit-limit-requests"] == b"3" and headers[b"x-ratelimit-remaining-requests"] == b"0"
    assert headers[b"x-ratelimit-reset-requests"].endswith(b"s")


def test_tokens_are_charged_after_admission_and_block_while_in_debt() -> None:
    budget = Limiter().budget(entry(tpm=60))
    assert budget.admit() is None
    budget.charge(90)  # the request used more than was left: the bucket goes into debt
    refusal = budget.admit()
    assert refusal is not None and refusal.limit == "tokens" and 29 < refusal.retry_after_s <= 31
    assert dict(budget.headers())[b"x-ratelimit-remaining-tokens"] == b"0"


def test_concurrency_counts_requests_in_flight() -> None:
    budget = Limiter().budget(entry(concurrency=1))
    assert budget.admit() is None
    refusal = budget.admit()
    assert refusal is not None and refusal.limit == "concurrency"
    budget.release()
    assert budget.admit() is None


def test_a_budget_survives_a_reread_and_follows_a_changed_limit() -> None:
    limiter = Limiter()
    first = limiter.budget(entry(rpm=2))
    assert first.admit() is None and first.admit() is None
    again = limiter.budget(entry(rpm=2))  # the file re-read: a new entry object, the same key name
    assert again is first and again.admit() is not None
    raised = limiter.budget(entry(rpm=100))
    assert raised.requests is not None and raised.requests.capacity == 100


def test_buckets_refill_at_a_sixtieth_of_the_limit_per_second() -> None:
    b = Bucket(60.0, 0.0, time.monotonic() - 2.0)
    b.refill(time.monotonic())
    assert 1.9 < b.level < 2.2 and b.wait_for(5.0) > 2.5


def test_durations_use_openais_format() -> None:
    assert _duration(0.02) == "20ms" and _duration(1.5) == "1.5s" and _duration(360) == "6m0s"
