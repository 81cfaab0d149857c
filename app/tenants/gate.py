"""What the router asks of tenants: who sent a request, may it start now, and what did it use.

`TenantGate` is made once per app (`create_app`) from the keys file, `API_KEYS` and the usage store.
`APIKeyMiddleware` calls `identify` (401 reasons) and, for generation requests, `admit` (a `Refusal` becomes a
429; otherwise a `RequestTenancy` rides in the request's scope state). The serving layer charges tokens to it as
they stream (`charge`) and records the finished request (`record`); the middleware releases the concurrency
slot when the response has been sent and records requests the serving layer never saw (bad body, unknown model).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from app import metrics
from app.metrics import MetricsSink
from app.tenants.limiter import KeyBudget, Limiter, Refusal
from app.tenants.registry import ANONYMOUS_TENANT, KeyRegistry, Tenant
from app.tenants.usage import UsageStore

TENANT = "tenant"  # the request's Tenant in scope["state"] (absent: no valid key)
TENANCY = "tenancy"  # the admitted generation request's RequestTenancy in scope["state"]
GENERATION_PATHS = frozenset({"/v1/chat/completions", "/v1/completions"})


class TenantGate:
    def __init__(self, registry: KeyRegistry, sink: MetricsSink, usage: UsageStore | None = None):
        self.registry = registry
        self.sink = sink
        self.usage = usage or UsageStore(None)
        self.limiter = Limiter()

    @classmethod
    def build(cls, sink: MetricsSink, *, api_keys: list[str] | None = None, keys_file: str | None = None,
              usage_db: str | None = None, model_ids: Callable[[], list[str]] | None = None,
              check_globs: bool = True) -> TenantGate:
        registry = KeyRegistry(keys_file or None, api_keys, model_ids=model_ids, check_globs=check_globs)
        return cls(registry, sink, UsageStore(usage_db or None))

    @property
    def enabled(self) -> bool:
        return self.registry.enabled

    def identify(self, authorization: str) -> Tenant | str:
        """The tenant behind an `Authorization` header value, or why it does not authenticate."""
        if not self.registry.enabled:
            return ANONYMOUS_TENANT
        scheme, _, token = authorization.partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            return "missing API key: send 'Authorization: Bearer <key>'"
        return self.registry.identify(token.strip())

    @property
    def accounts(self) -> bool:
        """True with a keys file: requests are then accounted per key (without one there is only `anonymous`,
        which `llm_requests_total` already counts, and the router skips the bookkeeping)."""
        return self.registry.path is not None

    def admit(self, tenant: Tenant) -> RequestTenancy | Refusal:
        budget = self.limiter.budget(tenant.entry) if tenant.limited else None
        if budget is not None and (refusal := budget.admit()) is not None:
            self.sink.inc(metrics.KEY_RATE_LIMITED, {"model": "-", "engine": "-", "key": tenant.name,
                                                     "limit": refusal.limit})
            self.sink.inc(metrics.KEY_REQUESTS, {"model": "-", "engine": "-", "key": tenant.name, "status": "429"})
            self.usage.add(tenant.name, "-", requests=1, rate_limited=1)
            return refusal
        return RequestTenancy(self, tenant, budget)

    def headers(self, tenant: Tenant) -> list[tuple[bytes, bytes]]:
        return self.limiter.budget(tenant.entry).headers() if tenant.limited else []

    def close(self) -> None:
        self.usage.close()


@dataclass
class RequestTenancy:
    """One admitted generation request of one tenant."""

    gate: TenantGate
    tenant: Tenant
    budget: KeyBudget | None
    recorded: bool = False
    released: bool = False
    charged: list[int] = field(default_factory=lambda: [0, 0])

    @property
    def name(self) -> str:
        return self.tenant.name

    @property
    def meters_tokens(self) -> bool:
        """True when the key has a tokens-per-minute budget (tokens are then charged as they stream)."""
        return self.budget is not None and self.budget.tokens is not None

    @property
    def priority(self) -> str:
        return self.tenant.entry.priority

    def charge(self, prompt_total: int, completion_total: int) -> None:
        """The request's token totals so far: the growth since the last call is taken from the key's TPM."""
        delta = (prompt_total - self.charged[0]) + (completion_total - self.charged[1])
        self.charged = [prompt_total, completion_total]
        if self.budget is not None and delta > 0:
            self.budget.charge(delta)

    def record(self, model: str, engine: str, status: int, prompt_tokens: int = 0, completion_tokens: int = 0
               ) -> None:
        if self.recorded:
            return
        self.recorded = True
        self.charge(prompt_tokens, completion_tokens)
        labels = {"model": model, "engine": engine, "key": self.name}
        sink = self.gate.sink
        sink.inc(metrics.KEY_REQUESTS, {**labels, "status": str(status)})
        if prompt_tokens:
            sink.inc(metrics.KEY_TOKENS, {**labels, "kind": "prompt"}, prompt_tokens)
        if completion_tokens:
            sink.inc(metrics.KEY_TOKENS, {**labels, "kind": "completion"}, completion_tokens)
        self.gate.usage.add(self.name, model, requests=1, prompt_tokens=prompt_tokens,
                            completion_tokens=completion_tokens)

    def release(self) -> None:
        if not self.released and self.budget is not None:
            self.budget.release()
        self.released = True

    def headers(self) -> list[tuple[bytes, bytes]]:
        return self.budget.headers() if self.budget is not None else []


def tenant_of(scope: Any) -> Tenant | None:
    state = scope.get("state") if isinstance(scope, dict) else None
    value = (state or {}).get(TENANT)
    return value if isinstance(value, Tenant) else None


def tenancy_of(scope: Any) -> RequestTenancy | None:
    state = scope.get("state") if isinstance(scope, dict) else None
    value = (state or {}).get(TENANCY)
    return value if isinstance(value, RequestTenancy) else None
