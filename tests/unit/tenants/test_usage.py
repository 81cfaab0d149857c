"""Per-key usage in SQLite: counts survive a reopen (a restart), queries filter by key and window."""

from __future__ import annotations

from pathlib import Path

import pytest

from app.tenants.usage import UsageStore, usage_window


def test_usage_persists_across_a_restart_and_filters_by_key_and_window(tmp_path: Path) -> None:
    db = tmp_path / "usage.sqlite"
    store = UsageStore(db)
    store.add("a", "tiny", requests=1, prompt_tokens=3, completion_tokens=5, at=7200.0)
    store.add("a", "tiny", requests=1, prompt_tokens=1, completion_tokens=1, at=7300.0)
    store.add("b", "-", requests=1, rate_limited=1, at=7300.0)
    store.close()
    again = UsageStore(db)
    (a,) = again.query(0, 10_000, key="a")
    assert a.as_dict() == {"key": "a", "model": "tiny", "requests": 2, "prompt_tokens": 4, "completion_tokens": 6,
                           "total_tokens": 10, "rate_limited": 0}
    assert [r.key for r in again.query(0, 10_000)] == ["a", "b"]
    assert again.query(10_800, 20_000) == []
    again.add("a", "tiny", requests=1, at=7400.0)
    assert again.query(0, 10_000, key="a")[0].requests == 3  # pending counts are flushed before a read


def test_usage_window_defaults_to_this_month_and_rejects_bad_bounds() -> None:
    start, end = usage_window(None, None, now=1_767_225_600.0 + 86_400 * 3)  # 2026-01-04 UTC
    assert start == 1_767_225_600.0 and end > start
    assert usage_window("2026-01-01", "2026-01-02") == (1_767_225_600.0, 1_767_312_000.0)
    assert usage_window("100", "200") == (100.0, 200.0)
    with pytest.raises(ValueError, match="start: expected unix seconds"):
        usage_window("yesterday", None)
    for bad in ("nan", "inf", "-5", "1e300"):
        with pytest.raises(ValueError, match="start: must be between 1970 and the year 9999"):
            usage_window(bad, None)
    with pytest.raises(ValueError, match="end: must be after start"):
        usage_window("200", "100")
