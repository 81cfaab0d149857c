"""Who a bearer key belongs to: the keys file (re-read when it changes) and the plain `API_KEYS` list.

`KeyRegistry.identify(token)` returns the key's `Tenant` (its name, entry and budgets) or why it is refused.
The file is checked at most every `CHECK_INTERVAL_S` on the request path (a `stat`, then a re-read only when
its size, mtime or inode changed), so a revoked key is refused on the first request after the edit, with no
restart and no background task (the Ray ingress and every server behave alike). A file that fails to parse or
validate keeps the last good one in force and logs one ERROR line per bad version, naming the problem, never a
key or hash. Keys from `API_KEYS` are the `anonymous` tenant: no limits, every model, interactive.
"""

from __future__ import annotations

import hmac
import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from app.tenants.keyfile import KeyEntry, KeysFile, KeysFileError, hash_key, load, unmatched_globs

log = logging.getLogger(__name__)

CHECK_INTERVAL_S = 0.25
ANONYMOUS = "anonymous"
_UNLIMITED = KeyEntry(name="unlimited", hash="sha256:" + "0" * 64)


@dataclass(frozen=True)
class Tenant:
    """The holder of one valid key: its name and entry (an `API_KEYS` key: `anonymous`, no limits)."""

    name: str
    entry: KeyEntry

    @property
    def limited(self) -> bool:
        e = self.entry
        return e.rpm is not None or e.tpm is not None or e.concurrency is not None

    def allows(self, model_id: str) -> bool:
        return self.entry.allows(model_id)


ANONYMOUS_TENANT = Tenant(ANONYMOUS, _UNLIMITED)


class KeyRegistry:
    """The keys a server accepts. `path`: the keys file (None: `API_KEYS` only); `model_ids`: the models this
    server serves, to refuse a file whose glob matches none of them (skipped for a backup server, which serves a
    subset of the cluster's models)."""

    def __init__(self, path: str | Path | None, plain_keys: list[str] | None = None,
                 model_ids: Callable[[], list[str]] | None = None, check_globs: bool = True):
        self.path = Path(path) if path else None
        self.plain_keys = [k for k in (plain_keys or []) if k]
        self._model_ids = model_ids
        self._check_globs = check_globs
        self._by_hash: dict[str, Tenant] = {}
        self._names: frozenset[str] = frozenset()
        self._keys = KeysFile()
        self._signature: tuple[int, int, int] | None = None
        self._next_check = 0.0
        self.last_error: str | None = None
        if self.path is not None:
            self._keys = self._read()  # a bad file at start-up is the operator's error: raised, not kept
            self._install(self._keys)

    # ----------------------------------------------------------------- state
    @property
    def enabled(self) -> bool:
        """True when a request must carry a key."""
        return self.path is not None or bool(self.plain_keys)

    @property
    def names(self) -> list[str]:
        return [e.name for e in self._keys.keys]

    def entries(self) -> list[KeyEntry]:
        self.refresh()
        return list(self._keys.keys)

    # ----------------------------------------------------------------- reading
    def _stat(self) -> tuple[int, int, int] | None:
        assert self.path is not None
        try:
            st = os.stat(self.path)
        except OSError:
            return None
        return (st.st_mtime_ns, st.st_size, st.st_ino)

    def _read(self) -> KeysFile:
        assert self.path is not None
        self._signature = self._stat()
        keys = load(self.path)
        if self._check_globs and self._model_ids is not None:
            unmatched = unmatched_globs(keys, self._model_ids())
            if unmatched:
                raise KeysFileError(f"keys file {self.path}: model globs that match no model served here: "
                                    + ", ".join(unmatched))
        return keys

    def _install(self, keys: KeysFile) -> None:
        self._keys = keys
        self._by_hash = {e.hash: Tenant(e.name, e) for e in keys.keys}
        self._names = frozenset(self._by_hash[h].name for h in self._by_hash)

    def refresh(self, force: bool = False) -> None:
        """Re-read the file if it changed since the last read (checked at most every CHECK_INTERVAL_S)."""
        if self.path is None:
            return
        now = time.monotonic()
        if not force and now < self._next_check:
            return
        self._next_check = now + CHECK_INTERVAL_S
        if self._stat() == self._signature:
            return
        try:
            keys = self._read()
        except KeysFileError as exc:
            self.last_error = str(exc)
            log.error("%s; keeping the last good keys file (%d keys)", exc, len(self._keys.keys))
            return
        self.last_error = None
        self._install(keys)
        log.info("keys file %s re-read: %d keys", self.path, len(keys.keys))

    # ----------------------------------------------------------------- lookups
    def identify(self, token: str) -> Tenant | str:
        """The tenant of a bearer token, or why it is refused (never naming the token)."""
        self.refresh()
        tenant = self._by_hash.get(hash_key(token)) if self._by_hash else None
        if tenant is not None:
            if tenant.entry.expired():
                return "API key expired"
            return tenant
        ok = False
        for key in self.plain_keys:  # constant-time over the list, as before tenants
            ok |= hmac.compare_digest(token.encode("utf-8", "surrogatepass"), key.encode())
        return ANONYMOUS_TENANT if ok else "invalid API key"

    def label_of(self, name: str) -> str:
        """A bounded metric label for a tenant name: names from the keys file, else `anonymous`."""
        return name if name in self._names else ANONYMOUS
