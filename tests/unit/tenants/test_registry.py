"""The keys file re-read on change: a revoke takes effect at once, a bad version keeps the last good one."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

from app.tenants import registry as registry_module
from app.tenants.keyfile import KeyEntry, KeysFile, KeysFileError, hash_key, save
from app.tenants.registry import ANONYMOUS_TENANT, KeyRegistry, Tenant


def test_identify_reload_revoke_and_keep_the_last_good_file(tmp_path: Path, caplog: pytest.LogCaptureFixture,
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(registry_module, "CHECK_INTERVAL_S", 0.0)
    path = tmp_path / "keys.yaml"
    save(path, KeysFile(keys=[KeyEntry(name="a", hash=hash_key("key-a"))]))
    reg = KeyRegistry(path, plain_keys=["plain"])
    who = reg.identify("key-a")
    assert isinstance(who, Tenant) and who.name == "a"
    assert reg.identify("plain") is ANONYMOUS_TENANT and reg.identify("nope") == "invalid API key"

    save(path, KeysFile(keys=[KeyEntry(name="b", hash=hash_key("key-b"))]))  # a revoke and an add
    assert reg.identify("key-a") == "invalid API key"
    assert isinstance(reg.identify("key-b"), Tenant)

    caplog.set_level(logging.ERROR, logger="app.tenants.registry")
    path.write_text("keys:\n  - {name: c, hash: sk-llmkit-PLAINTEXT}\n")
    assert isinstance(reg.identify("key-b"), Tenant)  # the last good file stays in force
    (line,) = [r.getMessage() for r in caplog.records]
    assert "plaintext key" in line and "keeping the last good keys file (1 keys)" in line
    assert "PLAINTEXT" not in line and reg.last_error
    reg.identify("key-b")
    assert len(caplog.records) == 1  # one line per bad version, not per request

    save(path, KeysFile(keys=[KeyEntry(name="d", hash=hash_key("key-d"), expires="2000-01-01")]))  # type: ignore[arg-type]
    assert reg.identify("key-d") == "API key expired" and reg.last_error is None


def test_a_bad_file_at_start_or_an_unmatched_glob_is_an_error(tmp_path: Path) -> None:
    path = tmp_path / "keys.yaml"
    with pytest.raises(KeysFileError, match="not found"):
        KeyRegistry(path)
    save(path, KeysFile(keys=[KeyEntry(name="a", hash=hash_key("x"), models=("gone*",))]))
    with pytest.raises(KeysFileError, match="match no model served here: a: gone"):
        KeyRegistry(path, model_ids=lambda: ["tiny"])
    assert KeyRegistry(path, model_ids=lambda: ["tiny"], check_globs=False).names == ["a"]  # a backup server
