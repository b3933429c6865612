"""What a notification is: its kinds, the schedule it is about, where it goes (a webhook Secret,
never the URL), the run it reports, and a stored notice as the outbox holds it. Plain values and
pure helpers; the outbox (outbox.py), the bodies (bodies.py) and the notifier (notify.py)
build on them."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from enum import StrEnum
from typing import Any, Literal, cast

from agent_runner.contract import RunOutcome
from nocturne_operator.api.model import AgentScheduleSpec, Notifications
from nocturne_operator.api.money import usd
from nocturne_operator.api.timestamps import rfc3339
from nocturne_operator.storage import clean_text

Format = Literal["slack", "json"]
# Run outputs, errors and messages in a stored notice are cut to this size.
PAYLOAD_TEXT_LIMIT_BYTES = 16 * 1024


class Kind(StrEnum):
    """What a notice is about; the values are ``spec.notifications.events`` entries."""

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

    @classmethod
    def of(cls, schedule: Mapping[str, Any]) -> NoticeSubject:
        """The subject an AgentSchedule object names."""
        meta = schedule["metadata"]
        return cls(meta["namespace"], meta["name"], meta["uid"])


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
        if ref is None or not notifications.events:
            return None
        return cls(
            secret_name=ref.name,
            secret_key=ref.key,
            format=notifications.format,
            cooldown=timedelta(minutes=notifications.cooldown_minutes),
            kinds=frozenset(Kind(kind) for kind in notifications.events),
        )

    @classmethod
    def of(cls, schedule: Mapping[str, Any]) -> Target | None:
        """The AgentSchedule object's target, or None (no notifications asked for, or a spec
        that does not validate: it gets no notices until it does)."""
        try:
            spec = AgentScheduleSpec.model_validate(schedule.get("spec") or {})
        except ValueError:
            return None
        return cls.from_spec(spec.notifications)


@dataclass(frozen=True)
class RunInfo:
    """One finished run (the last attempt of a Job)."""

    job: str
    job_uid: str
    result: RunOutcome  # final
    cost_usd: Decimal
    started_at: datetime
    completed_at: datetime | None
    output: str | None
    error: str | None
    alert: bool
    alert_reason: str | None

    def __post_init__(self) -> None:
        if not isinstance(self.result, RunOutcome) or not self.result.final:
            raise ValueError(f"RunInfo.result: {self.result!r} must be a final RunOutcome")
        if not isinstance(self.cost_usd, Decimal):
            raise TypeError(f"RunInfo.cost_usd: {self.cost_usd!r} must be a Decimal")
        aware("RunInfo.started_at", self.started_at)
        if self.completed_at is not None:
            aware("RunInfo.completed_at", self.completed_at)
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


def utcnow() -> datetime:
    return datetime.now(UTC)


def aware(name: str, value: datetime) -> datetime:
    if not isinstance(value, datetime) or value.utcoffset() is None:
        raise ValueError(f"{name}: {value!r} must be a timezone-aware datetime")
    return value


def _clean(text: str | None) -> str | None:
    """Text JSONB can store (no NUL, no lone surrogates), cut at a character boundary."""
    return clean_text(text, PAYLOAD_TEXT_LIMIT_BYTES)


def first_line(text: str | None, limit: int = 200) -> str:
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


def run_payload(run: RunInfo) -> dict[str, Any]:
    return {
        "job": run.job,
        "result": run.result.display,
        "costUSD": usd(run.cost_usd),
        "startedAt": rfc3339(run.started_at),
        "completedAt": rfc3339(run.completed_at) if run.completed_at else None,
        "output": _clean(run.output),
        "error": _clean(run.error),
        "alertReason": _clean(run.alert_reason),
    }


def make_notice(
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


def run_line(run: RunInfo) -> str:
    took = (
        f" after {_duration((run.completed_at - run.started_at).total_seconds())}"
        if run.completed_at
        else ""
    )
    return f"{took}, cost ${usd(run.cost_usd)}"
