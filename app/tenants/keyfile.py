"""The keys file: one YAML document naming every key holder, with the key's hash (never the key itself).

    keys:
      - name: rag-app                 # letters, digits, . _ -  (the label in metrics, logs and /v1/usage)
        hash: sha256:<64 hex>         # `python -m app keys add` prints the key once and stores this
        models: ["qwen2.5-*", "qwen2.5-0.5b:*"]   # globs over model ids (adapters `base:adapter` too); default all
        rpm: 600                      # requests per minute (unset: no limit)
        tpm: 200000                   # tokens per minute, prompt + completion (unset: no limit)
        concurrency: 8                # requests in flight at once (unset: no limit)
        priority: interactive         # or batch: its requests yield to interactive ones in the engines
        expires: 2027-06-30T00:00:00Z # optional; after it the key is refused (401)
        admin: false                  # an admin key reads every key's usage on /v1/usage

Keys are 256-bit random tokens, so a plain SHA-256 is enough to store them (no password-style slow hash: the
router hashes every request's key). `validate_text` turns a file into `KeysFile` or a `KeysFileError` whose
message names the entry and field and never repeats a key or a hash.
"""

from __future__ import annotations

import fnmatch
import functools
import hashlib
import os
import re
import secrets
import tempfile
from collections.abc import Iterable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

KEY_PREFIX = "sk-llmkit-"
_HASH = re.compile(r"^sha256:[0-9a-f]{64}$")
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
_GLOB = re.compile(r"^[A-Za-z0-9._:/@*?\[\]!+-]{1,256}$")
RESERVED_NAMES = ("anonymous",)


class KeysFileError(ValueError):
    """A keys file that cannot be used; the message names the entry and field (never a key or hash)."""


def new_key() -> str:
    return KEY_PREFIX + secrets.token_urlsafe(32)


def hash_key(key: str) -> str:
    return "sha256:" + hashlib.sha256(key.encode("utf-8", "surrogatepass")).hexdigest()


class KeyEntry(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str
    hash: str = Field(repr=False)
    models: tuple[str, ...] = ("*",)
    rpm: int | None = Field(default=None, ge=1)
    tpm: int | None = Field(default=None, ge=1)
    concurrency: int | None = Field(default=None, ge=1)
    priority: Literal["interactive", "batch"] = "interactive"
    expires: datetime | None = None
    admin: bool = False

    @field_validator("name")
    @classmethod
    def _name(cls, v: str) -> str:
        if not _NAME.match(v):
            raise ValueError("1-64 letters, digits, '.', '_' or '-', starting with a letter or digit")
        if v in RESERVED_NAMES:
            raise ValueError(f"{v!r} is reserved (it labels requests of keys outside the file)")
        return v

    @field_validator("hash", mode="before")
    @classmethod
    def _hash(cls, v: Any) -> Any:
        if not isinstance(v, str) or not _HASH.match(v):
            hint = " (this looks like a plaintext key: store its hash, e.g. with `python -m app keys add`)" \
                if isinstance(v, str) and v.startswith(("sk-", KEY_PREFIX)) else ""
            raise ValueError("must be 'sha256:' and 64 lowercase hex digits" + hint)
        return v

    @field_validator("models")
    @classmethod
    def _models(cls, v: tuple[str, ...]) -> tuple[str, ...]:
        if not v:
            raise ValueError("list at least one glob ('*' allows every model)")
        for glob in v:
            if not _GLOB.match(glob):
                raise ValueError(f"{glob!r} is not a model-id glob (letters, digits, ._:/@+- and * ? [ ])")
        return v

    @field_validator("expires")
    @classmethod
    def _tz(cls, v: datetime | None) -> datetime | None:
        return v.replace(tzinfo=UTC) if v is not None and v.tzinfo is None else v

    def allows(self, model_id: str) -> bool:
        return self.models == ("*",) or _globs(self.models).fullmatch(model_id) is not None

    def expired(self, now: datetime | None = None) -> bool:
        return self.expires is not None and (now or datetime.now(UTC)) >= self.expires


@functools.lru_cache(maxsize=1024)
def _globs(globs: tuple[str, ...]) -> re.Pattern[str]:
    """One compiled pattern for a key's model globs (fnmatch syntax, case-sensitive)."""
    return re.compile("|".join(f"(?:{fnmatch.translate(g)})" for g in globs))


class KeysFile(BaseModel):
    model_config = ConfigDict(extra="forbid")

    keys: list[KeyEntry] = Field(default_factory=list)

    @model_validator(mode="after")
    def _unique(self) -> KeysFile:
        names: set[str] = set()
        hashes: dict[str, str] = {}
        for entry in self.keys:
            if entry.name in names:
                raise ValueError(f"duplicate name {entry.name!r}: every key needs its own name")
            if entry.hash in hashes:
                raise ValueError(f"keys {hashes[entry.hash]!r} and {entry.name!r} have the same hash (one key "
                                 "listed twice)")
            names.add(entry.name)
            hashes[entry.hash] = entry.name
        return self

    def by_name(self, name: str) -> KeyEntry | None:
        return next((e for e in self.keys if e.name == name), None)


def _where(loc: tuple[Any, ...], data: Any) -> str:
    if len(loc) >= 2 and loc[0] == "keys" and isinstance(loc[1], int):
        name = None
        try:
            name = data["keys"][loc[1]].get("name")
        except (KeyError, IndexError, TypeError, AttributeError):
            pass
        who = f"keys[{loc[1]}]" + (f" ({name!r})" if isinstance(name, str) and _NAME.match(name) else "")
        rest = ".".join(str(p) for p in loc[2:])
        return who + (f".{rest}" if rest else "")
    return ".".join(str(p) for p in loc)


def validate_text(text: str, source: str = "keys file") -> KeysFile:
    """Parse and check a keys file's content. Messages never echo values (a value may be a key)."""
    try:
        data = yaml.safe_load(text) if text.strip() else {}
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark is not None else ""
        raise KeysFileError(f"{source}: not valid YAML{where}") from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise KeysFileError(f"{source}: expected a mapping with a 'keys' list")
    try:
        return KeysFile.model_validate(data)
    except ValidationError as exc:
        err = exc.errors(include_input=False)[0]
        where = _where(tuple(err.get("loc", ())), data)
        msg = str(err.get("msg", "invalid")).removeprefix("Value error, ")
        if err.get("type") == "extra_forbidden":
            msg = "unknown field"
        more = f" (and {len(exc.errors()) - 1} more)" if len(exc.errors()) > 1 else ""
        raise KeysFileError(f"{source}: {where + ': ' if where else ''}{msg}{more}") from None


def unmatched_globs(keys: KeysFile, model_ids: Iterable[str]) -> list[str]:
    """'name: glob' for each glob that matches none of `model_ids` (an adapter glob `base:x` counts as matching
    when its base part matches a model: adapters come and go at run time)."""
    ids = list(model_ids)
    out = []
    for entry in keys.keys:
        for glob in entry.models:
            base = glob.split(":", 1)[0]
            if not any(fnmatch.fnmatchcase(m, glob) or (":" in glob and fnmatch.fnmatchcase(m, base)) for m in ids):
                out.append(f"{entry.name}: {glob}")
    return out


def load(path: str | Path) -> KeysFile:
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise KeysFileError(f"keys file {p}: not found") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise KeysFileError(f"keys file {p}: cannot be read ({type(exc).__name__})") from None
    return validate_text(text, f"keys file {p}")


def dump(keys: KeysFile) -> str:
    entries = []
    for e in keys.keys:
        d = e.model_dump(mode="json", exclude_defaults=True)
        d = {"name": e.name, "hash": e.hash, **{k: v for k, v in d.items() if k not in ("name", "hash")}}
        if "models" in d:
            d["models"] = list(e.models)
        entries.append(d)
    header = "# API keys (python -m app keys add|list|revoke). Hashes only: a key is printed once, when added.\n"
    return header + yaml.safe_dump({"keys": entries}, sort_keys=False)


def save(path: str | Path, keys: KeysFile) -> None:
    """Write atomically (a temporary file renamed over the old one), so a server never reads half a file."""
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{p.name}.", dir=p.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as out:
            out.write(dump(keys))
            out.flush()
            os.fsync(out.fileno())
        if p.exists():
            os.chmod(tmp, p.stat().st_mode & 0o777)
        else:
            os.chmod(tmp, 0o644)
        os.replace(tmp, p)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
