"""The periodic sweep: runner pods whose Job is gone, and rows left RUNNING whose Job or pod
is gone. Schedules are not swept: each pass sets its schedule's next one on the work queue
(its next slot, a silent-stop deadline, a new month, at the latest the resync interval), so at
idle the operator passes over a schedule only when the clock changes something about it.

Not a ``@kopf.timer``: kopf puts a finalizer on every object a timer serves, so deleting a
schedule would hang whenever the operator is down or uninstalled. One operator-level loop over
kopf's indexes does the same work and leaves deletion to garbage collection alone."""

from __future__ import annotations

import asyncio
import logging

from nocturne_operator.controller.memo import Memo

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
                recorder.record_orphaned_pods, indexes.owner, indexes.unrecorded_pods()
            )
        except Exception:
            log.exception("recording runner pods whose Job is gone failed")
        if memo.history is not None:
            try:
                await asyncio.to_thread(recorder.reap, indexes.owner)
            except Exception:
                log.exception("reaping stuck executions failed")
