"""The audit trail of a schedule's lifecycle (``schedule_events``): what happened to it, when,
why and by whom -- appended by the operator, read by the CLI."""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import sqlalchemy as sa
from sqlalchemy.dialects import postgresql as pg

from agent_runner.contract import json_document
from nocturne_operator.storage.engine import Repository
from nocturne_operator.storage.schema import (
    EVENTS,
    ONCE_PER_SCHEDULE,
    ONCE_PER_SCHEDULE_SQL,
    EventKind,
)
from nocturne_operator.storage.values import ERROR_LIMIT_BYTES, aware, check_page_limit, clean_text

__all__ = ["AuditTrail", "EventRecord"]

_EVENT_KIND_RE = re.compile(r"^[a-z][a-z0-9_]{0,62}$")


@dataclass(frozen=True)
class EventRecord:
    """One row of ``schedule_events``."""

    id: int
    namespace: str
    schedule_name: str
    schedule_uid: str | None
    kind: str
    reason: str | None
    actor: str | None
    at: datetime
    details: dict[str, Any] = field(default_factory=dict)


class AuditTrail(Repository):
    """Appends to and reads of ``schedule_events``."""

    def record_event(
        self,
        namespace: str,
        schedule_name: str,
        kind: EventKind | str,
        *,
        reason: str | None = None,
        actor: str | None = None,
        schedule_uid: str | None = None,
        details: Mapping[str, Any] | None = None,
        at: datetime | None = None,
    ) -> int:
        """Append an audit event and return its id; ``kind`` is lower_snake_case. A schedule's
        ``created`` and ``deleted`` are recorded once per UID: a repeat returns the first id."""
        kind = str(kind)
        if not _EVENT_KIND_RE.match(kind):
            raise ValueError(f"kind: {kind!r} must be lower_snake_case (e.g. auto_paused)")
        if at is not None:
            aware("at", at)
        payload = dict(details or {})
        json_document("record_event(): details", payload)
        values: dict[str, Any] = {
            "namespace": namespace,
            "schedule_name": schedule_name,
            "schedule_uid": schedule_uid,
            "kind": kind,
            "reason": clean_text(reason, ERROR_LIMIT_BYTES),
            "actor": actor,
            "details": payload,
        }
        if at is not None:
            values["at"] = at
        what = f"record {kind} event of {namespace}/{schedule_name}"
        if kind in ONCE_PER_SCHEDULE and schedule_uid is not None:
            return self._record_once(values, what)
        insert = sa.insert(EVENTS).values(values).returning(EVENTS.c.id)
        with self._begin(what) as conn:
            return int(conn.execute(insert).scalar_one())

    def _record_once(self, values: dict[str, Any], what: str) -> int:
        """Insert a once-per-schedule event, or return the id of the one recorded before."""
        t = EVENTS
        insert = (
            pg.insert(t)
            .values(values)
            .on_conflict_do_nothing(
                index_elements=[t.c.schedule_uid, t.c.kind],
                index_where=sa.text(ONCE_PER_SCHEDULE_SQL),
            )
            .returning(t.c.id)
        )
        earlier = sa.select(t.c.id).where(
            t.c.schedule_uid == values["schedule_uid"], t.c.kind == values["kind"]
        )
        with self._begin(what) as conn:
            new = conn.execute(insert).scalar_one_or_none()
            return int(new if new is not None else conn.execute(earlier).scalar_one())

    def events(
        self,
        namespace: str,
        schedule_name: str,
        *,
        since: datetime | None = None,
        until: datetime | None = None,
        limit: int = 100,
    ) -> list[EventRecord]:
        """Audit events of a schedule in [since, until), newest first."""
        check_page_limit(limit)
        t = EVENTS
        query = (
            sa.select(t)
            .where(t.c.namespace == namespace, t.c.schedule_name == schedule_name)
            .order_by(t.c.at.desc(), t.c.id.desc())
            .limit(limit)
        )
        if since is not None:
            query = query.where(t.c.at >= aware("since", since))
        if until is not None:
            query = query.where(t.c.at < aware("until", until))
        with self._begin(f"list events of {namespace}/{schedule_name}") as conn:
            return [EventRecord(**row._mapping) for row in conn.execute(query)]
