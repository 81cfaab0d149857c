"""Server-side OpenAI Batch API: `/v1/files` and `/v1/batches`, a durable runner, the batch CLI.

- `store`: the SQLite (WAL) state: files, batches, one row per input line with its outcome.
- `shapes`: OpenAI's File and Batch objects and the create request, as pydantic models.
- `validation`: every input line checked up front with the router's own request models.
- `runner`: sends pending lines to the target (the front door) with the kit's client and retry policy.
- `routes`: the FastAPI router; `service`: the store + runner pair a server mounts.
- `server`: `python -m app batch-server`, the compose service; `cli`: `python -m app batch submit|status|...`.
"""
