"""One active reconciler among the replicas (issue 15), the parts that need no apiserver: the
workers wait while the replica stands by, a write only the leader makes is refused at once when
it does not lead, and the Lease's timing is ordered. The elector against a real apiserver is in
``tests/e2e/test_lease.py``."""

from __future__ import annotations

import threading
import time

import pytest
from kubernetes import client

from nocturne_operator.adapters.kube import Kube, NotLeadingError
from nocturne_operator.controller.lease import LeaseTiming
from nocturne_operator.controller.queue import Key, WorkQueue
from nocturne_operator.controller.workers import Workers
from nocturne_operator.errors import SettingsError
from nocturne_operator.settings import load_settings

KEY: Key = ("research", "digest")


def test_workers_wait_while_the_replica_stands_by_and_start_when_it_leads() -> None:
    handled: list[Key] = []
    done = threading.Event()

    def handle(key: Key) -> None:
        handled.append(key)
        done.set()

    queue = WorkQueue()
    workers = Workers(queue, handle, 2)
    workers.start(paused=True)
    try:
        queue.add(KEY)
        time.sleep(0.3)
        assert handled == []  # a standby keeps what events name, and reconciles nothing
        assert len(queue) == 1
        workers.resume()
        assert done.wait(5)
        assert handled == [KEY]
        workers.pause()
        done.clear()
        time.sleep(0.1)  # a worker back at its wait
        queue.add(KEY)
        assert not done.wait(0.3)
        assert handled == [KEY]
    finally:
        workers.stop(timeout=5)


def test_a_pass_that_loses_the_lead_is_dropped_without_a_retry(
    caplog: pytest.LogCaptureFixture,
) -> None:
    calls: list[Key] = []
    done = threading.Event()

    def handle(key: Key) -> None:
        calls.append(key)
        done.set()
        raise NotLeadingError("PATCH AgentSchedule research/digest: this replica does not lead")

    queue = WorkQueue(base_delay=0.05)
    workers = Workers(queue, handle, 1)
    workers.start()
    try:
        queue.add(KEY)
        assert done.wait(5)
        time.sleep(0.3)
        assert calls == [KEY]  # no backoff retry: the new leader passes over it
        assert not [r for r in caplog.records if r.levelname == "ERROR"]
    finally:
        workers.stop(timeout=5)


def test_a_write_only_the_leader_makes_is_refused_before_it_is_sent() -> None:
    # Nothing listens on port 9: a write that got past the guard would fail differently.
    kube = Kube(client.ApiClient(client.Configuration(host="https://127.0.0.1:9")))
    kube.may_write = lambda: False
    with pytest.raises(NotLeadingError, match="PATCH AgentSchedule research/digest"):
        kube.merge_patch("AgentSchedule", "research", "digest", {"status": {}}, status=True)
    with pytest.raises(NotLeadingError, match="DELETE CronJob"):
        kube.delete("CronJob", "research", "digest")
    with pytest.raises(NotLeadingError, match="PATCH Pod"):
        kube.remove_finalizer("Pod", "research", "digest-1-abcde", "nocturne.dev/run-record")
    # The run API's certificate and Events are every replica's to write.
    with pytest.raises(Exception) as excinfo:  # noqa: PT011 - any transport error
        kube.create({"kind": "Secret", "metadata": {"namespace": "ops", "name": "tls"}})
    assert not isinstance(excinfo.value, NotLeadingError)


@pytest.mark.parametrize(
    ("duration", "deadline", "retry"), [(10, 10, 2), (15, 10, 10), (15, 20, 2), (15, 10, 0)]
)
def test_lease_timing_must_let_the_leader_stop_before_a_standby_takes_over(
    duration: float, deadline: float, retry: float
) -> None:
    with pytest.raises(ValueError, match=r"retry .* < renew deadline .* < lease duration"):
        LeaseTiming(duration=duration, renew_deadline=deadline, retry=retry)


def test_settings_refuse_a_renew_deadline_past_the_lease(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("NOCTURNE_LEADER_RENEW_DEADLINE_SECONDS", "20")
    with pytest.raises(SettingsError, match=r"leader_renew_deadline_seconds 20\.0"):
        load_settings()
