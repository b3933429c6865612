"""The run report relay between replicas (issue 15), without a database: what a change carries
and how every replica applies it. The delivery through PostgreSQL is tested in
``tests/integration/test_relay.py``; two operator processes in ``tests/e2e/test_replicas.py``."""

from __future__ import annotations

from datetime import timedelta
from decimal import Decimal
from typing import Any

import pytest

from nocturne_operator.controller.active import ActiveRun, ActiveRuns
from nocturne_operator.controller.relay import RunRelay, decode, encode, run_document
from nocturne_operator.runs.stats import RunStatsCache
from nocturne_operator.storage import RunStats, StatsQuery
from unit.test_active_runs import KEY, Clock, finish, grant, identity, progress


def replica() -> tuple[RunRelay, ActiveRuns, list[tuple[tuple[str, str], float]]]:
    calls: list[tuple[tuple[str, str], float]] = []
    runs = ActiveRuns(queue=lambda k, w: calls.append((k, w)), clock=Clock())
    return RunRelay(runs, RunStatsCache(), "postgresql://unused", "unused"), runs, calls


def test_a_change_is_a_whole_entry_that_round_trips_through_its_payload() -> None:
    sender, runs, _ = replica()
    who = identity()
    key, run = runs.on_start(who, grant("0.10"))
    payload = encode(put(key, run))
    assert len(payload.encode()) < 8000  # PostgreSQL's limit for a NOTIFY payload
    receiver, other, calls = replica()
    change = decode(payload)
    assert change["run"]["cost"] == "0.10"  # decimal strings, never floats
    receiver.apply(change)
    assert other.of(KEY) == [run]
    assert calls == [(KEY, 0.0)]
    del sender


def test_reports_served_by_either_replica_give_every_replica_the_same_entry() -> None:
    """Grant on one replica, progress on the other, finish on the first: both show the run
    from its grant to its finish (each applies every change, its own included)."""
    sent: list[str] = []

    class Wired(RunRelay):
        """Sends into ``sent``, the stand-in for the NOTIFY channel."""

        def _publish(self, change: dict[str, Any]) -> None:
            sent.append(encode(change))

    a = Wired(ActiveRuns(clock=Clock()), RunStatsCache(), "postgresql://unused", "unused")
    b = Wired(ActiveRuns(clock=Clock()), RunStatsCache(), "postgresql://unused", "unused")
    runs_a, runs_b, replicas = a.active, b.active, (a, b)

    def deliver() -> None:
        for payload in sent:
            for relay in replicas:
                relay.apply(decode(payload))
        sent.clear()

    who = identity()
    a.started(who, grant())
    deliver()
    assert [r.job for r in runs_a.of(KEY)] == [r.job for r in runs_b.of(KEY)] == ["digest-1"]
    b.progressed(who, progress(who, "0.02", 2, "model call 2/8"))
    deliver()
    assert runs_a.of(KEY)[0].cost == runs_b.of(KEY)[0].cost == Decimal("0.02")
    a.finished(who, finish(who))
    deliver()
    assert runs_a.of(KEY) == runs_b.of(KEY) == []


def test_a_report_that_arrives_after_its_finish_does_not_bring_the_run_back() -> None:
    """A progress report served by one replica may reach the others after the finish another
    replica served (two senders, one order of commits)."""
    relay, runs, _ = replica()
    who = identity()
    key, run = runs.on_start(who, grant())
    relay.apply(put(key, run))
    late = runs.on_progress(who, progress(who, "0.01", 1, None))
    assert late is not None
    relay.apply({"op": "end", "key": list(key), "uid": "u", "job": who.job_uid})
    relay.apply(put(*late))
    assert runs.of(KEY) == []
    # The Job's next attempt shows again.
    again = grant("0.01").model_copy(update={"attempt": 1})
    relay.apply(put(*runs.on_start(identity(pod="pod-2"), again)))
    assert [r.attempt for r in runs.of(KEY)] == [1]


def put(key: tuple[str, str], run: ActiveRun) -> dict[str, object]:
    return {"op": "put", "key": list(key), "uid": "u", "run": run_document(run), "in": 0}


def test_every_change_invalidates_the_schedules_statistics_everywhere() -> None:
    relay, _, _ = replica()
    stats = relay.stats
    query = StatsQuery(schedule_uid="uid-digest")
    reads: list[str] = []

    def load(queries: list[StatsQuery]) -> dict[str, RunStats]:
        reads.extend(q.schedule_uid for q in queries)
        return {q.schedule_uid: RunStats.before_any_run(q) for q in queries}

    stats.get(query, load)
    stats.get(query, load)
    assert reads == ["uid-digest"]
    relay.apply({"op": "wrote", "uid": "uid-digest"})
    stats.get(query, load)
    assert reads == ["uid-digest", "uid-digest"]
    stats.clear()
    stats.get(query, load)
    assert len(reads) == 3


@pytest.mark.parametrize("payload", ["{}", "[1]", '{"op": "drop"}', "not json"])
def test_a_payload_that_is_not_a_change_is_refused(payload: str) -> None:
    with pytest.raises(ValueError):  # noqa: PT011 - json's error is a ValueError too
        decode(payload)


def test_an_entry_keeps_its_expiry_across_replicas() -> None:
    relay, runs, _ = replica()
    key, run = runs.on_start(identity(), grant())
    relay.apply(put(key, run))
    [kept] = runs.of(KEY)
    assert kept.expires_at - kept.started_at == timedelta(seconds=600) + timedelta(minutes=1)
