"""Each schedule's run statistics are read once until a run of it is written."""

from __future__ import annotations

import threading
from datetime import timedelta
from decimal import Decimal

import pytest

from nocturne_operator.runs.stats import RunStatsCache
from nocturne_operator.storage import RunStats


def stats(total: str) -> RunStats:
    return RunStats(Decimal(total), 1, 0, 0, None)


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_kept_until_a_write_then_read_afresh() -> None:
    cache = RunStatsCache()
    reads: list[str] = []

    def load() -> RunStats:
        reads.append("read")
        return stats(str(len(reads)))

    assert cache.get("uid-a", ("may",), load).total_cost == 1
    assert cache.get("uid-a", ("may",), load).total_cost == 1  # kept
    assert len(reads) == 1
    cache.invalidate("uid-b")  # another schedule's run: this one is kept
    assert cache.get("uid-a", ("may",), load).total_cost == 1
    cache.invalidate("uid-a")
    assert cache.get("uid-a", ("may",), load).total_cost == 2
    assert cache.get("uid-a", ("june",), load).total_cost == 3  # another question: read
    assert len(reads) == 3


def test_an_entry_lives_at_most_the_ttl() -> None:
    clock = Clock()
    cache = RunStatsCache(ttl=timedelta(minutes=10), clock=clock)
    loads = iter([stats("1"), stats("2")])
    assert cache.get("uid", None, lambda: next(loads)).total_cost == 1
    clock.now = 599.0
    assert cache.get("uid", None, lambda: next(loads)).total_cost == 1
    clock.now = 600.0
    assert cache.get("uid", None, lambda: next(loads)).total_cost == 2


def test_a_read_that_raced_with_a_write_is_not_kept() -> None:
    cache = RunStatsCache()
    reading, written = threading.Event(), threading.Event()

    def slow_load() -> RunStats:
        reading.set()
        written.wait(5)
        return stats("1")  # read before the write below landed: stale

    result: list[RunStats] = []
    reader = threading.Thread(target=lambda: result.append(cache.get("uid", None, slow_load)))
    reader.start()
    reading.wait(5)
    cache.invalidate("uid")  # a run finished meanwhile
    written.set()
    reader.join(5)
    assert result[0].total_cost == 1  # that reconcile used what it read ...
    assert cache.get("uid", None, lambda: stats("2")).total_cost == 2  # ... the next reads again


def test_a_failed_read_keeps_nothing_and_forget_drops_a_schedule() -> None:
    cache = RunStatsCache()

    def down() -> RunStats:
        raise ConnectionError("database down")

    with pytest.raises(ConnectionError):
        cache.get("uid", None, down)
    assert cache.get("uid", None, lambda: stats("1")).total_cost == 1
    cache.forget("uid")
    assert cache.get("uid", None, lambda: stats("2")).total_cost == 2


def test_many_read_at_once_serve_the_passes_that_ask_the_same() -> None:
    cache = RunStatsCache()

    def never() -> RunStats:
        raise AssertionError("read again")

    def load_all() -> dict[str, RunStats]:
        cache.invalidate("uid-c")  # a run of c was written while they were read
        return {"uid-a": stats("1"), "uid-b": stats("2"), "uid-c": stats("3"), "uid-x": stats("9")}

    cache.fill({"uid-a": ("may",), "uid-b": ("may",), "uid-c": ("may",)}, load_all)
    assert cache.get("uid-a", ("may",), never).total_cost == 1
    assert cache.get("uid-b", ("may",), never).total_cost == 2
    assert cache.get("uid-c", ("may",), lambda: stats("4")).total_cost == 4  # not kept
    assert cache.get("uid-b", ("june",), lambda: stats("5")).total_cost == 5  # asked otherwise
    assert cache.get("uid-x", ("may",), lambda: stats("6")).total_cost == 6  # not asked for
