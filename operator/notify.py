"""Webhook notifications of AgentSchedules: which notices a finished run or a schedule event
produces (subscription, dedupe, cooldown, recovery), the outbox they wait in (PostgreSQL, or
process memory for an operator without a database), and the async loop that POSTs them.

Enqueueing is synchronous and fast (called from kopf handler threads; never HTTP). Delivery is
at least once: a row is claimed with a lease, so a crash mid-POST sends it again once the lease
ends; receivers dedupe on the ``X-Nocturne-Delivery`` header. The webhook URL is a credential
(Slack's are): it is read from its Secret at delivery time and never stored, logged or put into
an error message.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import random
import threading
from collections.abc import Callable, Iterator, Mapping
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass, replace
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from enum import StrEnum
from typing import Any, Literal, Protocol, cast

import httpx
import sqlalchemy as sa
from sqlalchemy.dialects import postgresql as pg

from agent_runner.history import HistoryError, HistoryUnavailableError, clean_text, redact_url
from nocturne_operator import metrics
from nocturne_operator.api import Notifications
from nocturne_operator.money import usd

__all__ = [
    "BODY_VERSION",
    "FAILURE_KINDS",
    "NOTIFICATIONS",
    "PAYLOAD_TEXT_LIMIT_BYTES",
    "Delivery",
    "Format",
    "Kind",
    "MemoryStore",
    "Notice",
    "NoticeSubject",
    "Notifier",
    "PostgresStore",
    "RunInfo",
    "RunResult",
    "ScheduleView",
    "Status",
    "Store",
    "Target",
    "json_body",
    "render_body",
    "retry_delay",
    "slack_body",
]

log = logging.getLogger(__name__)

Format = Literal["slack", "json"]
RunResult = Literal["Succeeded", "Failed", "BudgetExceeded", "TimedOut", "Cancelled"]
Result = Literal["sent", "failed", "suppressed", "retried"]

BODY_VERSION = "nocturne.dev/v1"
USER_AGENT = "nocturne-operator"
PAYLOAD_TEXT_LIMIT_BYTES = 16 * 1024
"""A notice keeps at most this much of a run's output and error (UTF-8 bytes)."""
SLACK_HEADER_LIMIT = 150
SLACK_TEXT_LIMIT = 3000
_SUMMARY_LIMIT = 300
_RESPONSE_SNIPPET = 200
# pg_advisory_xact_lock(int4, int4) key space (disjoint from the one-bigint form): "noti".
_LOCK_CLASS = 0x6E6F7469
# MemoryStore keeps this many rows per schedule (the newest row of each kind always stays).
_MEMORY_ROWS_PER_SCHEDULE = 256


class Kind(StrEnum):
    """What a notice is about; the values are ``spec.notifications.on`` entries."""

    SUCCEEDED = "Succeeded"
    FAILED = "Failed"
    BUDGET_EXCEEDED = "BudgetExceeded"
    AUTO_PAUSED = "AutoPaused"
    RECOVERED = "Recovered"
    SILENT_STOP = "SilentStop"
    ALERT = "Alert"


FAILURE_KINDS = frozenset({Kind.FAILED, Kind.AUTO_PAUSED, Kind.SILENT_STOP})
"""The kinds a Recovered notice resolves."""
_EVENT_KINDS = frozenset({Kind.AUTO_PAUSED, Kind.BUDGET_EXCEEDED, Kind.SILENT_STOP})
# Never held back: a Succeeded notice carries content (the digest) and is opted into per run;
# an auto-pause or a reached budget cannot flap (each needs a human or a new month to end).
_NO_COOLDOWN = frozenset({Kind.SUCCEEDED, Kind.AUTO_PAUSED, Kind.BUDGET_EXCEEDED})
_RUN_RESULTS = ("Succeeded", "Failed", "BudgetExceeded", "TimedOut", "Cancelled")
_FAILED_RESULTS = {"Failed": "failed", "BudgetExceeded": "hit its budget", "TimedOut": "timed out"}


class Status(StrEnum):
    """Where a notice is: waiting (or between retries), delivered, given up, or held back by
    the cooldown (never delivered)."""

    PENDING = "PENDING"
    SENT = "SENT"
    FAILED = "FAILED"
    SUPPRESSED = "SUPPRESSED"


# --------------------------------------------------------------------------------------------
# Values passed in and out


@dataclass(frozen=True)
class NoticeSubject:
    """The AgentSchedule a notice is about."""

    namespace: str
    name: str
    uid: str


@dataclass(frozen=True)
class Target:
    """Where and when a schedule wants notices, from its ``spec.notifications``."""

    secret_name: str
    secret_key: str
    format: Format
    cooldown: timedelta
    kinds: frozenset[Kind]

    @classmethod
    def from_spec(cls, notifications: Notifications) -> Target | None:
        """The schedule's target, or None when it names no webhook Secret or no kinds."""
        ref = notifications.webhook_secret_ref
        if ref is None or not notifications.on:
            return None
        return cls(
            secret_name=ref.name,
            secret_key=ref.key,
            format=notifications.format,
            cooldown=timedelta(minutes=notifications.cooldown_minutes),
            kinds=frozenset(Kind(kind) for kind in notifications.on),
        )


@dataclass(frozen=True)
class RunInfo:
    """One finished run (the last attempt of a Job)."""

    job: str
    job_uid: str
    result: str  # RunResult
    cost_usd: Decimal
    started_at: datetime
    completed_at: datetime | None
    output: str | None
    error: str | None
    alert: bool
    alert_reason: str | None

    def __post_init__(self) -> None:
        if self.result not in _RUN_RESULTS:
            raise ValueError(f"RunInfo.result: {self.result!r} must be one of {_RUN_RESULTS}")
        if not isinstance(self.cost_usd, Decimal):
            raise TypeError(f"RunInfo.cost_usd: {self.cost_usd!r} must be a Decimal")
        _aware("RunInfo.started_at", self.started_at)
        if self.completed_at is not None:
            _aware("RunInfo.completed_at", self.completed_at)
        if not self.job_uid:
            raise ValueError("RunInfo.job_uid must not be empty (it is the dedupe key)")


@dataclass(frozen=True)
class Notice:
    """A notice to store: what it says and where it goes (the URL's Secret, not the URL)."""

    subject: NoticeSubject
    kind: Kind
    dedupe_key: str
    resolved: bool
    created_at: datetime
    secret_name: str
    secret_key: str
    format: Format
    payload: Mapping[str, Any]


@dataclass(frozen=True)
class Delivery:
    """A stored notice (one row of ``notifications``)."""

    id: int
    namespace: str
    schedule_name: str
    schedule_uid: str
    kind: Kind
    dedupe_key: str
    resolved: bool
    status: Status
    attempts: int
    next_attempt_at: datetime
    created_at: datetime
    sent_at: datetime | None
    last_error: str | None
    secret_name: str
    secret_key: str
    format: Format
    payload: Mapping[str, Any]

    @property
    def message(self) -> str:
        """The notice's one-paragraph message."""
        return str(self.payload.get("message", ""))

    @property
    def run(self) -> Mapping[str, Any] | None:
        """The run the notice is about (body form: camelCase keys, cost as a string)."""
        run = self.payload.get("run")
        return cast(Mapping[str, Any], run) if isinstance(run, Mapping) else None


# --------------------------------------------------------------------------------------------
# Small helpers


def _utcnow() -> datetime:
    return datetime.now(UTC)


def _aware(name: str, value: datetime) -> datetime:
    if not isinstance(value, datetime) or value.utcoffset() is None:
        raise ValueError(f"{name}: {value!r} must be a timezone-aware datetime")
    return value


def _rfc3339(value: datetime) -> str:
    return value.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _clean(text: str | None) -> str | None:
    """Text JSONB can store (no NUL, no lone surrogates), cut at a character boundary."""
    return clean_text(text, PAYLOAD_TEXT_LIMIT_BYTES)


def _first_line(text: str | None, limit: int = 200) -> str:
    line = next((part.strip() for part in (text or "").splitlines() if part.strip()), "")
    return line if len(line) <= limit else line[: limit - 1] + "…"


def _duration(seconds: float) -> str:
    total = max(0, round(seconds))
    hours, rest = divmod(total, 3600)
    minutes, secs = divmod(rest, 60)
    if hours:
        return f"{hours}h {minutes}m"
    if minutes:
        return f"{minutes}m {secs}s"
    return f"{secs}s"


def _run_payload(run: RunInfo) -> dict[str, Any]:
    return {
        "job": run.job,
        "result": run.result,
        "costUSD": usd(run.cost_usd),
        "startedAt": _rfc3339(run.started_at),
        "completedAt": _rfc3339(run.completed_at) if run.completed_at else None,
        "output": _clean(run.output),
        "error": _clean(run.error),
        "alertReason": _clean(run.alert_reason),
    }


def _notice(
    subject: NoticeSubject,
    target: Target,
    kind: Kind,
    key: str,
    message: str,
    *,
    run: Mapping[str, Any] | None,
    now: datetime,
    resolved: bool,
) -> Notice:
    return Notice(
        subject=subject,
        kind=kind,
        dedupe_key=key,
        resolved=resolved,
        created_at=now,
        secret_name=target.secret_name,
        secret_key=target.secret_key,
        format=target.format,
        payload={"message": _clean(message), "run": dict(run) if run else None},
    )


def _run_line(run: RunInfo) -> str:
    took = (
        f" after {_duration((run.completed_at - run.started_at).total_seconds())}"
        if run.completed_at
        else ""
    )
    return f"{took}, cost ${usd(run.cost_usd)}"


def retry_delay(
    attempts: int,
    *,
    base: timedelta,
    cap: timedelta,
    retry_after: float | None = None,
    jitter: float = 0.0,
) -> timedelta:
    """Wait before the next try after ``attempts`` tries: ``base * 2**(attempts-1)`` capped at
    ``cap``, shortened by up to ``jitter`` (a fraction, 0..1), never shorter than a server's
    ``Retry-After`` seconds (themselves capped at ``cap``)."""
    delay = base
    for _ in range(max(attempts - 1, 0)):
        if delay >= cap:
            break
        delay *= 2
    delay = min(delay, cap)
    if jitter:
        delay *= 1 - random.uniform(0, min(max(jitter, 0.0), 1.0))  # noqa: S311 - not crypto
    if retry_after is not None and retry_after > 0:
        delay = max(delay, min(timedelta(seconds=retry_after), cap))
    return delay


# --------------------------------------------------------------------------------------------
# Bodies (pure)

_TITLES: dict[Kind, tuple[str, str]] = {
    Kind.SUCCEEDED: ("✅", "Succeeded"),
    Kind.FAILED: ("❌", "Failed"),
    Kind.BUDGET_EXCEEDED: ("💸", "Budget exceeded"),
    Kind.AUTO_PAUSED: ("⏸️", "Auto-paused"),
    Kind.RECOVERED: ("✅", "Recovered"),
    Kind.SILENT_STOP: ("🔕", "Silent stop"),
    Kind.ALERT: ("🚨", "Alert"),
}


def _title(delivery: Delivery) -> tuple[str, str]:
    if delivery.kind is Kind.ALERT and delivery.resolved:
        return "✅", "Alert cleared"
    return _TITLES[delivery.kind]


def _summary(delivery: Delivery) -> str:
    """One line: what happened to which schedule."""
    _, title = _title(delivery)
    line = (
        f"{title}: {delivery.namespace}/{delivery.schedule_name}: "
        f"{_first_line(delivery.message, _SUMMARY_LIMIT)}"
    )
    return line if len(line) <= _SUMMARY_LIMIT else line[: _SUMMARY_LIMIT - 1] + "…"


def json_body(delivery: Delivery) -> dict[str, Any]:
    """The ``json`` format: a versioned document with a one-line ``text`` for chat tools."""
    run = delivery.run
    return {
        "version": BODY_VERSION,
        "id": delivery.id,
        "kind": delivery.kind.value,
        "state": "resolved" if delivery.resolved else "firing",
        "schedule": {
            "namespace": delivery.namespace,
            "name": delivery.schedule_name,
            "uid": delivery.schedule_uid,
        },
        "message": delivery.message,
        "at": _rfc3339(delivery.created_at),
        "run": dict(run) if run is not None else None,
        "text": _summary(delivery),
    }


def _slack_escape(text: str) -> str:
    # Slack's mrkdwn needs exactly these three escaped; everything else is literal.
    return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


def _fit(escaped: str, limit: int, marker: str) -> str:
    """``escaped`` cut to ``limit`` characters with ``marker``, never inside an entity."""
    if len(escaped) <= limit:
        return escaped
    cut = escaped[: max(0, limit - len(marker))]
    amp = cut.rfind("&", max(0, len(cut) - 5))
    if amp != -1 and ";" not in cut[amp:]:
        cut = cut[:amp]
    return cut + marker


def _section(text: str) -> dict[str, Any]:
    return {"type": "section", "text": {"type": "mrkdwn", "text": text}}


def _labelled(label: str, text: str, marker: str, *, code: bool = False) -> dict[str, Any]:
    """A section ``*label*`` + text, the text cut so the whole stays within Slack's limit."""
    head = f"*{label}*\n"
    fence = "```" if code else ""
    room = SLACK_TEXT_LIMIT - len(head) - 2 * len(fence)
    return _section(f"{head}{fence}{_fit(_slack_escape(text), room, marker)}{fence}")


def slack_body(delivery: Delivery) -> dict[str, Any]:
    """The ``slack`` format: an incoming-webhook message (fallback ``text`` and blocks).

    Header ≤150 characters, each section ≤3000; agent text is escaped (&, <, >) and long output
    is cut with a marker pointing at ``nocturne history``.
    """
    emoji, title = _title(delivery)
    run = delivery.run
    where = f"nocturne history {delivery.schedule_name} -n {delivery.namespace}"
    header = f"{emoji} {title}: {delivery.schedule_name}"
    if len(header) > SLACK_HEADER_LIMIT:
        header = header[: SLACK_HEADER_LIMIT - 1] + "…"
    blocks: list[dict[str, Any]] = [
        {"type": "header", "text": {"type": "plain_text", "text": header, "emoji": True}},
        _section(_fit(_slack_escape(delivery.message), SLACK_TEXT_LIMIT, "…")),
    ]
    facts = [f"Namespace `{_slack_escape(delivery.namespace)}`"]
    if run is not None:
        facts.append(f"Job `{_slack_escape(str(run.get('job', '')))}`")
        facts.append(f"Result *{_slack_escape(str(run.get('result', '')))}*")
        facts.append(f"Cost ${_slack_escape(str(run.get('costUSD', '')))}")
    blocks.append(
        {
            "type": "context",
            "elements": [{"type": "mrkdwn", "text": _fit(" · ".join(facts), 3000, "…")}],
        }
    )
    if run is not None and not delivery.resolved:
        error, output, reason = run.get("error"), run.get("output"), run.get("alertReason")
        if delivery.kind is Kind.FAILED and error:
            marker = f"… (truncated, full error: {where})"
            blocks.append(_labelled("Error", str(error), marker, code=True))
        if delivery.kind is Kind.ALERT and reason:
            blocks.append(_labelled("Alert reason", str(reason), "…"))
        if delivery.kind in (Kind.SUCCEEDED, Kind.ALERT) and output:
            marker = f"\n… (truncated, full output: {where})"
            blocks.append(_labelled("Output", str(output), marker))
    return {"text": _slack_escape(_summary(delivery)), "blocks": blocks}


def render_body(delivery: Delivery) -> dict[str, Any]:
    """The body in the notice's format."""
    return slack_body(delivery) if delivery.format == "slack" else json_body(delivery)


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


class PostgresStore:
    """The outbox in PostgreSQL (table ``notifications``, migration 0002): survives restarts."""

    def __init__(self, engine: sa.Engine) -> None:
        self.engine = engine

    @contextmanager
    def _begin(self, operation: str) -> Iterator[sa.Connection]:
        try:
            with self.engine.begin() as conn:
                yield conn
        except (sa.exc.OperationalError, sa.exc.InterfaceError, sa.exc.TimeoutError) as exc:
            cause = str(getattr(exc, "orig", None) or exc).strip()
            raise HistoryUnavailableError(
                f"{operation}: database {redact_url(self.engine.url)} unavailable: {cause}"
            ) from exc
        except sa.exc.DBAPIError as exc:
            raise HistoryError(f"{operation} failed: {str(exc.orig or exc).strip()}") from exc

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
            return conn.execute(statement).rowcount


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


# --------------------------------------------------------------------------------------------
# The webhook URL stays secret


class _HideWebhookPaths(logging.Filter):
    """httpx logs each request's URL at INFO; webhook URLs are credentials (the path is the
    token), so only scheme and host reach the log."""

    def filter(self, record: logging.LogRecord) -> bool:
        if isinstance(record.args, tuple) and any(isinstance(a, httpx.URL) for a in record.args):
            record.args = tuple(
                f"{a.scheme}://{a.host}/***" if isinstance(a, httpx.URL) else a for a in record.args
            )
        return True


_URL_FILTER = _HideWebhookPaths()


def _hide_urls_in_httpx_logs() -> None:
    logger = logging.getLogger("httpx")
    if _URL_FILTER not in logger.filters:
        logger.addFilter(_URL_FILTER)


def _webhook_url(raw: str) -> httpx.URL | None:
    """The URL if ``raw`` (a Secret's value, maybe with a trailing newline) is http(s)."""
    try:
        url = httpx.URL(raw.strip())
    except (httpx.InvalidURL, TypeError, ValueError):
        return None
    if url.scheme not in ("http", "https") or not url.host:
        return None
    return url


def _scrub(text: str, raw: str, url: httpx.URL | None) -> str:
    """``text`` with the URL and its path and query (the secret parts) replaced."""
    secrets = {raw, raw.strip()}
    if url is not None:
        secrets |= {str(url), url.path, url.query.decode("ascii", "replace")}
        secrets.add(url.raw_path.decode("ascii", "replace"))
    for secret in sorted((s for s in secrets if len(s) > 1), key=len, reverse=True):
        text = text.replace(secret, "***")
    return text


# --------------------------------------------------------------------------------------------
# The notifier


@dataclass(frozen=True)
class _Try:
    """The outcome of one delivery try."""

    result: Result
    detail: str
    retry_after: float | None = None


class Notifier:
    """Decides and stores notices (sync, from handler threads) and delivers them (async loop).

    ``resolve_url(namespace, secret_name, key)`` returns the webhook URL and raises LookupError
    with a clear message when the Secret or key is missing; it runs in a worker thread.
    ``on_outcome(delivery, result, detail)`` hears every "sent", "failed", "suppressed" and
    "retried" result (``detail`` never holds the URL); it runs in a handler or worker thread,
    never on the event loop, and its exceptions are logged and ignored.
    """

    def __init__(
        self,
        store: Store,
        resolve_url: Callable[[str, str, str], str],
        on_outcome: Callable[[Delivery, str, str], None],
        *,
        max_attempts: int = 6,
        retry_base: timedelta = timedelta(seconds=10),
        retry_cap: timedelta = timedelta(minutes=10),
        timeout: float = 10.0,
        clock: Callable[[], datetime] = _utcnow,
        jitter: float = 0.1,
        batch: int = 50,
        concurrency: int = 8,
        retention: timedelta = timedelta(days=30),
    ) -> None:
        if max_attempts < 1:
            raise ValueError(f"max_attempts: {max_attempts} must be at least 1")
        if retry_base <= timedelta(0) or retry_cap < retry_base:
            raise ValueError(
                f"retry_base {retry_base} must be positive and at most retry_cap {retry_cap}"
            )
        if timeout <= 0 or batch < 1 or concurrency < 1:
            raise ValueError("timeout, batch and concurrency must be positive")
        self.store = store
        self._resolve_url = resolve_url
        self._on_outcome = on_outcome
        self.max_attempts = max_attempts
        self.retry_base = retry_base
        self.retry_cap = retry_cap
        self.timeout = timeout
        self._clock = clock
        self._jitter = jitter
        self._batch = batch
        self._concurrency = concurrency
        self.retention = retention
        self._purged_at: datetime | None = None
        # A claimed row is someone's for this long; then a crashed delivery is tried again.
        self.lease = timedelta(seconds=2 * timeout + 60)
        self._client: httpx.AsyncClient | None = None
        self._client_loop: asyncio.AbstractEventLoop | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._wake: asyncio.Event | None = None
        _hide_urls_in_httpx_logs()

    # ---- enqueue (sync, no HTTP) -------------------------------------------------------------

    def run_finished(
        self, subject: NoticeSubject, target: Target, run: RunInfo, *, now: datetime
    ) -> list[Kind]:
        """Store the notices one finished run produces; returns the kinds queued for delivery.

        Succeeded -> Succeeded (+ Recovered after a failure notice, + Alert all-clear after a
        firing alert); Failed/BudgetExceeded/TimedOut -> Failed; a flagged run -> Alert;
        Cancelled -> nothing. Idempotent per Job UID.
        """
        _aware("now", now)
        if run.result == "Cancelled":
            return []
        details = _run_payload(run)

        def notice(kind: Kind, key: str, message: str, *, resolved: bool = False) -> Notice:
            return _notice(
                subject, target, kind, key, message, run=details, now=now, resolved=resolved
            )

        def plan(view: ScheduleView) -> list[Delivery]:
            stored: list[Delivery | None] = []
            if run.result == "Succeeded":
                message = f"Run {run.job} succeeded{_run_line(run)}."
                stored.append(self._put(view, target, notice(Kind.SUCCEEDED, run.job_uid, message)))
                # Only notices from before this run ended count: a run replayed after an
                # operator restart must not "recover" from a failure that came after it.
                ended = run.completed_at or run.started_at
                failure = view.latest(
                    FAILURE_KINDS | {Kind.RECOVERED}, include_suppressed=False, before=ended
                )
                if failure is not None and failure[0] in FAILURE_KINDS:
                    message = (
                        f"Run {run.job} succeeded{_run_line(run)}; the schedule has recovered "
                        f"from {failure[0].value}."
                    )
                    resolved = notice(
                        Kind.RECOVERED, f"{run.job_uid}:resolved", message, resolved=True
                    )
                    stored.append(self._put(view, target, resolved))
                alert = view.latest(frozenset({Kind.ALERT}), include_suppressed=True, before=ended)
                if not run.alert and alert is not None and not alert[1]:
                    message = f"Run {run.job} raised no alert; the earlier alert is cleared."
                    cleared = notice(Kind.ALERT, f"{run.job_uid}:resolved", message, resolved=True)
                    stored.append(self._put(view, target, cleared))
            else:
                phrase = _FAILED_RESULTS[run.result]
                message = f"Run {run.job} {phrase} ({run.result}){_run_line(run)}."
                if run.error:
                    message += f" Error: {_first_line(run.error)}"
                stored.append(self._put(view, target, notice(Kind.FAILED, run.job_uid, message)))
            if run.alert:
                reason = _first_line(run.alert_reason) or "no reason given"
                message = f"Run {run.job} raised an alert: {reason}"
                stored.append(self._put(view, target, notice(Kind.ALERT, run.job_uid, message)))
            return [d for d in stored if d is not None]

        stored = self._enqueue(subject, plan)
        return [d.kind for d in stored if d.status is Status.PENDING]

    def schedule_event(
        self,
        subject: NoticeSubject,
        target: Target,
        kind: Kind,
        *,
        key: str,
        message: str,
        now: datetime,
    ) -> bool:
        """Store an AutoPaused, BudgetExceeded or SilentStop notice, deduped by ``key`` (e.g.
        the pausedAt stamp); True when it was queued for delivery (not unsubscribed, a
        repeat, or held back by the cooldown)."""
        _aware("now", now)
        if kind not in _EVENT_KINDS:
            raise ValueError(
                f"kind {kind!r}: schedule events are {sorted(k.value for k in _EVENT_KINDS)}; "
                "run notices come from run_finished()"
            )
        if not key:
            raise ValueError("key must not be empty (it is the dedupe key)")
        notice = _notice(subject, target, kind, key, message, run=None, now=now, resolved=False)
        stored = self._enqueue(
            subject, lambda view: [d for d in [self._put(view, target, notice)] if d]
        )
        return any(d.status is Status.PENDING for d in stored)

    @staticmethod
    def _put(view: ScheduleView, target: Target, notice: Notice) -> Delivery | None:
        """Store one notice under the rules: subscribed, not a repeat, cooldown for firing."""
        if notice.kind not in target.kinds or view.exists(notice.kind, notice.dedupe_key):
            return None
        cooling = (
            not notice.resolved
            and notice.kind not in _NO_COOLDOWN
            and target.cooldown > timedelta(0)
            and view.cooling(notice.kind, notice.created_at - target.cooldown)
        )
        return view.insert(notice, Status.SUPPRESSED if cooling else Status.PENDING)

    def _enqueue(
        self, subject: NoticeSubject, plan: Callable[[ScheduleView], list[Delivery]]
    ) -> list[Delivery]:
        with self.store.schedule(subject) as view:
            stored = plan(view)
        for delivery in stored:
            if delivery.status is Status.SUPPRESSED:
                self._report(
                    delivery,
                    "suppressed",
                    f"cooldown: a {delivery.kind.value} notice was queued or sent recently",
                )
        if any(d.status is Status.PENDING for d in stored):
            self.wake()
        return stored

    # ---- delivery (async) --------------------------------------------------------------------

    def _report(self, delivery: Delivery, result: Result, detail: str) -> None:
        metrics.NOTIFICATIONS.labels(delivery.kind.value, result).inc()
        try:
            self._on_outcome(delivery, result, detail)
        except Exception:
            log.exception("on_outcome failed for notification %s", delivery.id)

    def _http_client(self) -> httpx.AsyncClient:
        loop = asyncio.get_running_loop()
        if self._client is None or self._client_loop is not loop:
            # A client's connections belong to the loop that opened them.
            self._client = httpx.AsyncClient(
                timeout=httpx.Timeout(self.timeout),
                follow_redirects=False,
                headers={"User-Agent": USER_AGENT},
            )
            self._client_loop = loop
        return self._client

    async def aclose(self) -> None:
        """Close the HTTP client (run() does this when cancelled)."""
        client, self._client, self._client_loop = self._client, None, None
        if client is not None:
            await client.aclose()

    async def deliver_due(self) -> int:
        """One delivery pass: claim the due notices, POST them, record each outcome; returns
        how many were attempted. Raises HistoryError when the store is unreachable."""
        now = self._clock()
        due = await asyncio.to_thread(
            self.store.claim_due, now, lease=self.lease, limit=self._batch
        )
        if not due:
            return 0
        client = self._http_client()
        gate = asyncio.Semaphore(self._concurrency)

        async def one(delivery: Delivery) -> None:
            async with gate:
                await self._deliver(client, delivery)

        await asyncio.gather(*(one(d) for d in due))
        return len(due)

    async def _deliver(self, client: httpx.AsyncClient, delivery: Delivery) -> None:
        try:
            outcome = await self._try(client, delivery)
        except Exception as exc:  # a bug must not stop the other deliveries
            log.exception("notification %s: delivery try failed", delivery.id)
            outcome = _Try("retried", f"internal error: {type(exc).__name__}")
        now = self._clock()
        status, next_at, sent_at = Status.PENDING, now, None
        detail = outcome.detail
        result = outcome.result
        if result == "sent":
            status, sent_at = Status.SENT, now
        elif result == "retried" and delivery.attempts >= self.max_attempts:
            status, result = Status.FAILED, "failed"
            detail = f"gave up after {delivery.attempts} attempts: {detail}"
        elif result == "retried":
            delay = retry_delay(
                delivery.attempts,
                base=self.retry_base,
                cap=self.retry_cap,
                retry_after=outcome.retry_after,
                jitter=self._jitter,
            )
            next_at = now + delay
            detail = (
                f"{detail}; attempt {delivery.attempts} of {self.max_attempts}, "
                f"next in {delay.total_seconds():.3g}s"
            )
        else:
            status = Status.FAILED
        try:
            done = await asyncio.to_thread(
                self.store.finish,
                delivery.id,
                status=status,
                next_attempt_at=next_at,
                sent_at=sent_at,
                last_error=None if status is Status.SENT else detail,
            )
        except Exception as exc:
            # The lease runs out and the notice is tried again: at least once, maybe twice.
            log.warning(
                "notification %s (%s) %s, but recording it failed: %s",
                delivery.id,
                delivery.kind.value,
                result,
                exc,
            )
            return
        where = f"{delivery.namespace}/{delivery.schedule_name}"
        level = logging.INFO if result == "sent" else logging.WARNING
        log.log(
            level,
            "notification %s (%s of %s via Secret %s key %s) %s: %s",
            delivery.id,
            delivery.kind.value,
            where,
            delivery.secret_name,
            delivery.secret_key,
            result,
            detail,
        )
        await asyncio.to_thread(self._report, done or delivery, result, detail)

    async def _try(self, client: httpx.AsyncClient, delivery: Delivery) -> _Try:
        secret = f"Secret {delivery.namespace}/{delivery.secret_name} key {delivery.secret_key}"
        try:
            raw = await asyncio.to_thread(
                self._resolve_url, delivery.namespace, delivery.secret_name, delivery.secret_key
            )
        except LookupError as exc:
            return _Try("retried", f"webhook URL not found: {exc}")
        except Exception as exc:
            return _Try("retried", f"reading {secret}: {type(exc).__name__}: {exc}"[:500])
        url = _webhook_url(raw) if isinstance(raw, str) else None
        if url is None:
            return _Try("failed", f"{secret} does not hold an http(s) URL")
        return await self._post(client, delivery, raw, url)

    async def _post(
        self, client: httpx.AsyncClient, delivery: Delivery, raw: str, url: httpx.URL
    ) -> _Try:
        body = json.dumps(render_body(delivery), ensure_ascii=False, separators=(",", ":"))
        headers = {
            "Content-Type": "application/json",
            "User-Agent": USER_AGENT,
            "X-Nocturne-Delivery": str(delivery.id),
            "X-Nocturne-Event": delivery.kind.value,
        }
        try:
            async with asyncio.timeout(self.timeout):
                request = client.build_request("POST", url, content=body.encode(), headers=headers)
                response = await client.send(request, stream=True)
                try:
                    said = b""
                    async for chunk in response.aiter_bytes():
                        said += chunk
                        if len(said) >= _RESPONSE_SNIPPET:
                            break
                finally:
                    await response.aclose()
        except TimeoutError:
            return _Try("retried", f"no answer within {self.timeout:g}s")
        except httpx.TransportError as exc:
            text = _scrub(str(exc), raw, url) or "no details"
            return _Try("retried", f"{type(exc).__name__}: {text}"[:500])
        except (httpx.HTTPError, httpx.InvalidURL) as exc:
            text = _scrub(str(exc), raw, url)
            return _Try("failed", f"{type(exc).__name__}: {text}"[:500])
        text = _scrub(said[:_RESPONSE_SNIPPET].decode("utf-8", "replace").strip(), raw, url)
        return _answer(
            response.status_code,
            response.reason_phrase,
            text,
            _retry_after(response.headers.get("Retry-After")),
        )

    # ---- the loop ----------------------------------------------------------------------------

    async def purge_old(self) -> int:
        """At most hourly: drop finished notices older than the retention (the outbox is not
        an archive; a failure notice older than that is not "recovered" from any more)."""
        now = self._clock()
        if self._purged_at is not None and now - self._purged_at < timedelta(hours=1):
            return 0
        purged = await asyncio.to_thread(self.store.purge, now - self.retention)
        self._purged_at = now
        if purged:
            log.info("purged %d notifications older than %s", purged, self.retention)
        return purged

    def wake(self) -> None:
        """Start a delivery pass now (thread-safe; a no-op before run() started)."""
        loop, event = self._loop, self._wake
        if loop is None or event is None or loop.is_closed():
            return
        with contextlib.suppress(RuntimeError):  # the loop closed meanwhile
            loop.call_soon_threadsafe(event.set)

    async def run(self, wake: asyncio.Event, idle: float = 5.0) -> None:
        """Deliver forever: a pass, then wait for ``wake`` or ``idle`` seconds. Errors (e.g.
        the database down) are logged and the loop backs off up to a minute; only
        cancellation ends it."""
        self._loop = asyncio.get_running_loop()
        self._wake = wake
        failures = 0
        try:
            while True:
                wake.clear()
                attempted = 0
                try:
                    attempted = await self.deliver_due()
                    await self.purge_old()
                    failures = 0
                except HistoryError as exc:
                    failures += 1
                    log.warning("notification delivery paused: %s", exc)
                except Exception:
                    failures += 1
                    log.exception("notification delivery pass failed")
                if attempted >= self._batch:
                    continue  # more may be due
                pause = min(idle * 2**failures, max(idle, 60.0)) if failures else idle
                try:
                    async with asyncio.timeout(pause):
                        await wake.wait()
                except TimeoutError:
                    pass
        finally:
            self._loop = None
            self._wake = None
            await self.aclose()


def _answer(code: int, reason: str, said: str, retry_after: float | None) -> _Try:
    """What a webhook's HTTP answer means: 2xx sent; 408, 425, 429 and 5xx worth a retry;
    anything else (other 4xx, a redirect) final."""
    status = f"HTTP {code} {reason}".strip() + (f": {said}" if said else "")
    if 200 <= code < 300:
        return _Try("sent", f"HTTP {code}")
    if code in (408, 425, 429) or code >= 500:
        return _Try("retried", status, retry_after)
    if 300 <= code < 400:
        return _Try("failed", f"{status} (redirects are not followed)")
    return _Try("failed", status)


def _retry_after(value: str | None) -> float | None:
    """Seconds of a numeric Retry-After header (the HTTP-date form is ignored)."""
    if value is None or not value.strip().isdigit():
        return None
    return float(value.strip())
