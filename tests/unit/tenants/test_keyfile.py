"""The keys file's schema: good files parse, bad ones give one clear message that never repeats a key or hash."""

from __future__ import annotations

import pytest

from app.tenants.keyfile import KeysFile, KeysFileError, dump, hash_key, new_key, unmatched_globs, validate_text

H1, H2 = hash_key("k1"), hash_key("k2")


def test_a_full_entry_parses_and_round_trips() -> None:
    text = f"""keys:
  - name: rag-app
    hash: {H1}
    models: ["tiny*", "tiny:*"]
    rpm: 10
    tpm: 1000
    concurrency: 2
    priority: batch
    expires: 2030-01-01
    admin: true
"""
    keys = validate_text(text)
    (e,) = keys.keys
    assert (e.name, e.rpm, e.tpm, e.concurrency, e.priority, e.admin) == ("rag-app", 10, 1000, 2, "batch", True)
    assert e.allows("tiny") and e.allows("tiny:sql-adapter") and not e.allows("other")
    assert e.expires is not None and e.expires.tzinfo is not None and not e.expired()
    assert validate_text(dump(keys)) == keys
    assert validate_text("") == KeysFile() and validate_text("keys: []") == KeysFile()


def test_new_keys_are_random_and_hash_to_the_stored_form() -> None:
    a, b = new_key(), new_key()
    assert a != b and len(a) > 40
    assert hash_key(a).startswith("sha256:") and len(hash_key(a)) == 71


@pytest.mark.parametrize(("text", "needle"), [
    ("keys: [", "not valid YAML at line"),
    ("- a\n- b", "expected a mapping"),
    (f"keys:\n  - {{name: a, hash: {H1}}}\n  - {{name: a, hash: {H2}}}", "duplicate name 'a'"),
    (f"keys:\n  - {{name: a, hash: {H1}}}\n  - {{name: b, hash: {H1}}}", "same hash"),
    ("keys:\n  - {name: a, hash: sk-llmkit-SECRETSECRET}", "looks like a plaintext key"),
    ("keys:\n  - {name: a, hash: 'sha256:abc'}", "keys[0] ('a').hash: must be"),
    (f"keys:\n  - {{name: a, hash: {H1}, rpm: 0}}", "keys[0] ('a').rpm"),
    (f"keys:\n  - {{name: a, hash: {H1}, priority: urgent}}", "priority"),
    (f"keys:\n  - {{name: a, hash: {H1}, models: []}}", "at least one glob"),
    (f"keys:\n  - {{name: a, hash: {H1}, models: ['a b']}}", "is not a model-id glob"),
    (f"keys:\n  - {{name: anonymous, hash: {H1}}}", "reserved"),
    (f"keys:\n  - {{name: a, hash: {H1}, limit: 3}}", "unknown field"),
])
def test_bad_files_name_the_problem_and_never_the_secret(text: str, needle: str) -> None:
    with pytest.raises(KeysFileError) as info:
        validate_text(text, "keys file K")
    message = str(info.value)
    assert needle in message and message.startswith("keys file K")
    assert "SECRET" not in message and H1 not in message and H1[7:] not in message


def test_unmatched_globs_count_adapter_globs_by_their_base() -> None:
    keys = validate_text(f"keys:\n  - {{name: a, hash: {H1}, models: ['tiny', 'tiny:*', 'gone*', 'x:y']}}")
    assert unmatched_globs(keys, ["tiny"]) == ["a: gone*", "a: x:y"]
