"""Taking the lead and giving it up (issue 15): of the operator's replicas, the one holding the
Lease (``controller.lease``) reconciles, records finished runs and sweeps; every replica serves
the run API, the agentruns API and the admission webhook, and watches what the leader watches.

A standby is a warm one: kopf's indexes are filled by its own watches, its queue keeps what
events name, its runs in flight and its run statistics are kept current by the run report
relay. Taking the lead is therefore a pass over every schedule from memory, not a restart:
statistics are read in one query, every schedule is queued, orphaned CronJobs are removed (a
standby does not act on CronJob events), the namespace budgets and every AgentSchedulePolicy's
status are brought in line, and the workers start. Giving it up pauses the
workers; a pass in progress is refused its next write by the Kube adapter's guard.
"""

from __future__ import annotations

import logging
import os
import socket
import time
from datetime import UTC, datetime

from nocturne_operator.adapters import metrics
from nocturne_operator.controller import policies
from nocturne_operator.controller.lease import LeaderElector, LeaseTiming
from nocturne_operator.controller.memo import Indexes, Memo
from nocturne_operator.controller.schedules import post_event, read_stats_ahead
from nocturne_operator.controller.workers import FirstPass

__all__ = ["elect", "step_down", "take_over"]

log = logging.getLogger(__name__)


def identity() -> str:
    """This replica's name in the Lease: its pod's name (the hostname) and its process ID. A
    container restarted in its pod (a crash, an OOM kill) is usually PID 1 again, finds the
    Lease held by its own name and leads again at once instead of waiting the Lease out: its
    predecessor has exited. Processes sharing a host (tests, benchmarks) differ by PID."""
    return f"{socket.gethostname()}_{os.getpid()}"


def elect(memo: Memo) -> LeaderElector:
    """The elector of this replica, not started yet; without run_api_tls_namespace there is
    no Lease and the process leads alone."""
    config = memo.settings
    return LeaderElector(
        memo.kube,
        config.run_api_tls_namespace,
        config.leader_lease_name,
        identity(),
        timing=LeaseTiming(
            duration=config.leader_lease_seconds,
            renew_deadline=config.leader_renew_deadline_seconds,
            retry=config.leader_retry_seconds,
        ),
        on_started=lambda: take_over(memo),
        on_stopped=lambda: step_down(memo),
    )


def take_over(memo: Memo) -> None:
    """This replica now leads: pass over every schedule (from the indexes, if kopf has listed
    them; else the first handler call queues them) and start the workers."""
    began = time.monotonic()
    # Finished Jobs are counted in the run metrics by the replica that led when they ended.
    memo.recorder.started_at = datetime.now(UTC)
    # Another replica led meanwhile: its writes of runs reach status afresh.
    memo.recorder.stats.clear()
    indexes = memo.indexes
    workers = memo.workers
    if indexes is not None:
        keys = set(indexes.bodies)
        bodies = [b for k in keys if (b := indexes.owner(*k)) is not None]
        read_stats_ahead(memo, bodies)
        _remove_orphaned_cronjobs(memo, indexes)
        if workers is not None:
            workers.first_pass = FirstPass(after="taking the lead")
            workers.first_pass.begin(keys)
        for key in keys:
            memo.queue.add(key)
        _bring_policies_in_line(memo, indexes)
        log.info(
            "leading: %d schedules queued for a pass (%.2f s to prepare)",
            len(keys),
            time.monotonic() - began,
        )
    if workers is not None:
        workers.resume()


def step_down(memo: Memo) -> None:
    """This replica no longer leads: no new pass starts, and its schedule metrics end (the
    leader's are the ones to read)."""
    if memo.workers is not None:
        memo.workers.pause()
    metrics.SCHEDULES.clear()
    metrics.NAMESPACE_BUDGETS.clear()


def _bring_policies_in_line(memo: Memo, indexes: Indexes) -> None:
    """The namespace budgets the grants read and each AgentSchedulePolicy's status, as the
    indexes show them now (their events reached this replica while it stood by)."""
    policies.sync_budgets(memo, indexes)
    # Each policy as its latest event showed it here (status writes of the old leader included).
    policies.refresh_statuses(memo, indexes)


def _remove_orphaned_cronjobs(memo: Memo, indexes: Indexes) -> None:
    """Managed CronJobs no schedule owns (their events reached this replica while it stood by
    and did nothing about them)."""
    for key in [k for k in list(indexes.cronjobs) if k not in indexes.bodies]:
        cronjob = indexes.cronjob(*key)
        if cronjob is None:
            continue
        meta = cronjob["metadata"]
        try:
            if memo.kube.delete("CronJob", meta["namespace"], meta["name"]):
                post_event(
                    memo.kube,
                    cronjob,
                    "Warning",
                    "OrphanRemoved",
                    f"no AgentSchedule {key[1]!r} owns this CronJob; deleted",
                )
        except Exception as exc:  # the next takeover, or its next event, tries again
            log.warning("removing orphaned CronJob %s/%s failed: %s", *key, exc)
