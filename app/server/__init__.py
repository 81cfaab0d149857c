"""Servers that mount the API: the standalone uvicorn server lives here."""
