"""Run checkpoints (``run_checkpoints``): a Job's conversation after its last completed step,
kept for a retry of the Job (a new pod) to resume from instead of paying for the steps again.

Written through the run API by the Job's own pods only (the token's pod -> Job check happens
there), a later step replaces an earlier one, never the reverse (a slow report of step 2 cannot
undo step 3), and only while the execution that sends it is RUNNING. Removed when the Job is
recorded as finished; ``purge_checkpoints`` is the safety net for Jobs whose end never was.
"""

from __future__ import annotations

from collections.abc import Collection
from datetime import UTC, datetime, timedelta
from typing import Any

import sqlalchemy as sa
from sqlalchemy.dialects import postgresql as pg

from agent_runner.contract import RunOutcome
from nocturne_operator.storage.engine import Repository
from nocturne_operator.storage.schema import EXECUTIONS, RUN_CHECKPOINTS

__all__ = ["Checkpoints"]


class Checkpoints(Repository):
    """Saves, loads and removals of ``run_checkpoints``."""

    def save_checkpoint(self, execution_id: int, step: int, checkpoint: dict[str, Any]) -> bool:
        """Keep ``checkpoint`` (a ``contract.Checkpoint`` as JSON) as its execution's Job's
        latest; False when it was not kept (the execution is not RUNNING, or the Job has one of
        the same or a later step already)."""
        e, c = EXECUTIONS, RUN_CHECKPOINTS
        source = sa.select(
            e.c.job_uid,
            e.c.id,
            sa.literal(step, sa.Integer),
            sa.literal(checkpoint, pg.JSONB),
        ).where(e.c.id == execution_id, e.c.status == RunOutcome.RUNNING.value)
        insert = pg.insert(c).from_select(["job_uid", "execution_id", "step", "checkpoint"], source)
        statement = insert.on_conflict_do_update(
            constraint="pk_run_checkpoints",
            set_={
                "execution_id": insert.excluded.execution_id,
                "step": insert.excluded.step,
                "checkpoint": insert.excluded.checkpoint,
                "updated_at": sa.func.now(),
            },
            where=c.c.step < insert.excluded.step,
        ).returning(c.c.job_uid)
        with self._begin(f"save the checkpoint of execution {execution_id} (step {step})") as conn:
            return conn.execute(statement).first() is not None

    def load_checkpoint(self, job_uid: str) -> dict[str, Any] | None:
        """The Job's latest checkpoint (JSON), or None."""
        c = RUN_CHECKPOINTS
        with self._begin(f"load the checkpoint of Job UID {job_uid}") as conn:
            found: dict[str, Any] | None = conn.execute(
                sa.select(c.c.checkpoint).where(c.c.job_uid == job_uid)
            ).scalar_one_or_none()
        return found

    def drop_checkpoints(self, job_uids: Collection[str]) -> int:
        """Remove the checkpoints of Jobs that finished (nothing retries them); how many."""
        if not job_uids:
            return 0
        c = RUN_CHECKPOINTS
        with self._begin(f"remove the checkpoints of {len(job_uids)} finished Jobs") as conn:
            return conn.execute(sa.delete(c).where(c.c.job_uid.in_(list(job_uids)))).rowcount

    def purge_checkpoints(self, older_than: timedelta, *, limit: int = 500) -> int:
        """Remove up to ``limit`` checkpoints not updated for ``older_than`` (Jobs whose end
        was never recorded); how many."""
        c = RUN_CHECKPOINTS
        cutoff = datetime.now(UTC) - older_than
        old = (
            sa.select(c.c.job_uid)
            .where(c.c.updated_at < cutoff)
            .order_by(c.c.updated_at)
            .limit(limit)
            .with_for_update(skip_locked=True)
        )
        with self._begin("purge old checkpoints") as conn:
            return conn.execute(sa.delete(c).where(c.c.job_uid.in_(old))).rowcount
