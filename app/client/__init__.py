"""Client side of the kit: the batch client (`python -m app batch`) and the benchmark harness (`python -m app bench`).

Both talk to any OpenAI-compatible endpoint (our nginx front door, Ray Serve, the
standalone server, or something else) over httpx; `wire` holds the one request
function they share.
"""
