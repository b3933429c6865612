"""The periodic sweep: runner pods whose Job is gone, rows left RUNNING, finished Jobs not yet
recorded, and every schedule reconciled afresh (drift repair, next runs, holds, silent stop).

Not a ``@kopf.timer``: kopf puts a finalizer on every object a timer serves, so deleting a
schedule would hang whenever the operator is down or uninstalled. One operator-level loop over
kopf's indexes does the same work and leaves deletion to garbage collection alone."""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import urllib3.exceptions
from kubernetes.client.exceptions import ApiException

from nocturne_operator.controller.memo import FinishedJobs, Indexes, Memo, SchedulePeers
from nocturne_operator.controller.schedules import reconcile_fresh

log = logging.getLogger(__name__)


async def sweep(memo: Memo) -> None:
    """Every ``reconcile_interval_seconds`` until cancelled; a failing step is logged and the
    next one runs."""
    while True:
        await asyncio.sleep(memo.settings.reconcile_interval_seconds)
        indexes = memo.indexes
        if indexes is None:  # no schedule seen yet
            continue
        recorder = memo.recorder
        try:
            await asyncio.to_thread(
                recorder.record_orphaned_pods, indexes.owner, list(indexes.pods.items())
            )
        except Exception:
            log.exception("recording runner pods whose Job is gone failed")
        if memo.history is not None:
            try:
                await asyncio.to_thread(recorder.reap, indexes.owner)
            except Exception:
                log.exception("reaping stuck executions failed")
        await _reconcile_all(memo, indexes)


# Consecutive schedules that found the apiserver away before the pass gives up: one slow
# schedule does not end it (the ones after it still get their pass), an outage does.
AWAY_LIMIT = 3


async def _reconcile_all(memo: Memo, indexes: Indexes) -> None:
    away = 0
    for key in list(indexes.bodies):
        for schedule in list(indexes.bodies.get(key, [])):
            try:
                await asyncio.to_thread(_periodic, schedule, memo, indexes.peers, indexes.jobs)
            except Exception as exc:
                if not apiserver_away(exc):
                    log.exception("periodic reconcile of %s/%s failed", *key)
                    continue
                away += 1
                if away == 1:  # one line per pass, not a traceback per schedule
                    log.warning("apiserver unavailable (%s) at %s/%s", exc, *key)
                if away >= AWAY_LIMIT:
                    log.warning("apiserver still unavailable; the sweep resumes next pass")
                    return
            else:
                away = 0


def apiserver_away(exc: BaseException) -> bool:
    """The apiserver cannot be reached or is not serving (a restart, an outage): transient."""
    if isinstance(exc, ApiException):
        return exc.status in (0, 502, 503, 504) or exc.status is None
    return isinstance(exc, (urllib3.exceptions.HTTPError, ConnectionError, TimeoutError))


def _periodic(
    schedule: dict[str, Any], memo: Memo, peers: SchedulePeers, jobs: FinishedJobs
) -> None:
    if memo.history is not None:
        meta = schedule["metadata"]
        for job in list(jobs.get((meta["namespace"], meta["name"]), [])):
            memo.recorder.record_job(job, schedule)
    reconcile_fresh(schedule, memo, peers)
