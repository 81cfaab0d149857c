"""The batch service's durable state: one SQLite database (WAL) and the files beside it, on one volume.

Tables: `files` (uploaded inputs and the output/error files the service writes; the bytes live in
`<dir>/files/<id>.jsonl`, a name the service makes, never the client's filename), `batches` (the Batch object
as JSON plus its status and owner) and `lines` (one row per input line: custom_id, the request body, and once
it is done its outcome record). A line's outcome is written by one `UPDATE ... WHERE state = 'pending'`, so it
is committed once even if a request was sent twice around a crash; output files are rebuilt from `lines` in
line order, so they hold every custom_id exactly once. `synchronous=NORMAL` under WAL: a killed process loses
no committed transaction (only a power cut could lose the last ones).

Owners are an opaque digest of the API key that created an object (no keys configured: one shared owner);
every read filters by owner, so another key's id is simply not found.
"""

from __future__ import annotations

import hashlib
import json
import os
import sqlite3
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from app.batch.shapes import ACTIVE_STATUSES, Batch, FileObject, RequestCounts

_SCHEMA = """
CREATE TABLE IF NOT EXISTS files (
    seq INTEGER PRIMARY KEY AUTOINCREMENT, id TEXT UNIQUE NOT NULL, owner TEXT NOT NULL, data TEXT NOT NULL,
    purpose TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS batches (
    seq INTEGER PRIMARY KEY AUTOINCREMENT, id TEXT UNIQUE NOT NULL, owner TEXT NOT NULL, status TEXT NOT NULL,
    data TEXT NOT NULL);
CREATE INDEX IF NOT EXISTS batches_status ON batches(status);
CREATE TABLE IF NOT EXISTS lines (
    batch_id TEXT NOT NULL, line_no INTEGER NOT NULL, custom_id TEXT NOT NULL, body TEXT NOT NULL,
    state TEXT NOT NULL DEFAULT 'pending', record TEXT, PRIMARY KEY (batch_id, line_no)) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS lines_state ON lines(batch_id, state);
"""


def owner_of(api_key: str) -> str:
    """The owner tag of a bearer key ('' when the server has no keys)."""
    return hashlib.sha256(api_key.encode()).hexdigest()[:32] if api_key else ""


def new_file_id() -> str:
    return "file-" + uuid.uuid4().hex


def new_batch_id() -> str:
    return "batch_" + uuid.uuid4().hex


def now() -> int:
    return int(time.time())


class Store:
    """SQLite state under `data_dir` (created if missing). Thread-safe: one connection behind a lock."""

    def __init__(self, data_dir: Path | str):
        self.dir = Path(data_dir)
        self.files_dir = self.dir / "files"
        self.files_dir.mkdir(parents=True, exist_ok=True)
        self._lock = threading.RLock()
        self._db = sqlite3.connect(self.dir / "batch.sqlite3", check_same_thread=False, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=NORMAL")
        self._db.execute("PRAGMA busy_timeout=5000")
        self._db.executescript(_SCHEMA)

    def close(self) -> None:
        with self._lock:
            self._db.close()

    def _rows(self, sql: str, args: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
        with self._lock:
            return self._db.execute(sql, args).fetchall()

    # ------------------------------------------------------------------------------------------- files

    def file_path(self, file_id: str) -> Path:
        """Where a file's bytes live: a name from our own id (the id is looked up before this is called)."""
        return self.files_dir / f"{file_id}.jsonl"

    def add_file(self, owner: str, obj: FileObject) -> None:
        with self._lock:
            self._db.execute("INSERT OR REPLACE INTO files (id, owner, data, purpose) VALUES (?, ?, ?, ?)",
                             (obj.id, owner, obj.model_dump_json(), obj.purpose))

    def get_file(self, owner: str, file_id: str) -> FileObject | None:
        rows = self._rows("SELECT data FROM files WHERE id = ? AND owner = ?", (file_id, owner))
        return FileObject.model_validate_json(rows[0][0]) if rows else None

    def list_files(self, owner: str, *, after: str | None, limit: int, purpose: str | None,
                   ascending: bool = False) -> tuple[list[FileObject], bool]:
        sql, args = "SELECT data FROM files WHERE owner = ?", [owner]
        if purpose:
            sql += " AND purpose = ?"
            args.append(purpose)
        if after:
            sql += f" AND seq {'>' if ascending else '<'} (SELECT seq FROM files WHERE id = ? AND owner = ?)"
            args += [after, owner]
        sql += f" ORDER BY seq {'ASC' if ascending else 'DESC'} LIMIT ?"
        rows = self._rows(sql, (*args, limit + 1))
        return [FileObject.model_validate_json(r[0]) for r in rows[:limit]], len(rows) > limit

    def delete_file(self, owner: str, file_id: str) -> bool:
        with self._lock:
            gone = self._db.execute("DELETE FROM files WHERE id = ? AND owner = ?", (file_id, owner)).rowcount
        if gone:
            self.file_path(file_id).unlink(missing_ok=True)
        return bool(gone)

    # ----------------------------------------------------------------------------------------- batches

    def add_batch(self, owner: str, batch: Batch) -> None:
        with self._lock:
            self._db.execute("INSERT INTO batches (id, owner, status, data) VALUES (?, ?, ?, ?)",
                             (batch.id, owner, batch.status, batch.model_dump_json()))

    def save_batch(self, batch: Batch, *, only_if: tuple[str, ...] = ()) -> bool:
        """Write `batch` back; with `only_if`, only while its stored status is one of those (False otherwise)."""
        sql = "UPDATE batches SET status = ?, data = ? WHERE id = ?"
        args: tuple[Any, ...] = (batch.status, batch.model_dump_json(), batch.id)
        if only_if:
            sql += f" AND status IN ({','.join('?' * len(only_if))})"
            args += only_if
        with self._lock:
            return bool(self._db.execute(sql, args).rowcount)

    def _load(self, data: str) -> Batch:
        batch = Batch.model_validate_json(data)
        if batch.status in ("in_progress", "finalizing", "cancelling"):
            batch.request_counts = self.counts(batch.id)
        return batch

    def get_batch(self, owner: str | None, batch_id: str) -> Batch | None:
        """The batch with live request_counts; `owner=None` (the runner) skips the owner check."""
        if owner is None:
            rows = self._rows("SELECT data FROM batches WHERE id = ?", (batch_id,))
        else:
            rows = self._rows("SELECT data FROM batches WHERE id = ? AND owner = ?", (batch_id, owner))
        return self._load(rows[0][0]) if rows else None

    def owner_of_batch(self, batch_id: str) -> str:
        rows = self._rows("SELECT owner FROM batches WHERE id = ?", (batch_id,))
        return str(rows[0][0]) if rows else ""

    def list_batches(self, owner: str, *, after: str | None, limit: int) -> tuple[list[Batch], bool]:
        sql, args = "SELECT data FROM batches WHERE owner = ?", [owner]
        if after:
            sql += " AND seq < (SELECT seq FROM batches WHERE id = ? AND owner = ?)"
            args += [after, owner]
        rows = self._rows(sql + " ORDER BY seq DESC LIMIT ?", (*args, limit + 1))
        return [self._load(r[0]) for r in rows[:limit]], len(rows) > limit

    def active_batch_ids(self) -> list[str]:
        marks = ",".join("?" * len(ACTIVE_STATUSES))
        return [r[0] for r in self._rows(f"SELECT id FROM batches WHERE status IN ({marks}) ORDER BY seq",
                                         ACTIVE_STATUSES)]

    def status_counts(self) -> dict[str, int]:
        return {str(s): int(n) for s, n in self._rows("SELECT status, COUNT(*) FROM batches GROUP BY status")}

    # ------------------------------------------------------------------------------------------- lines

    def insert_lines(self, batch_id: str, rows: list[tuple[int, str, str]]) -> None:
        """All input lines of a batch, in one transaction (a restart during validation redoes it whole)."""
        with self._lock:
            self._db.execute("BEGIN")
            try:
                self._db.execute("DELETE FROM lines WHERE batch_id = ?", (batch_id,))
                self._db.executemany("INSERT INTO lines (batch_id, line_no, custom_id, body) VALUES (?, ?, ?, ?)",
                                     [(batch_id, n, cid, body) for n, cid, body in rows])
                self._db.execute("COMMIT")
            except BaseException:
                self._db.execute("ROLLBACK")
                raise

    def pending_lines(self, batch_id: str) -> list[tuple[int, str, str]]:
        rows = self._rows("SELECT line_no, custom_id, body FROM lines WHERE batch_id = ? AND state = 'pending' "
                          "ORDER BY line_no", (batch_id,))
        return [(int(n), str(c), str(b)) for n, c, b in rows]

    def pending_count(self) -> int:
        marks = ",".join("?" * len(ACTIVE_STATUSES))
        rows = self._rows(f"SELECT COUNT(*) FROM lines WHERE state = 'pending' AND batch_id IN "
                          f"(SELECT id FROM batches WHERE status IN ({marks}))", ACTIVE_STATUSES)
        return int(rows[0][0])

    def finish_line(self, batch_id: str, line_no: int, state: str, record: dict[str, Any]) -> bool:
        """Commit a line's outcome once (`state` completed or failed); False if it already had one."""
        with self._lock:
            return bool(self._db.execute(
                "UPDATE lines SET state = ?, record = ? WHERE batch_id = ? AND line_no = ? AND state = 'pending'",
                (state, json.dumps(record), batch_id, line_no)).rowcount)

    def counts(self, batch_id: str) -> RequestCounts:
        by_state = dict(self._rows("SELECT state, COUNT(*) FROM lines WHERE batch_id = ? GROUP BY state",
                                   (batch_id,)))
        return RequestCounts(total=sum(by_state.values()), completed=by_state.get("completed", 0),
                             failed=by_state.get("failed", 0))

    def records(self, batch_id: str, state: str) -> Iterator[dict[str, Any]]:
        """The outcome records of `state` lines, in line order (read in pages: the lock is never held long)."""
        last = 0
        while True:
            rows = self._rows("SELECT line_no, record FROM lines WHERE batch_id = ? AND state = ? AND line_no > ? "
                              "ORDER BY line_no LIMIT 500", (batch_id, state, last))
            for _, record in rows:
                yield json.loads(record)
            if len(rows) < 500:
                return
            last = int(rows[-1][0])

    def write_file(self, file_id: str, lines: Iterator[str]) -> int:
        """Write `lines` to `file_id`'s path atomically (temp file, fsync, rename); returns the byte count."""
        path = self.file_path(file_id)
        tmp = path.with_suffix(".tmp")
        size = 0
        with open(tmp, "wb") as out:
            for line in lines:
                data = (line + "\n").encode()
                out.write(data)
                size += len(data)
            out.flush()
            os.fsync(out.fileno())
        os.replace(tmp, path)
        return size
