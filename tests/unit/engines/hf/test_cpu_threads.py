"""The forwards' CPU thread count: chosen from timed decode steps of the model itself, or set."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
import torch

from app.engines.hf import cpu_threads

pytestmark = pytest.mark.unit


class TimedModel:
    """A RaggedModel stand-in whose decode step costs what `cost[threads]` says (records the calls)."""

    def __init__(self, cost: dict[int, float]):
        self.cost = cost
        self.calls: list[tuple[int, int]] = []  # (threads, rows)

    def new_cache(self) -> list[int]:
        return []

    def prefill(self, cache: list[int], ids: list[int], start: int) -> None:
        cache.extend(ids)

    def decode(self, caches: list[Any], tokens: list[int], rows: int) -> None:
        self.calls.append((torch.get_num_threads(), rows))


@pytest.fixture(autouse=True)
def keep_threads() -> Iterator[None]:
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> dict[int, float]:
    """perf_counter advances by the cost of the current thread count on each call (a fake, deterministic clock)."""
    cost: dict[int, float] = {}
    now = [0.0]

    def perf_counter() -> float:
        now[0] += cost.get(torch.get_num_threads(), 0.001) / 2  # two reads per timed step
        return now[0]

    monkeypatch.setattr(cpu_threads.time, "perf_counter", perf_counter)
    return cost


def test_the_faster_count_wins_and_is_set(clock: dict[int, float]) -> None:
    clock.update({2: 0.004, 1: 0.001})
    model = TimedModel(clock)
    assert cpu_threads.choose_cpu_threads(model, rows=4, candidates=(2, 1)) == 1
    assert torch.get_num_threads() == 1
    assert {rows for _, rows in model.calls} == {1, 4} and {t for t, _ in model.calls} == {1, 2}


def test_the_first_candidate_stays_unless_another_is_clearly_faster(clock: dict[int, float]) -> None:
    clock.update({2: 0.00100, 1: 0.00095})  # 5% faster: within the margin
    assert cpu_threads.choose_cpu_threads(TimedModel(clock), rows=4, candidates=(2, 1)) == 2
    assert torch.get_num_threads() == 2


def test_default_candidates_leave_a_core_for_the_event_loop(clock: dict[int, float]) -> None:
    torch.set_num_threads(2)
    model = TimedModel(clock)
    assert cpu_threads.choose_cpu_threads(model, rows=4) == 1  # 2 - 1 = 1: nothing to time
    assert model.calls == []
