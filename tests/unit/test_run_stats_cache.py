"""Each schedule's run statistics are read once until a run of it is written."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from decimal import Decimal

import pytest

from nocturne_operator.runs.stats import Load, RunStatsCache
from nocturne_operator.storage import RunStats, StatsQuery


def stats(total: str) -> RunStats:
    return RunStats(Decimal(total), 1, 0, 0, None)


def q(uid: str, month: str | None = None) -> StatsQuery:
    """A query for ``uid``; ``month`` stands for its month start (another month: another
    question)."""
    return StatsQuery(uid, None, None if month is None else MONTHS[month])


MONTHS = {"may": datetime(2026, 5, 1, tzinfo=UTC), "june": datetime(2026, 6, 1, tzinfo=UTC)}


def one(load: Callable[[], RunStats]) -> Load:
    """A read of a single schedule's statistics, as the batched read asks for it."""

    def read(queries: list[StatsQuery]) -> dict[str, RunStats]:
        [query] = queries
        return {query.schedule_uid: load()}

    return read


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

    assert cache.get(q("uid-a", "may"), one(load)).total_cost == 1
    assert cache.get(q("uid-a", "may"), one(load)).total_cost == 1  # kept
    assert len(reads) == 1
    cache.invalidate("uid-b")  # another schedule's run: this one is kept
    assert cache.get(q("uid-a", "may"), one(load)).total_cost == 1
    cache.invalidate("uid-a")
    assert cache.get(q("uid-a", "may"), one(load)).total_cost == 2
    assert cache.get(q("uid-a", "june"), one(load)).total_cost == 3  # another question: read
    assert len(reads) == 3


def test_an_entry_lives_at_most_the_ttl() -> None:
    clock = Clock()
    cache = RunStatsCache(ttl=timedelta(minutes=10), clock=clock)
    loads = iter([stats("1"), stats("2")])
    assert cache.get(q("uid"), one(lambda: next(loads))).total_cost == 1
    clock.now = 599.0
    assert cache.get(q("uid"), one(lambda: next(loads))).total_cost == 1
    clock.now = 600.0
    assert cache.get(q("uid"), one(lambda: next(loads))).total_cost == 2


def test_a_read_that_raced_with_a_write_is_not_kept() -> None:
    cache = RunStatsCache()
    reading, written = threading.Event(), threading.Event()

    def slow_load() -> RunStats:
        reading.set()
        written.wait(5)
        return stats("1")  # read before the write below landed: stale

    result: list[RunStats] = []
    reader = threading.Thread(target=lambda: result.append(cache.get(q("uid"), one(slow_load))))
    reader.start()
    reading.wait(5)
    cache.invalidate("uid")  # a run finished meanwhile
    written.set()
    reader.join(5)
    assert result[0].total_cost == 1  # that reconcile used what it read ...
    assert cache.get(q("uid"), one(lambda: stats("2"))).total_cost == 2  # ... the next reads again


def test_a_failed_read_keeps_nothing_and_forget_drops_a_schedule() -> None:
    cache = RunStatsCache()

    def down() -> RunStats:
        raise ConnectionError("database down")

    with pytest.raises(ConnectionError):
        cache.get(q("uid"), one(down))
    assert cache.get(q("uid"), one(lambda: stats("1"))).total_cost == 1
    cache.forget("uid")
    assert cache.get(q("uid"), one(lambda: stats("2"))).total_cost == 2


def test_many_read_at_once_serve_the_passes_that_ask_the_same() -> None:
    cache = RunStatsCache()

    def never() -> RunStats:
        raise AssertionError("read again")

    def load_all(_queries: list[StatsQuery]) -> dict[str, RunStats]:
        cache.invalidate("uid-c")  # a run of c was written while they were read
        return {"uid-a": stats("1"), "uid-b": stats("2"), "uid-c": stats("3"), "uid-x": stats("9")}

    cache.fill([q("uid-a", "may"), q("uid-b", "may"), q("uid-c", "may")], load_all)
    assert cache.get(q("uid-a", "may"), one(never)).total_cost == 1
    assert cache.get(q("uid-b", "may"), one(never)).total_cost == 2
    assert cache.get(q("uid-c", "may"), one(lambda: stats("4"))).total_cost == 4  # not kept
    assert cache.get(q("uid-b", "june"), one(lambda: stats("5"))).total_cost == 5  # asked otherwise
    assert cache.get(q("uid-x", "may"), one(lambda: stats("6"))).total_cost == 6  # not asked for


def test_misses_while_a_read_is_in_flight_are_read_together_next() -> None:
    """Eight passes miss at once (a burst of creations): the first reads its own at once, the
    seven that missed meanwhile share the next read, and each gets its own answer."""
    cache = RunStatsCache()
    first_reading, release = threading.Event(), threading.Event()
    reads: list[list[str]] = []
    lock = threading.Lock()

    def load(queries: list[StatsQuery]) -> dict[str, RunStats]:
        with lock:
            reads.append(sorted(query.schedule_uid for query in queries))
        if len(reads) == 1:
            first_reading.set()
            release.wait(5)
        return {query.schedule_uid: stats(query.schedule_uid[-1]) for query in queries}

    got: dict[str, RunStats] = {}

    def ask(uid: str) -> None:
        got[uid] = cache.get(q(uid), load)

    first = threading.Thread(target=ask, args=("uid-0",))
    first.start()
    first_reading.wait(5)
    others = [threading.Thread(target=ask, args=(f"uid-{i}",)) for i in range(1, 8)]
    for thread in others:
        thread.start()
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline and len(cache._next.queries if cache._next else ()) < 7:
        time.sleep(0.01)
    release.set()
    for thread in [first, *others]:
        thread.join(5)
    assert reads == [["uid-0"], [f"uid-{i}" for i in range(1, 8)]]
    assert {uid: s.total_cost for uid, s in got.items()} == {f"uid-{i}": i for i in range(8)}
    assert cache.get(q("uid-5"), one(lambda: stats("9"))).total_cost == 5  # kept


def test_a_failed_batch_fails_every_pass_that_waited_on_it_and_keeps_nothing() -> None:
    cache = RunStatsCache()
    first_reading, release = threading.Event(), threading.Event()
    calls: list[int] = []

    def load(queries: list[StatsQuery]) -> dict[str, RunStats]:
        calls.append(len(queries))
        if len(calls) == 1:
            first_reading.set()
            release.wait(5)
            return {query.schedule_uid: stats("1") for query in queries}
        raise ConnectionError("database down")

    errors: list[BaseException] = []

    def ask(uid: str) -> None:
        try:
            cache.get(q(uid), load)
        except ConnectionError as exc:
            errors.append(exc)

    first = threading.Thread(target=ask, args=("uid-a",))
    first.start()
    first_reading.wait(5)
    others = [threading.Thread(target=ask, args=(uid,)) for uid in ("uid-b", "uid-c")]
    for thread in others:
        thread.start()
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline and len(cache._next.queries if cache._next else ()) < 2:
        time.sleep(0.01)
    release.set()
    for thread in [first, *others]:
        thread.join(5)
    assert calls == [1, 2]
    assert len(errors) == 2
    assert cache.get(q("uid-b"), one(lambda: stats("3"))).total_cost == 3  # nothing was kept
