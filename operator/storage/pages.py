"""Reads of run records for the agentruns API: pages of a namespace's (or every namespace's)
runs newest first with a keyset cursor, the history's version, and what changed since a version
(for watches). The rows and their order are ``queries``'; only the selection differs."""

from __future__ import annotations

from collections.abc import Collection
from dataclasses import dataclass
from datetime import datetime, timedelta

import sqlalchemy as sa

from agent_runner.contract import RunOutcome
from nocturne_operator.storage.engine import Repository
from nocturne_operator.storage.queries import ExecutionRecord, _record, execution_columns
from nocturne_operator.storage.schema import EXECUTIONS
from nocturne_operator.storage.values import aware, check_page_limit

__all__ = ["RunFilter", "RunPages"]


@dataclass(frozen=True)
class RunFilter:
    """Which runs a page holds: a namespace (None: all), and optionally a schedule, a Job,
    statuses (any of), a start range [started_after, started_before), and equalities that must
    not hold (``!=`` selectors)."""

    namespace: str | None = None
    schedule: str | None = None
    job: str | None = None
    statuses: Collection[RunOutcome] | None = None
    not_schedules: Collection[str] = ()
    not_jobs: Collection[str] = ()
    not_statuses: Collection[RunOutcome] = ()
    started_after: datetime | None = None
    started_before: datetime | None = None
    run_id: int | None = None

    def where(self) -> list[sa.ColumnElement[bool]]:
        t = EXECUTIONS
        clauses: list[sa.ColumnElement[bool]] = []
        if self.namespace is not None:
            clauses.append(t.c.namespace == self.namespace)
        if self.schedule is not None:
            clauses.append(t.c.schedule_name == self.schedule)
        if self.job is not None:
            clauses.append(t.c.job_name == self.job)
        if self.run_id is not None:
            clauses.append(t.c.id == self.run_id)
        if self.statuses is not None:
            clauses.append(t.c.status.in_([s.value for s in self.statuses]))
        if self.not_schedules:
            clauses.append(t.c.schedule_name.not_in(list(self.not_schedules)))
        if self.not_jobs:
            clauses.append(t.c.job_name.not_in(list(self.not_jobs)))
        if self.not_statuses:
            clauses.append(t.c.status.not_in([s.value for s in self.not_statuses]))
        if self.started_after is not None:
            clauses.append(t.c.started_at >= aware("started_after", self.started_after))
        if self.started_before is not None:
            clauses.append(t.c.started_at < aware("started_before", self.started_before))
        return clauses


class RunPages(Repository):
    """Pages of runs and changes since a version."""

    def run_page(
        self,
        selection: RunFilter,
        *,
        limit: int,
        after: tuple[datetime, int] | None = None,
        include_output: bool = False,
    ) -> tuple[list[ExecutionRecord], bool]:
        """Up to ``limit`` runs matching ``selection``, newest first (started_at, id), after the
        keyset ``after`` (the last run of the previous page); and whether more follow."""
        check_page_limit(limit)
        t = EXECUTIONS
        query = (
            sa.select(*execution_columns(include_output))
            .where(*selection.where())
            .order_by(t.c.started_at.desc(), t.c.id.desc())
            .limit(limit + 1)
        )
        if after is not None:
            started, run_id = after
            query = query.where(
                sa.tuple_(t.c.started_at, t.c.id) < sa.tuple_(aware("after", started), run_id)
            )
        with self._begin("list a page of runs") as conn:
            rows = [_record(row) for row in conn.execute(query)]
        return rows[:limit], len(rows) > limit

    def latest_revision(self, settle: timedelta = timedelta(0)) -> int:
        """The history's version: the largest revision of a run written more than ``settle``
        ago (0 with none). A write still in flight may commit a revision below the largest
        committed one; with ``settle`` longer than any write lasts, a watch from this version
        misses none (it may send again what changed in the last ``settle``)."""
        t = EXECUTIONS
        latest = (
            sa.select(t.c.revision)
            .where(t.c.updated_at < sa.func.now() - settle)
            .order_by(t.c.revision.desc())
            .limit(1)
        )
        with self._begin("read the runs' latest revision") as conn:
            return int(conn.execute(latest).scalar_one_or_none() or 0)

    def changed_since(
        self, revision: int, selection: RunFilter, *, limit: int = 500
    ) -> tuple[list[ExecutionRecord], datetime]:
        """Runs matching ``selection`` written after ``revision``, in revision order (a watch's
        catch-up and its wake-ups), at most ``limit``; and the database's clock (a watcher
        compares it with ``updated_at``: a write still in flight may yet commit a revision
        below the largest seen, so a watcher looks back over the last seconds of writes)."""
        t = EXECUTIONS
        query = (
            sa.select(*execution_columns(False))
            .where(t.c.revision > revision, *selection.where())
            .order_by(t.c.revision)
            .limit(limit)
        )
        with self._begin(f"list runs changed since revision {revision}") as conn:
            rows = [_record(row) for row in conn.execute(query)]
            now = conn.execute(sa.select(sa.func.now())).scalar_one()
        return rows, now
