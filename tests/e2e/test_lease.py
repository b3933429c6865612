"""The leader election (``controller.lease``) against the real kube-apiserver: one candidate
leads, never two at once; a released Lease is taken within the retry period; a leader cut off
from the apiserver stops leading by its renew deadline and a standby takes over once the Lease
has gone unrenewed for its duration; the Lease records who holds it and how often it changed
hands."""

from __future__ import annotations

import copy
import threading
import time
from collections.abc import Iterator

import pytest
from kubernetes import client

from harness.kube import wait_for
from nocturne_operator.adapters.kube import Kube
from nocturne_operator.controller.lease import LeaderElector, LeaseTiming

pytestmark = pytest.mark.e2e

TIMING = LeaseTiming(duration=4.0, renew_deadline=3.0, retry=0.5)


class Candidates:
    """Electors for one Lease, each counting its transitions; a watcher samples them all."""

    def __init__(self, kube: Kube, namespace: str, lease: str) -> None:
        self.kube, self.namespace, self.lease = kube, namespace, lease
        self.electors: list[LeaderElector] = []
        self.events: list[tuple[str, str]] = []
        self.overlaps = 0
        self._stop = threading.Event()
        self._watcher = threading.Thread(target=self._watch, daemon=True)
        self._watcher.start()

    def add(self, name: str, store: Kube | None = None) -> LeaderElector:
        elector = LeaderElector(
            store or self.kube,
            self.namespace,
            self.lease,
            name,
            timing=TIMING,
            on_started=lambda: self.events.append((name, "started")),
            on_stopped=lambda: self.events.append((name, "stopped")),
        )
        self.electors.append(elector)
        elector.start()
        return elector

    def leaders(self) -> list[str]:
        return [e.identity for e in self.electors if e.leading()]

    def _watch(self) -> None:
        while not self._stop.wait(0.02):
            if len(self.leaders()) > 1:
                self.overlaps += 1

    def close(self) -> None:
        self._stop.set()
        for elector in self.electors:
            elector.stop()


@pytest.fixture
def candidates(kube: client.ApiClient, namespace: str) -> Iterator[Candidates]:
    group = Candidates(Kube(kube), namespace, "nocturne-operator")
    try:
        yield group
    finally:
        group.close()


def lease_spec(kube: client.ApiClient, namespace: str) -> dict[str, object]:
    found = Kube(kube).get_lease(namespace, "nocturne-operator", 5.0)
    assert found is not None
    return dict(found["spec"])


def test_one_candidate_leads_and_a_released_lease_is_taken_at_once(
    candidates: Candidates, kube: client.ApiClient, namespace: str
) -> None:
    first = candidates.add("replica-a")
    wait_for(first.leading, 10, "the first candidate to lead")
    second = candidates.add("replica-b")
    time.sleep(3 * TIMING.duration)  # renewed all along: never taken
    assert candidates.leaders() == ["replica-a"]
    spec = lease_spec(kube, namespace)
    assert spec["holderIdentity"] == "replica-a"
    assert spec["leaseDurationSeconds"] == 4
    assert spec["leaseTransitions"] == 0
    began = time.monotonic()
    first.stop()  # steps down, then releases
    wait_for(second.leading, 10, "the second candidate to lead")
    assert time.monotonic() - began < TIMING.duration  # released: not waited out
    assert candidates.events == [
        ("replica-a", "started"),
        ("replica-a", "stopped"),
        ("replica-b", "started"),
    ]
    spec = lease_spec(kube, namespace)
    assert (spec["holderIdentity"], spec["leaseTransitions"]) == ("replica-b", 0)
    assert candidates.overlaps == 0


def test_a_leader_cut_off_stops_by_its_deadline_before_the_standby_takes_over(
    candidates: Candidates, kube: client.ApiClient, namespace: str
) -> None:
    # The leader's own client; it is closed below (a partition: its requests fail).
    own = client.ApiClient(copy.deepcopy(kube.configuration))
    leader = candidates.add("replica-a", Kube(own))
    wait_for(leader.leading, 10, "the first candidate to lead")
    standby = candidates.add("replica-b")
    time.sleep(2 * TIMING.retry)
    own.configuration.host = "https://127.0.0.1:9"  # nothing listens there
    own.rest_client.pool_manager.clear()
    cut = time.monotonic()
    wait_for(lambda: not leader.leading(), 10, "the cut-off leader to stop")
    stopped = time.monotonic() - cut
    wait_for(standby.leading, 20, "the standby to take over")
    taken = time.monotonic() - cut
    # The leader stops within its renew deadline of its last renewal; the standby waits for
    # the Lease's duration since it last saw it change: never both at once.
    assert stopped <= TIMING.renew_deadline + 0.5
    assert TIMING.duration - TIMING.retry <= taken <= TIMING.duration + 3 * TIMING.retry
    assert candidates.overlaps == 0
    spec = lease_spec(kube, namespace)
    assert (spec["holderIdentity"], spec["leaseTransitions"]) == ("replica-b", 1)
    assert ("replica-a", "stopped") in candidates.events
