"""Tenants: named API keys with quotas, model access, priority and usage accounting.

`keyfile` is the keys file's schema (hashes, never keys) and its atomic writer; `registry` re-reads the file when
it changes and keeps the last good one; `limiter` holds each key's request, token and concurrency budgets;
`usage` persists per-key counters in SQLite; `context` is what one request carries through the router (which key,
its budgets, its usage); `cli` is `python -m app keys add|list|revoke`. The router's `APIKeyMiddleware`
(app/api/auth.py) is where they are enforced.
"""
