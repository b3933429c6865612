"""The periodic sweep: runner pods whose Job is gone, rows left RUNNING whose Job or pod is
gone, and rows past their retention (purged in bounded batches). Schedules are not swept: each
pass sets its schedule's next one on the work queue (its next slot, a silent-stop deadline, a
new month, at the latest the resync interval), so at idle the operator passes over a schedule
only when the clock changes something about it.

Not a ``@kopf.timer``: kopf puts a finalizer on every object a timer serves, so deleting a
schedule would hang whenever the operator is down or uninstalled. One operator-level loop over
kopf's indexes does the same work and leaves deletion to garbage collection alone. It runs on
every replica and does its work on the leading one (issue 15)."""

from __future__ import annotations

import asyncio
import logging
from datetime import UTC, datetime, timedelta

from nocturne_operator.adapters import metrics
from nocturne_operator.controller import policies
from nocturne_operator.controller.memo import Memo
from nocturne_operator.settings import Settings
from nocturne_operator.storage import History, HistoryUnavailableError

log = logging.getLogger(__name__)

# Batches of settings.retention_batch_size per table and sweep: a sweep stays short, and a
# backlog (the first purge of a long history) goes on at the next sweep.
PURGE_BATCHES = 10
# Once caught up, or after a failure, the purge looks again this much later, not every sweep.
PURGE_INTERVAL = timedelta(hours=1)
# A checkpoint goes when its Job is recorded finished; one not updated for this long belongs to
# a Job whose end never was (deleted with its pods while no operator ran).
CHECKPOINTS_KEPT = timedelta(days=7)


def purge_expired(history: History, settings: Settings, now: datetime) -> bool:
    """Delete rows past their retention (``history_retention_days`` for runs, their totals
    kept; ``audit_retention_days`` for audit rows; 0 keeps them; checkpoints of Jobs long
    over, a batch), at most PURGE_BATCHES
    batches per table, counted in nocturne_purged_rows_total. True when both are caught up
    (a batch came back short)."""
    caught_up = True
    size = settings.retention_batch_size
    history.purge_checkpoints(CHECKPOINTS_KEPT, limit=size)
    for table, days, purge in (
        ("schedule_executions", settings.history_retention_days, history.purge_runs),
        ("schedule_events", settings.audit_retention_days, history.purge_events),
    ):
        if not days:
            continue
        before = now - timedelta(days=days)
        total = 0
        for _ in range(PURGE_BATCHES):
            deleted = purge(before, limit=size)
            total += deleted
            metrics.PURGED_ROWS.labels(table).inc(deleted)
            if deleted < size:
                break
        else:
            caught_up = False
        if total:
            log.info("purged %d rows of %s older than %d days", total, table, days)
    return caught_up


async def _purge(history: History, settings: Settings) -> datetime:
    """One sweep's purge; returns when the next is due."""
    now = datetime.now(UTC)
    try:
        caught_up = await asyncio.to_thread(purge_expired, history, settings, now)
    except HistoryUnavailableError as exc:
        # The database away is not a bug: one line, and the purge waits for the next interval.
        log.warning("purging rows past their retention deferred: %s", exc)
        return now + PURGE_INTERVAL
    except Exception:
        log.exception("purging rows past their retention failed")
        return now + PURGE_INTERVAL
    return now + PURGE_INTERVAL if caught_up else now


async def sweep(memo: Memo) -> None:
    """Every ``reconcile_interval_seconds`` until cancelled, on the leading replica only (a
    standby's sweeps are skipped); a failing step is logged and the next one runs."""
    purge_due = datetime.now(UTC)
    while True:
        await asyncio.sleep(memo.settings.reconcile_interval_seconds)
        if not memo.leading():
            continue
        if memo.history is not None and datetime.now(UTC) >= purge_due:
            purge_due = await _purge(memo.history, memo.settings)
        indexes = memo.indexes
        if indexes is None:  # no schedule seen yet
            continue
        recorder = memo.recorder
        # The namespace budgets, again: a write missed while the database was away.
        await asyncio.to_thread(policies.sync_budgets, memo, indexes)
        try:
            await asyncio.to_thread(
                recorder.record_orphaned_pods, indexes.owner, indexes.unrecorded_pods()
            )
        except Exception:
            log.exception("recording runner pods whose Job is gone failed")
        if memo.history is not None:
            try:
                await asyncio.to_thread(recorder.reap, indexes.owner)
            except Exception:
                log.exception("reaping stuck executions failed")
