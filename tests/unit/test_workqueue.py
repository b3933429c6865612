"""The reconcile queue, its workers and the caches they read (issue 13): a schedule waits once
however many events name it, one pass of it at a time, failures come back with backoff, an
apiserver outage is one log line a minute, and the indexes stand in for the apiserver except
right after a write of our own."""

from __future__ import annotations

import logging
import threading
import time
from datetime import UTC, datetime, timedelta
from typing import Any, cast

import pytest
import urllib3.exceptions
from kubernetes.client.exceptions import ApiException

from nocturne_operator.controller import schedules
from nocturne_operator.controller.cache import Change, Changes, Packed, Unseen
from nocturne_operator.controller.memo import Indexes, Memo
from nocturne_operator.controller.queue import Key, WorkQueue
from nocturne_operator.controller.schedules import next_pass_in
from nocturne_operator.controller.workers import FirstPass, Workers, apiserver_away
from nocturne_operator.settings import Settings

A: Key = ("team-a", "digest")
B: Key = ("team-a", "monitor")


@pytest.mark.parametrize(
    "exc",
    [
        ApiException(status=503, reason="Service Unavailable"),
        ApiException(status=0, reason="connection refused"),
        urllib3.exceptions.MaxRetryError(None, "/apis", reason=None),  # type: ignore[arg-type]
        urllib3.exceptions.ProtocolError("Connection aborted."),
        ConnectionRefusedError(111, "Connection refused"),
        TimeoutError("timed out"),
    ],
)
def test_an_apiserver_that_is_away_is_transient(exc: BaseException) -> None:
    assert apiserver_away(exc)


@pytest.mark.parametrize(
    "exc",
    [
        ApiException(status=404, reason="Not Found"),
        ApiException(status=422, reason="Unprocessable Entity"),
        ApiException(status=500, reason="Internal Server Error"),
        KeyError("metadata"),
        ValueError("bad"),
    ],
)
def test_other_failures_are_not(exc: BaseException) -> None:
    assert not apiserver_away(exc)


# ---- the queue ------------------------------------------------------------------------------


def test_a_key_waits_once_however_often_it_is_added() -> None:
    queue = WorkQueue()
    for key in (A, B, A, A, B):
        queue.add(key)
    assert len(queue) == 2
    assert [queue.get(0), queue.get(0), queue.get(0)] == [A, B, None]


def test_a_key_added_while_held_waits_until_its_pass_is_done() -> None:
    queue = WorkQueue()
    queue.add(A)
    assert queue.get(0) == A
    queue.add(A)  # an event arrives during the pass
    queue.add(A)
    assert queue.get(0) is None  # not handed to a second worker meanwhile
    assert not queue.idle()
    queue.done(A)
    assert queue.get(0) == A  # once more, not twice
    queue.done(A)
    assert queue.get(0) is None
    assert queue.idle()


def test_failures_back_off_doubling_up_to_the_cap_and_success_resets() -> None:
    queue = WorkQueue(base_delay=15, max_delay=120)
    assert [queue.retry(A) for _ in range(6)] == [15, 30, 60, 120, 120, 120]
    queue.succeeded(A)
    assert queue.retry(A) == 15
    assert queue.retry(B) == 15  # per key


def test_a_retry_comes_back_after_its_delay() -> None:
    queue = WorkQueue(base_delay=0.2)
    queue.add(A)
    assert queue.get(0) == A
    queue.retry(A)
    queue.done(A)
    assert queue.get(0.05) is None  # not yet
    started = time.monotonic()
    assert queue.get(2) == A
    assert time.monotonic() - started < 1.5


def test_shut_down_wakes_a_waiting_worker() -> None:
    queue = WorkQueue()
    got: list[Key | None] = []
    worker = threading.Thread(target=lambda: got.append(queue.get()))
    worker.start()
    time.sleep(0.05)
    queue.shut_down()
    worker.join(2)
    assert got == [None]


# ---- the workers ----------------------------------------------------------------------------


def run_until(queue: WorkQueue, handle: Any, keys: list[Key], until: Any) -> Workers:
    workers = Workers(queue, handle, count=3)
    workers.start()
    for key in keys:
        queue.add(key)
    deadline = time.monotonic() + 5
    while not until() and time.monotonic() < deadline:
        time.sleep(0.01)
    workers.stop()
    return workers


def test_a_failed_pass_is_retried_and_others_go_on(caplog: pytest.LogCaptureFixture) -> None:
    calls: list[Key] = []

    def handle(key: Key) -> None:
        calls.append(key)
        if key == A and calls.count(A) == 1:
            raise KeyError("uid")  # a bug: logged with its traceback

    queue = WorkQueue(base_delay=0.05)
    with caplog.at_level(logging.ERROR):
        run_until(queue, handle, [A, B], lambda: calls.count(A) == 2)
    assert calls.count(A) == 2
    assert calls.count(B) == 1
    [record] = [r for r in caplog.records if "reconcile of team-a/digest failed" in r.message]
    assert record.exc_info is not None


def test_passes_of_one_key_never_overlap() -> None:
    inside: set[Key] = set()
    overlaps: list[Key] = []
    done: list[Key] = []
    lock = threading.Lock()
    queue = WorkQueue()

    def handle(key: Key) -> None:
        with lock:
            if key in inside:
                overlaps.append(key)
            inside.add(key)
        time.sleep(0.01)
        queue.add(key) if len(done) < 20 else None  # an event during its own pass
        with lock:
            inside.discard(key)
            done.append(key)

    run_until(queue, handle, [A], lambda: len(done) >= 20)
    assert len(done) >= 20
    assert not overlaps


def test_an_outage_is_one_line_not_a_traceback_per_schedule(
    caplog: pytest.LogCaptureFixture,
) -> None:
    keys = [("ns", f"s{i}") for i in range(30)]
    failed: list[Key] = []

    def handle(key: Key) -> None:
        failed.append(key)
        raise ApiException(status=503, reason="Service Unavailable")

    with caplog.at_level(logging.WARNING):
        run_until(WorkQueue(), handle, keys, lambda: len(failed) == 30)
    lines = [r for r in caplog.records if "apiserver unavailable" in r.message]
    assert len(failed) == 30
    assert len(lines) == 1
    assert lines[0].exc_info is None


def test_the_first_pass_is_reported_once_every_listed_schedule_was_handled(
    caplog: pytest.LogCaptureFixture,
) -> None:
    first = FirstPass()
    assert not first.running()
    with caplog.at_level(logging.INFO):
        assert first.begin({A, B})
        assert not first.begin({A})
        first.handled(A)
        first.handled(("other", "one"))  # created after the start: not waited for
        assert not [r for r in caplog.records if "first pass done" in r.message]
        assert first.running()
        first.handled(B)
        first.handled(B)
    assert len([r for r in caplog.records if "first pass done" in r.message]) == 1
    assert not first.running()


def test_events_of_the_initial_listing_do_not_queue_what_the_first_pass_covers() -> None:
    memo = Memo(settings=Settings())
    memo.workers = Workers(memo.queue, lambda _key: None, count=1)
    memo.listed_at_start = frozenset({A})
    assert not memo.in_first_pass(A)  # not begun
    memo.workers.first_pass.begin({A, B})
    assert memo.in_first_pass(A)
    assert not memo.in_first_pass(B)  # not listed at start (created meanwhile)
    memo.workers.first_pass.handled(A)
    memo.workers.first_pass.handled(B)
    assert not memo.in_first_pass(A)  # done: a listing now is a re-list, which may bring news


# ---- what the workers read ------------------------------------------------------------------


def obj(kind: str, rv: str, name: str = "digest", uid: str = "u1") -> dict[str, Any]:
    return {
        "kind": kind,
        "metadata": {"namespace": "team-a", "name": name, "uid": uid, "resourceVersion": rv},
    }


def test_our_write_makes_the_index_copy_stale_until_its_echo() -> None:
    unseen = Unseen()
    cached = obj("AgentSchedule", "10")
    assert not unseen.stale("AgentSchedule", "team-a", "digest", cached)
    unseen.wrote(obj("AgentSchedule", "11"))
    assert unseen.stale("AgentSchedule", "team-a", "digest", cached)
    assert not unseen.seen("AgentSchedule", "team-a", "digest", "10")  # an older event
    assert unseen.stale("AgentSchedule", "team-a", "digest", cached)
    assert unseen.seen("AgentSchedule", "team-a", "digest", "11")  # the echo
    assert not unseen.stale("AgentSchedule", "team-a", "digest", obj("AgentSchedule", "11"))
    assert len(unseen) == 0


def test_a_read_settles_what_the_index_must_show_and_a_deletion_clears_it() -> None:
    unseen = Unseen()
    unseen.wrote(obj("CronJob", "11", name="digest-cron"))
    # The watch skipped 11 (a relist); the apiserver has 12 now.
    unseen.settle("CronJob", "team-a", "digest-cron", obj("CronJob", "12", name="digest-cron"))
    assert unseen.stale("CronJob", "team-a", "digest-cron", obj("CronJob", "11"))
    assert not unseen.stale("CronJob", "team-a", "digest-cron", obj("CronJob", "12"))
    unseen.seen("CronJob", "team-a", "digest-cron", None)
    assert len(unseen) == 0
    unseen.wrote(obj("CronJob", "13", name="digest-cron"))
    unseen.settle("CronJob", "team-a", "digest-cron", None)  # gone
    assert len(unseen) == 0


def test_writes_of_kinds_no_pass_reads_from_an_index_are_not_remembered() -> None:
    unseen = Unseen()
    for kind in ("Pod", "Job", "Event", "Secret"):
        unseen.wrote(obj(kind, "5"))
    unseen.wrote({"metadata": {"name": "x", "resourceVersion": "1"}})  # no kind
    assert len(unseen) == 0


def schedule(
    generation: int, observed: Any = None, annotations: dict[str, str] | None = None
) -> dict[str, Any]:
    body: dict[str, Any] = {
        "metadata": {"uid": "u1", "generation": generation, "annotations": annotations or {}},
    }
    if observed is not None:
        body["status"] = {"observedGeneration": observed}
    return body


def test_changes_of_a_schedule_as_a_pass_cares() -> None:
    changes = Changes()
    assert changes.of(schedule(1)) is Change.CREATED
    assert changes.of(schedule(1, observed=1)) is Change.NONE  # our status write
    assert changes.of(schedule(2, observed=1)) is Change.UPDATED
    run_now = {"nocturne.dev/run-now": "2026-12-02T10:00:00Z"}
    assert changes.of(schedule(2, observed=2, annotations=run_now)) is Change.TOUCHED
    assert changes.of(schedule(2, observed=2, annotations=run_now)) is Change.NONE
    changes.forget("u1")
    assert changes.of(schedule(2, observed=2, annotations=run_now)) is Change.RESUMED


@pytest.mark.parametrize("observed", [1, "2", None])
def test_after_a_restart_a_schedule_changed_meanwhile_is_an_update(observed: Any) -> None:
    change = Changes().of(schedule(2, observed=observed))
    assert change is (Change.CREATED if observed is None else Change.UPDATED)


def test_an_index_keeps_the_last_writer_but_not_the_field_sets() -> None:
    body: dict[str, Any] = {
        "kind": "AgentSchedule",
        "metadata": {
            "name": "digest",
            "annotations": {
                "kubectl.kubernetes.io/last-applied-configuration": "{...}" * 1000,
                "nocturne.dev/run-now": "x",
            },
            "managedFields": [
                {
                    "manager": "kubectl",
                    "operation": "Apply",
                    "time": "2026-12-01T00:00:00Z",
                    "fieldsV1": {"f:spec": {}},
                },
                {
                    "manager": "argocd-controller",
                    "operation": "Apply",
                    "time": "2026-12-02T00:00:00Z",
                    "fieldsV1": {"f:spec": {}},
                },
                {
                    "manager": "nocturne-operator",
                    "operation": "Update",
                    "subresource": "status",
                    "time": "2026-12-03T00:00:00Z",
                    "fieldsV1": {"f:status": {}},
                },
            ],
        },
        "spec": {"schedule": "0 9 * * *"},
    }
    kept = schedules.trimmed(body)
    assert kept["metadata"]["annotations"] == {"nocturne.dev/run-now": "x"}
    assert kept["metadata"]["managedFields"] == [
        {"manager": "argocd-controller", "operation": "Apply", "time": "2026-12-02T00:00:00Z"}
    ]
    assert schedules._last_writer(kept["metadata"]) == "argocd-controller"
    assert kept["spec"] is body["spec"]  # shared, not copied
    assert len(body["metadata"]["managedFields"]) == 3  # the original is untouched
    assert "kubectl.kubernetes.io/last-applied-configuration" in body["metadata"]["annotations"]


class CountingKube:
    def __init__(self, objects: dict[tuple[str, str, str], dict[str, Any]]) -> None:
        self.objects = objects
        self.gets: list[tuple[str, str, str]] = []

    def get(self, kind: str, namespace: str, name: str) -> dict[str, Any] | None:
        self.gets.append((kind, namespace, name))
        return self.objects.get((kind, namespace, name))


def test_a_pass_reads_the_apiserver_only_while_our_own_write_is_unseen() -> None:
    fresh = obj("AgentSchedule", "11")
    kube = CountingKube({("AgentSchedule", "team-a", "digest"): fresh})
    memo = cast(Memo, type("M", (), {"kube": kube, "unseen": Unseen()})())
    cached = obj("AgentSchedule", "10")
    assert schedules._current(memo, "AgentSchedule", "team-a", "digest", cached) is cached
    memo.unseen.wrote(fresh)
    assert schedules._current(memo, "AgentSchedule", "team-a", "digest", cached) is fresh
    assert schedules._current(memo, "AgentSchedule", "team-a", "digest", fresh) is fresh
    assert kube.gets == [("AgentSchedule", "team-a", "digest")]


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_what_an_event_names_goes_ahead_of_keys_whose_timer_came_due() -> None:
    clock = Clock()
    queue = WorkQueue(clock=clock)
    due = [("ns", f"s{i}") for i in range(5)]
    for key in due:
        queue.add_after(key, 60)
    clock.now += 60
    queue.add(("ns", "new"))  # created as 1,000 schedules come due at one slot
    assert queue.get(0) == ("ns", "new")
    queue.add(due[3])  # an event for one that came due: moved ahead, not twice
    got = [queue.get(0) for _ in range(6)]
    assert got == [due[3], due[0], due[1], due[2], due[4], None]
    assert len(queue) == 0


def test_a_key_has_one_timer_the_last_one_set() -> None:
    clock = Clock()
    queue = WorkQueue(clock=clock)
    queue.add_after(A, 3600)  # the resync
    queue.add_after(A, 30)  # a later pass: its next slot is in 30 s
    queue.add_after(B, 30)
    queue.add_after(B, 3600)  # ... and B's later pass found nothing due before the resync
    clock.now += 31
    assert [queue.get(0), queue.get(0)] == [A, None]
    queue.done(A)
    clock.now += 3600
    assert [queue.get(0), queue.get(0)] == [B, None]  # A's replaced timer does not fire


def test_a_forgotten_key_loses_its_timer_and_replaced_timers_do_not_pile_up() -> None:
    clock = Clock()
    queue = WorkQueue(clock=clock)
    queue.add_after(A, 10)
    queue.forget(A)  # the schedule was deleted
    for second in range(1000):  # a pass per event, each setting B's timer again
        queue.add_after(B, 3600 + second)
    assert len(queue._later) <= 2 * 1 + 64 + 1
    clock.now += 10_000
    assert [queue.get(0), queue.get(0)] == [B, None]


def test_a_failure_replaces_the_timer_with_its_backoff() -> None:
    clock = Clock()
    queue = WorkQueue(base_delay=15, clock=clock)
    queue.add_after(A, 3600)
    queue.retry(A)
    clock.now += 15
    assert queue.get(0) == A


def test_the_next_pass_comes_just_after_the_moment_due_or_at_the_resync() -> None:
    settings = Settings(resync_interval_seconds=3600)
    now = datetime(2026, 11, 26, 1, 0, tzinfo=UTC)
    assert next_pass_in(settings, A, now + timedelta(minutes=5), now) == 301
    assert next_pass_in(settings, A, now - timedelta(minutes=5), now) == 0  # overdue: now
    spread = [next_pass_in(settings, ("team-a", f"s{i}"), None, now) for i in range(1000)]
    assert all(3240 <= s <= 3600 for s in spread)
    assert max(spread) - min(spread) > 300  # spread over the last tenth, not one second
    assert next_pass_in(settings, A, now + timedelta(days=20), now) == spread_of(settings, A)


def spread_of(settings: Settings, key: Key) -> float:
    return next_pass_in(settings, key, None, datetime(2026, 1, 1, tzinfo=UTC))


def test_finished_jobs_already_dealt_with_are_not_unpacked() -> None:
    jobs = {
        ("team-a", "digest"): [
            Packed(obj("Job", "1", name="j1", uid="job-1")),
            Packed(obj("Job", "2", name="j2", uid="job-2")),
        ]
    }
    indexes = Indexes({}, {}, {}, jobs, {}, {}, {})  # type: ignore[arg-type]
    assert [j["metadata"]["uid"] for j in indexes.finished_jobs("team-a", "digest")] == [
        "job-1",
        "job-2",
    ]
    left = indexes.finished_jobs("team-a", "digest", done={"job-1"})
    assert [j["metadata"]["uid"] for j in left] == ["job-2"]
    assert indexes.finished_jobs("team-a", "other") == []
