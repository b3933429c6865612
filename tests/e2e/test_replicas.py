"""Two operator replicas on the real control plane and a real PostgreSQL (issue 15): one
reconciles, both serve the run API behind one Service (``harness.service.ServiceProxy``, the
stand-in for kube-proxy: runner pods share the host network here); the leader killed with runs
in flight is replaced, and a rolling restart with runs in flight loses no report. Every run is
recorded exactly once, and every runner's final report reached the operator (its termination
summary says ``historyWritten``; its history row carries the report's metadata, which the
summary fallback never writes).

The figures (takeover after a kill, after a graceful stop) are printed and kept as test
properties (``-rP`` or the JUnit report shows them)."""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack
from dataclasses import dataclass
from functools import partial

import pytest

from agent_runner.contract import RunOutcome
from e2e.conftest import Model, OperatorProcess
from e2e.schedules import run_now, runner_summary, status_of
from e2e.test_resilience import (
    NAME,
    RECONCILES,
    apply,
    attempts,
    finished_job,
    history_schema,
    job_for,
    manifest,
    metric,
    prepare_namespace,
    solo_operator,
)
from harness.controlplane import free_ports
from harness.kube import Cluster, Kubectl, wait_for
from harness.postgres import PostgresServer
from harness.service import ServiceProxy
from integration.llm_server import ScriptedServer

pytestmark = pytest.mark.e2e

LEADER = "nocturne_leader"
GRANTS = 'nocturne_run_api_requests_total{code="200",endpoint="start"}'
# The chart's Lease timing (15 s lease, 10 s renew deadline, 2 s retry): the figures measured
# are the ones an installation gets.
LEASE_SECONDS = 15.0
RETRY_SECONDS = 2.0
# Each run's one model call takes this long: longer than a takeover, so reports of runs in
# flight reach the standby before, during and after it.
MODEL_SECONDS = 20.0


@dataclass
class Replica:
    """One operator process and the port its run API listens on (its Service endpoint)."""

    name: str
    process: OperatorProcess
    run_api_port: int

    def alive(self) -> bool:
        return self.process.process.poll() is None

    def leading(self) -> bool:
        return self.alive() and metric(self.process, LEADER) == 1.0

    def reconciles(self) -> float:
        return metric(self.process, RECONCILES)

    def kill(self) -> None:
        """SIGKILL: no release of the Lease, no drain, connections broken mid-request."""
        os.killpg(self.process.process.pid, signal.SIGKILL)
        self.process.process.wait(10)


class Replicas:
    """The Deployment's pods: started with the same settings and one Lease, behind one
    Service."""

    def __init__(
        self,
        stack: ExitStack,
        cluster: Cluster,
        namespace: str,
        *,
        database_url: str,
        site: ScriptedServer,
        service: ServiceProxy,
    ) -> None:
        self.stack, self.cluster, self.namespace = stack, cluster, namespace
        self.database_url, self.site, self.service = database_url, site, service
        self.pods: list[Replica] = []
        self._started = 0

    def start(self) -> Replica:
        """A new pod: started, then an endpoint of the Service once it serves."""
        self._started += 1
        name = f"replica-{self._started}"
        [port] = free_ports(1)
        settings = {
            "NOCTURNE_RECONCILE_INTERVAL_SECONDS": "2",
            "NOCTURNE_RESYNC_INTERVAL_SECONDS": "2",
            "NOCTURNE_LEADER_LEASE_NAME": f"{self.namespace}-operator",
            "NOCTURNE_RUN_API_URL": f"https://127.0.0.1:{self.service.port}",
            "NOCTURNE_SHUTDOWN_DRAIN_SECONDS": "2",
            # Every run's Job and pod stay to be checked (the CronJob controller keeps 3).
            "NOCTURNE_SUCCESSFUL_JOBS_HISTORY_LIMIT": "20",
        }
        process = self.stack.enter_context(
            solo_operator(
                self.cluster,
                self.namespace,
                self.database_url,
                name,
                self.site,
                port,
                settings=settings,
            )
        )
        replica = Replica(name, process, port)
        self.pods.append(replica)
        self.service.set_backends(p.run_api_port for p in self.pods if p.alive())
        return replica

    def leader(self) -> Replica | None:
        """The one replica that leads, if exactly one does."""
        leading = [p for p in self.pods if p.leading()]
        assert len(leading) <= 1, f"two replicas lead: {[p.name for p in leading]}"
        return leading[0] if leading else None

    def gone(self, replica: Replica) -> None:
        """The pod is no endpoint of the Service any more."""
        self.service.set_backends(p.run_api_port for p in self.pods if p.alive())
        del replica


@dataclass
class Installation:
    """A namespace served by replicas of one operator, its history and its Service."""

    namespace: str
    url: str
    site: ScriptedServer
    pods: Replicas


@pytest.fixture
def installation(  # noqa: PLR0917 - fixtures
    cluster: Cluster,
    kubectl: Kubectl,
    crds: None,
    node: object,
    postgres: PostgresServer,
    solo_namespace: str,
    model: tuple[Model, ScriptedServer],
) -> Iterator[Installation]:
    """No replica yet (``pods.start()``); every model call takes a few seconds, so runs stay in
    flight while replicas come and go."""
    answers, site = model
    answers.delay = MODEL_SECONDS
    url = history_schema(postgres, solo_namespace)
    prepare_namespace(kubectl, solo_namespace, url)
    with ServiceProxy([]) as service, ExitStack() as stack:
        pods = Replicas(
            stack, cluster, solo_namespace, database_url=url, site=site, service=service
        )
        yield Installation(solo_namespace, url, site, pods)


def start_runs(kubectl: Kubectl, namespace: str, requests: list[str]) -> None:
    """A run-now per request, each once its predecessor's Job exists."""
    for request in requests:
        run_now(kubectl, namespace, request, NAME)
        wait_for(partial(job_for, kubectl, namespace, request), 60, f"the Job of {request}")


def granted(database_url: str, kubectl: Kubectl, namespace: str, requests: list[str]) -> bool:
    """Every request's runner got its grant (its attempt's row exists)."""
    for request in requests:
        job = job_for(kubectl, namespace, request)
        if job is None or not attempts(database_url, job):
            return False
    return True


def assert_recorded_once_with_every_report(
    kubectl: Kubectl, namespace: str, database_url: str, requests: list[str]
) -> None:
    """Each run ended, has exactly one history row, SUCCEEDED, written by its runner's final
    report (not the summary fallback), and its runner says the report was recorded."""
    for request in requests:
        job = wait_for(
            partial(finished_job, kubectl, namespace, request), 180, f"the run of {request}"
        )
        rows = attempts(database_url, job)
        assert len(rows) == 1, f"{request}: {rows}"
        [row] = rows
        assert row.status is RunOutcome.SUCCEEDED, f"{request}: {row}"
        # Only the finish report carries the runner's metadata (steps, tool calls).
        assert row.metadata.get("steps") == 1, f"{request}: {row.metadata}"
        _, summary = runner_summary(kubectl, namespace, job)
        assert summary.history_written, f"{request}: the final report did not reach the operator"
    wait_for(
        lambda: (
            (status_of(kubectl, namespace, NAME).get("runs") or {}).get("succeeded")
            == len(requests)
        ),
        90,
        f"status to count {len(requests)} succeeded runs",
    )
    assert not status_of(kubectl, namespace, NAME).get("activeRun")


def timed(what: Callable[[], object], timeout: float, description: str) -> float:
    """Seconds until ``what`` is truthy."""
    began = time.monotonic()
    wait_for(what, timeout, description)
    return time.monotonic() - began


def figure(record_property: Callable[[str, object], None], name: str, value: object) -> None:
    record_property(name, value)
    print(f"[replicas] {name}: {value}")


def any_leads(replicas: list[Replica]) -> bool:
    return any(p.leading() for p in replicas)


def lease_holder(kubectl: Kubectl, namespace: str) -> str:
    lease = kubectl.json("lease", f"{namespace}-operator", "-n", "default")
    return str(lease["spec"].get("holderIdentity") or "")


def test_one_replica_reconciles_and_a_killed_leader_is_replaced_losing_no_report(
    installation: Installation, kubectl: Kubectl, record_property: Callable[[str, object], None]
) -> None:
    namespace, url, site, pods = (
        installation.namespace,
        installation.url,
        installation.site,
        installation.pods,
    )
    first, second = pods.start(), pods.start()
    wait_for(pods.leader, 30, "one replica to lead")
    leader = pods.leader()
    assert leader is not None
    standby = second if leader is first else first
    assert lease_holder(kubectl, namespace).startswith(os.uname().nodename)
    apply(kubectl, namespace, manifest(site))

    # Only the leader reconciles; the standby's queue waits.
    assert leader.reconciles() > 0
    time.sleep(3 * RETRY_SECONDS)
    assert standby.reconciles() == 0
    assert not standby.leading()

    requests = [f"kill-{n}" for n in range(4)]
    start_runs(kubectl, namespace, requests)
    wait_for(lambda: granted(url, kubectl, namespace, requests), 120, "every grant")
    # The Service spread the grants over both replicas, and the leader shows every run
    # in flight, those the standby granted too (the run report relay).
    assert metric(standby.process, GRANTS) > 0
    assert metric(leader.process, GRANTS) > 0
    wait_for(
        lambda: (
            (status_of(kubectl, namespace, NAME).get("activeRun") or {}).get("others")
            == len(requests) - 1
        ),
        30,
        "status.activeRun to count every run in flight",
    )

    # The leader dies with the runs in flight: their reports go to the standby.
    killed = time.monotonic()
    leader.kill()
    pods.gone(leader)
    takeover = timed(standby.leading, 3 * LEASE_SECONDS, "the standby to take the lead")
    wait_for(lambda: standby.reconciles() > 0, 60, "the new leader's first pass")
    figure(record_property, "takeover_after_kill_seconds", round(takeover, 1))
    figure(record_property, "reconciling_after_kill_seconds", round(time.monotonic() - killed, 1))
    assert takeover <= LEASE_SECONDS + 2 * RETRY_SECONDS + 3

    assert_recorded_once_with_every_report(kubectl, namespace, url, requests)
    figure(record_property, "runs_recorded_once_after_kill", len(requests))
    # A run after the takeover is reconciled and recorded by the new leader alone.
    start_runs(kubectl, namespace, ["after-kill"])
    assert_recorded_once_with_every_report(kubectl, namespace, url, [*requests, "after-kill"])


def test_a_rolling_restart_with_runs_in_flight_loses_no_report(
    installation: Installation, kubectl: Kubectl, record_property: Callable[[str, object], None]
) -> None:
    """The Deployment's RollingUpdate (maxSurge 1, maxUnavailable 0): a new pod is serving
    before an old one gets SIGTERM (it gives up the Lease, answers readiness 503 and drains),
    twice, with runs in flight and runs started meanwhile."""
    namespace, url, site, pods = (
        installation.namespace,
        installation.url,
        installation.site,
        installation.pods,
    )
    old = [pods.start(), pods.start()]
    wait_for(pods.leader, 30, "one replica to lead")
    apply(kubectl, namespace, manifest(site))
    requests = [f"roll-{n}" for n in range(3)]
    start_runs(kubectl, namespace, requests)
    wait_for(lambda: granted(url, kubectl, namespace, requests), 120, "every grant")

    handovers: list[float] = []
    for number, outgoing in enumerate(sorted(old, key=lambda p: not p.leading())):
        pods.start()  # surge: the new pod serves first
        was_leading = outgoing.leading()
        os.killpg(outgoing.process.process.pid, signal.SIGTERM)  # release, drain, stop
        others = [p for p in pods.pods if p is not outgoing]
        if was_leading:
            handovers.append(timed(partial(any_leads, others), 3 * LEASE_SECONDS, "a leader"))
        outgoing.process.process.wait(30)
        pods.gone(outgoing)
        more = [f"roll-during-{number}"]
        start_runs(kubectl, namespace, more)
        requests += more
    assert handovers, "the leader was rolled"
    figure(record_property, "handover_after_sigterm_seconds", round(max(handovers), 1))
    # Released, not waited out: well under the Lease's duration.
    assert max(handovers) < LEASE_SECONDS

    assert_recorded_once_with_every_report(kubectl, namespace, url, requests)
    figure(record_property, "runs_recorded_once_across_rollout", len(requests))
