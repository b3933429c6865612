"""The notifications outbox: notices wait here until delivered. PostgreSQL (table
``notifications``, migration 0002) survives restarts; process memory serves an operator without a
database. Both apply the same rules inside a per-schedule lock, so two handler threads cannot both
pass a cooldown check."""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager
from dataclasses import replace
from datetime import datetime, timedelta
from typing import Any, Protocol

import sqlalchemy as sa
from sqlalchemy.dialects import postgresql as pg

from nocturne_operator.notifications.notices import Delivery, Kind, Notice, NoticeSubject, Status
from nocturne_operator.storage.engine import Repository

# pg_advisory_xact_lock class of the per-schedule lock ("noti").
_LOCK_CLASS = 0x6E6F7469
# MemoryStore keeps this many rows per schedule (the newest row of each kind always stays).
_MEMORY_ROWS_PER_SCHEDULE = 256


# --------------------------------------------------------------------------------------------
# Stores


class ScheduleView(Protocol):
    """One schedule's notices inside a store transaction that holds the schedule's lock."""

    def exists(self, kind: Kind, dedupe_key: str) -> bool:
        """A notice with this kind and key was stored before (any status)."""
        ...

    def cooling(self, kind: Kind, since: datetime) -> bool:
        """A firing PENDING or SENT notice of ``kind`` was created after ``since``."""
        ...

    def latest(
        self, kinds: frozenset[Kind], *, include_suppressed: bool, before: datetime
    ) -> tuple[Kind, bool] | None:
        """(kind, resolved) of the newest notice among ``kinds`` created before ``before``,
        or None."""
        ...

    def insert(self, notice: Notice, status: Status) -> Delivery | None:
        """Store the notice; None if its (kind, dedupe key) exists already."""
        ...


class Store(Protocol):
    """The outbox: PostgresStore, or MemoryStore without a database."""

    def schedule(self, subject: NoticeSubject) -> AbstractContextManager[ScheduleView]:
        """A transaction holding the schedule's lock: decisions in it do not race."""
        ...

    def claim_due(self, now: datetime, *, lease: timedelta, limit: int) -> list[Delivery]:
        """PENDING notices due at ``now``, oldest first, with ``attempts`` + 1 and
        ``next_attempt_at`` moved to ``now + lease`` (so a crashed delivery is retried later)."""
        ...

    def finish(
        self,
        delivery_id: int,
        *,
        status: Status,
        next_attempt_at: datetime,
        sent_at: datetime | None,
        last_error: str | None,
    ) -> Delivery | None:
        """Record a delivery try; None when the notice is not PENDING (any more)."""
        ...

    def recent(self, namespace: str, name: str, *, limit: int = 50) -> list[Delivery]:
        """The schedule's notices, newest first."""
        ...

    def purge(self, before: datetime) -> int:
        """Delete finished notices (sent, failed, suppressed) created before ``before``;
        returns how many. Waiting ones stay whatever their age."""
        ...


_METADATA = sa.MetaData()
NOTIFICATIONS = sa.Table(
    "notifications",
    _METADATA,
    sa.Column("id", sa.BigInteger, sa.Identity(), nullable=False),
    sa.Column("namespace", sa.Text, nullable=False),
    sa.Column("schedule_name", sa.Text, nullable=False),
    sa.Column("schedule_uid", sa.Text, nullable=False),
    sa.Column("kind", sa.Text, nullable=False),
    sa.Column("dedupe_key", sa.Text, nullable=False),
    sa.Column("resolved", sa.Boolean, server_default=sa.false(), nullable=False),
    sa.Column("status", sa.Text, nullable=False),
    sa.Column("attempts", sa.Integer, server_default=sa.text("0"), nullable=False),
    sa.Column("next_attempt_at", sa.DateTime(timezone=True), nullable=False),
    sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
    sa.Column("sent_at", sa.DateTime(timezone=True), nullable=True),
    sa.Column("last_error", sa.Text, nullable=True),
    sa.Column("secret_name", sa.Text, nullable=False),
    sa.Column("secret_key", sa.Text, nullable=False),
    sa.Column("format", sa.Text, nullable=False),
    sa.Column("payload", pg.JSONB, server_default=sa.text("'{}'::jsonb"), nullable=False),
    sa.PrimaryKeyConstraint("id", name="pk_notifications"),
    # The dedupe key: a repeated enqueue (handler retry, operator restart) changes nothing.
    # Keyed by the schedule's UID: a schedule deleted and created again under the same name
    # starts with a clean slate (no inherited dedupe, cooldown or recovery state).
    sa.UniqueConstraint(
        "schedule_uid", "kind", "dedupe_key", name="uq_notifications_schedule_uid_kind_dedupe_key"
    ),
    sa.CheckConstraint(
        "kind IN (" + ", ".join(f"'{k.value}'" for k in Kind) + ")", name="ck_notifications_kind"
    ),
    sa.CheckConstraint(
        "status IN (" + ", ".join(f"'{s.value}'" for s in Status) + ")",
        name="ck_notifications_status",
    ),
    sa.CheckConstraint("format IN ('slack', 'json')", name="ck_notifications_format"),
    sa.CheckConstraint("attempts >= 0", name="ck_notifications_attempts"),
    sa.CheckConstraint(
        "(status = 'SENT') = (sent_at IS NOT NULL)", name="ck_notifications_sent_at_iff_sent"
    ),
    # The delivery loop's "what is due": tiny, only waiting rows.
    sa.Index(
        "ix_notifications_due", "next_attempt_at", postgresql_where=sa.text("status = 'PENDING'")
    ),
    # Cooldown and "latest notice of these kinds" per schedule.
    sa.Index("ix_notifications_schedule_uid_kind_created", "schedule_uid", "kind", "created_at"),
)
"""The table migration 0002 creates (tests/integration/test_notify.py keeps the two in step)."""


def _delivery(row: sa.Row[Any]) -> Delivery:
    values = dict(row._mapping)
    values["kind"] = Kind(values["kind"])
    values["status"] = Status(values["status"])
    return Delivery(**values)


class _PostgresView:
    def __init__(self, conn: sa.Connection, subject: NoticeSubject) -> None:
        self._conn = conn
        self._mine = NOTIFICATIONS.c.schedule_uid == subject.uid

    def exists(self, kind: Kind, dedupe_key: str) -> bool:
        t = NOTIFICATIONS
        query = sa.select(t.c.id).where(self._mine, t.c.kind == kind, t.c.dedupe_key == dedupe_key)
        return self._conn.execute(query).first() is not None

    def cooling(self, kind: Kind, since: datetime) -> bool:
        t = NOTIFICATIONS
        query = (
            sa.select(t.c.id)
            .where(
                self._mine,
                t.c.kind == kind,
                t.c.created_at > since,
                t.c.resolved.is_(False),
                t.c.status.in_([Status.PENDING, Status.SENT]),
            )
            .limit(1)
        )
        return self._conn.execute(query).first() is not None

    def latest(
        self, kinds: frozenset[Kind], *, include_suppressed: bool, before: datetime
    ) -> tuple[Kind, bool] | None:
        t = NOTIFICATIONS
        query = sa.select(t.c.kind, t.c.resolved).where(
            self._mine, t.c.kind.in_(sorted(kinds)), t.c.created_at < before
        )
        if not include_suppressed:
            query = query.where(t.c.status != Status.SUPPRESSED)
        row = self._conn.execute(
            query.order_by(t.c.created_at.desc(), t.c.id.desc()).limit(1)
        ).first()
        return None if row is None else (Kind(row.kind), bool(row.resolved))

    def insert(self, notice: Notice, status: Status) -> Delivery | None:
        t = NOTIFICATIONS
        statement = (
            pg.insert(t)
            .values(
                namespace=notice.subject.namespace,
                schedule_name=notice.subject.name,
                schedule_uid=notice.subject.uid,
                kind=notice.kind.value,
                dedupe_key=notice.dedupe_key,
                resolved=notice.resolved,
                status=status.value,
                attempts=0,
                next_attempt_at=notice.created_at,
                created_at=notice.created_at,
                secret_name=notice.secret_name,
                secret_key=notice.secret_key,
                format=notice.format,
                payload=dict(notice.payload),
            )
            .on_conflict_do_nothing(constraint="uq_notifications_schedule_uid_kind_dedupe_key")
            .returning(*t.c)
        )
        row = self._conn.execute(statement).first()
        return None if row is None else _delivery(row)


class PostgresStore(Repository):
    """The outbox in PostgreSQL (table ``notifications``, migration 0002): survives restarts.
    Its transactions are the history's (``Repository``): database errors surface as the
    history's errors, so callers handle one family."""

    @contextmanager
    def schedule(self, subject: NoticeSubject) -> Iterator[ScheduleView]:
        """A transaction holding a per-schedule advisory lock (released at commit)."""
        with self._begin(f"notifications of {subject.namespace}/{subject.name}") as conn:
            conn.execute(
                sa.text("SELECT pg_advisory_xact_lock(:cls, hashtext(:key))"),
                {"cls": _LOCK_CLASS, "key": subject.uid},
            )
            yield _PostgresView(conn, subject)

    def claim_due(self, now: datetime, *, lease: timedelta, limit: int) -> list[Delivery]:
        t = NOTIFICATIONS
        due = (
            sa.select(t.c.id)
            .where(t.c.status == Status.PENDING, t.c.next_attempt_at <= now)
            .order_by(t.c.next_attempt_at, t.c.id)
            .limit(limit)
            .with_for_update(skip_locked=True)
        )
        claim = (
            sa.update(t)
            .where(t.c.id.in_(due.scalar_subquery()))
            .values(attempts=t.c.attempts + 1, next_attempt_at=now + lease)
            .returning(*t.c)
        )
        with self._begin("claim due notifications") as conn:
            rows = [_delivery(row) for row in conn.execute(claim)]
        return sorted(rows, key=lambda d: d.id)

    def finish(
        self,
        delivery_id: int,
        *,
        status: Status,
        next_attempt_at: datetime,
        sent_at: datetime | None,
        last_error: str | None,
    ) -> Delivery | None:
        t = NOTIFICATIONS
        statement = (
            sa.update(t)
            .where(t.c.id == delivery_id, t.c.status == Status.PENDING)
            .values(
                status=status.value,
                next_attempt_at=next_attempt_at,
                sent_at=sent_at,
                last_error=last_error,
            )
            .returning(*t.c)
        )
        with self._begin(f"record notification {delivery_id}") as conn:
            row = conn.execute(statement).first()
        return None if row is None else _delivery(row)

    def recent(self, namespace: str, name: str, *, limit: int = 50) -> list[Delivery]:
        t = NOTIFICATIONS
        query = (
            sa.select(*t.c)
            .where(t.c.namespace == namespace, t.c.schedule_name == name)
            .order_by(t.c.created_at.desc(), t.c.id.desc())
            .limit(limit)
        )
        with self._begin(f"notifications of {namespace}/{name}") as conn:
            return [_delivery(row) for row in conn.execute(query)]

    def purge(self, before: datetime) -> int:
        t = NOTIFICATIONS
        statement = sa.delete(t).where(t.c.created_at < before, t.c.status != Status.PENDING)
        with self._begin("purge old notifications") as conn:
            return int(conn.execute(statement).rowcount)


class _MemoryView:
    def __init__(self, rows: list[Delivery], store: MemoryStore) -> None:
        self._rows = rows
        self._store = store

    def exists(self, kind: Kind, dedupe_key: str) -> bool:
        return any(d.kind is kind and d.dedupe_key == dedupe_key for d in self._rows)

    def cooling(self, kind: Kind, since: datetime) -> bool:
        return any(
            d.kind is kind
            and not d.resolved
            and d.status in (Status.PENDING, Status.SENT)
            and d.created_at > since
            for d in self._rows
        )

    def latest(
        self, kinds: frozenset[Kind], *, include_suppressed: bool, before: datetime
    ) -> tuple[Kind, bool] | None:
        rows = [
            d
            for d in self._rows
            if d.kind in kinds
            and d.created_at < before
            and (include_suppressed or d.status is not Status.SUPPRESSED)
        ]
        if not rows:
            return None
        newest = max(rows, key=lambda d: (d.created_at, d.id))
        return newest.kind, newest.resolved

    def insert(self, notice: Notice, status: Status) -> Delivery | None:
        if self.exists(notice.kind, notice.dedupe_key):
            return None
        delivery = Delivery(
            id=self._store._new_id(),
            namespace=notice.subject.namespace,
            schedule_name=notice.subject.name,
            schedule_uid=notice.subject.uid,
            kind=notice.kind,
            dedupe_key=notice.dedupe_key,
            resolved=notice.resolved,
            status=status,
            attempts=0,
            next_attempt_at=notice.created_at,
            created_at=notice.created_at,
            sent_at=None,
            last_error=None,
            secret_name=notice.secret_name,
            secret_key=notice.secret_key,
            format=notice.format,
            # A deep copy through JSON, as PostgreSQL would store it.
            payload=json.loads(json.dumps(dict(notice.payload))),
        )
        self._rows.append(delivery)
        _trim(self._rows)
        return delivery


def _trim(rows: list[Delivery]) -> None:
    """Drop the oldest finished rows past the per-schedule bound, keeping the newest row of
    each kind (the recovery and all-clear rules look at those)."""
    excess = len(rows) - _MEMORY_ROWS_PER_SCHEDULE
    if excess <= 0:
        return
    newest = {d.kind: d.id for d in sorted(rows, key=lambda d: (d.created_at, d.id))}
    drop = [
        d
        for d in sorted(rows, key=lambda d: (d.created_at, d.id))
        if d.status is not Status.PENDING and newest[d.kind] != d.id
    ][:excess]
    for d in drop:
        rows.remove(d)


class MemoryStore:
    """The outbox in process memory, for an operator without a database: same rules as
    PostgresStore, but lost on restart (waiting notices are dropped; dedupe and cooldown
    start afresh, so a notice may repeat). Keeps a bounded number of rows per schedule."""

    def __init__(self) -> None:
        self._lock = threading.RLock()
        self._rows: dict[str, list[Delivery]] = {}  # by schedule UID
        self._last_id = 0

    def _new_id(self) -> int:
        self._last_id += 1
        return self._last_id

    @contextmanager
    def schedule(self, subject: NoticeSubject) -> Iterator[ScheduleView]:
        with self._lock:
            rows = self._rows.setdefault(subject.uid, [])
            # All-or-nothing like a transaction: an exception leaves the rows as they were.
            work = list(rows)
            yield _MemoryView(work, self)
            rows[:] = work

    def _replace(self, delivery: Delivery) -> None:
        rows = self._rows[delivery.schedule_uid]
        rows[:] = [delivery if d.id == delivery.id else d for d in rows]

    def claim_due(self, now: datetime, *, lease: timedelta, limit: int) -> list[Delivery]:
        with self._lock:
            due = sorted(
                (
                    d
                    for rows in self._rows.values()
                    for d in rows
                    if d.status is Status.PENDING and d.next_attempt_at <= now
                ),
                key=lambda d: (d.next_attempt_at, d.id),
            )[:limit]
            claimed = [
                replace(d, attempts=d.attempts + 1, next_attempt_at=now + lease) for d in due
            ]
            for d in claimed:
                self._replace(d)
            return sorted(claimed, key=lambda d: d.id)

    def finish(
        self,
        delivery_id: int,
        *,
        status: Status,
        next_attempt_at: datetime,
        sent_at: datetime | None,
        last_error: str | None,
    ) -> Delivery | None:
        with self._lock:
            for rows in self._rows.values():
                for d in rows:
                    if d.id == delivery_id and d.status is Status.PENDING:
                        done = replace(
                            d,
                            status=status,
                            next_attempt_at=next_attempt_at,
                            sent_at=sent_at,
                            last_error=last_error,
                        )
                        self._replace(done)
                        return done
            return None

    def recent(self, namespace: str, name: str, *, limit: int = 50) -> list[Delivery]:
        with self._lock:
            rows = [
                d
                for uid_rows in self._rows.values()
                for d in uid_rows
                if (d.namespace, d.schedule_name) == (namespace, name)
            ]
        return sorted(rows, key=lambda d: (d.created_at, d.id), reverse=True)[:limit]

    def purge(self, before: datetime) -> int:
        with self._lock:
            purged = 0
            for uid, rows in list(self._rows.items()):
                kept = [d for d in rows if d.status is Status.PENDING or d.created_at >= before]
                purged += len(rows) - len(kept)
                if kept:
                    rows[:] = kept
                else:
                    del self._rows[uid]
            return purged
