"""Per-key usage (requests, prompt and completion tokens, rate-limited requests) persisted in SQLite.

Counts are kept per UTC hour, key name and model. The request path only adds to an in-memory table; it is
written out (one transaction, upserting hour rows) when `FLUSH_S` has passed since the last write, before every
read, and when the server stops, so a restart loses at most the last few seconds and the month survives.
`path` None keeps usage in memory only (a server without `LLM_USAGE_DB`). Several processes may share a file
(SQLite's lock; upserts add), but each serving process counts only what it served.
"""

from __future__ import annotations

import logging
import sqlite3
import threading
import time
from collections import defaultdict
from dataclasses import dataclass
from datetime import UTC, date, datetime
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

FLUSH_S = 5.0
HOUR = 3600
_FIELDS = ("requests", "prompt_tokens", "completion_tokens", "rate_limited")

_SCHEMA = """
CREATE TABLE IF NOT EXISTS usage (
    hour INTEGER NOT NULL, key TEXT NOT NULL, model TEXT NOT NULL,
    requests INTEGER NOT NULL DEFAULT 0, prompt_tokens INTEGER NOT NULL DEFAULT 0,
    completion_tokens INTEGER NOT NULL DEFAULT 0, rate_limited INTEGER NOT NULL DEFAULT 0,
    PRIMARY KEY (hour, key, model)
)
"""


@dataclass
class UsageRow:
    key: str
    model: str
    requests: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    rate_limited: int = 0

    def as_dict(self) -> dict[str, Any]:
        return {"key": self.key, "model": self.model, "requests": self.requests,
                "prompt_tokens": self.prompt_tokens, "completion_tokens": self.completion_tokens,
                "total_tokens": self.prompt_tokens + self.completion_tokens, "rate_limited": self.rate_limited}


class UsageStore:
    def __init__(self, path: str | Path | None):
        self.path = Path(path) if path else None
        self._lock = threading.Lock()
        self._pending: dict[tuple[int, str, str], list[int]] = defaultdict(lambda: [0, 0, 0, 0])
        self._last_flush = time.monotonic()
        self._db = sqlite3.connect(str(self.path) if self.path else ":memory:", check_same_thread=False,
                                   timeout=10.0)
        if self.path is not None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute(_SCHEMA)
        self._db.commit()

    def add(self, key: str, model: str, *, requests: int = 0, prompt_tokens: int = 0, completion_tokens: int = 0,
            rate_limited: int = 0, at: float | None = None) -> None:
        hour = int((time.time() if at is None else at) // HOUR * HOUR)
        with self._lock:
            row = self._pending[(hour, key, model)]
            row[0] += requests
            row[1] += prompt_tokens
            row[2] += completion_tokens
            row[3] += rate_limited
        if time.monotonic() - self._last_flush >= FLUSH_S:
            self.flush()

    def flush(self) -> None:
        with self._lock:
            pending, self._pending = self._pending, defaultdict(lambda: [0, 0, 0, 0])
            self._last_flush = time.monotonic()
            if not pending:
                return
            try:
                self._db.executemany(
                    "INSERT INTO usage (hour, key, model, requests, prompt_tokens, completion_tokens, rate_limited)"
                    " VALUES (?, ?, ?, ?, ?, ?, ?) ON CONFLICT (hour, key, model) DO UPDATE SET"
                    " requests = requests + excluded.requests,"
                    " prompt_tokens = prompt_tokens + excluded.prompt_tokens,"
                    " completion_tokens = completion_tokens + excluded.completion_tokens,"
                    " rate_limited = rate_limited + excluded.rate_limited",
                    [(h, k, m, *v) for (h, k, m), v in pending.items()])
                self._db.commit()
            except sqlite3.Error as exc:  # keep counting in memory; the next flush retries
                log.error("usage store %s: write failed (%s); retrying at the next flush", self.path, exc)
                for ident, values in pending.items():
                    row = self._pending[ident]
                    for i, v in enumerate(values):
                        row[i] += v

    def query(self, start: float, end: float, key: str | None = None) -> list[UsageRow]:
        """Totals per key and model over the hours starting in [start, end) (`key`: that key's only)."""
        self.flush()
        sql = ("SELECT key, model, SUM(requests), SUM(prompt_tokens), SUM(completion_tokens), SUM(rate_limited)"
               " FROM usage WHERE hour >= ? AND hour < ?")
        args: list[Any] = [int(start // HOUR * HOUR), end]
        if key is not None:
            sql += " AND key = ?"
            args.append(key)
        sql += " GROUP BY key, model ORDER BY key, model"
        with self._lock:
            rows = self._db.execute(sql, args).fetchall()
        return [UsageRow(k, m, int(r), int(p), int(c), int(rl)) for k, m, r, p, c, rl in rows]

    def close(self) -> None:
        self.flush()
        with self._lock:
            self._db.close()


_LATEST = 253_402_300_800.0  # 10000-01-01T00:00:00Z
LATEST_SECONDS = int(_LATEST) - 1  # the largest unix-seconds bound (the API's schema states it)
Bound = str | int | float | datetime | date | None


def _moment(moment: datetime | date) -> float:
    """Unix seconds of a date (midnight UTC) or date-time (UTC when naive), clamped to [1970, 9999]: no usage
    exists outside it, so a wider window is the same window."""
    if not isinstance(moment, datetime):
        moment = datetime(moment.year, moment.month, moment.day, tzinfo=UTC)
    try:
        seconds = (moment if moment.tzinfo else moment.replace(tzinfo=UTC)).timestamp()
    except (OverflowError, ValueError):  # beyond datetime's range once the offset is applied
        seconds = 0.0 if moment.year < 1970 else _LATEST - 1
    return min(max(seconds, 0.0), _LATEST - 1)


def _instant(value: str | int | float | datetime | date, name: str) -> float:
    if isinstance(value, datetime | date):
        return _moment(value)
    if isinstance(value, int | float):
        seconds = float(value)
    else:
        text = value.strip()
        try:
            seconds = float(text)
        except ValueError:
            try:
                moment = datetime.fromisoformat(text.replace("Z", "+00:00"))
            except ValueError:
                raise ValueError(f"{name}: expected unix seconds or an ISO 8601 date/time, e.g. 2026-12-01") from None
            seconds = (moment if moment.tzinfo else moment.replace(tzinfo=UTC)).timestamp()
    if not 0 <= seconds < _LATEST:  # also NaN and infinities
        raise ValueError(f"{name}: must be between 1970 and the year 9999")
    return seconds


def usage_window(start: Bound, end: Bound, now: float | None = None) -> tuple[float, float]:
    """[start, end) of a usage query: the given bounds, or this calendar month (UTC) up to now. Strings are unix
    seconds or ISO 8601; dates and date-times (the API's typed query) are clamped to 1970..9999."""
    current = time.time() if now is None else now
    if start is not None and start != "":
        begin = _instant(start, "start")
    else:
        today = datetime.fromtimestamp(current, UTC)
        begin = today.replace(day=1, hour=0, minute=0, second=0, microsecond=0).timestamp()
    until = _instant(end, "end") if end is not None and end != "" else current + 1
    if until <= begin:
        raise ValueError("end: must be after start")
    return begin, until
