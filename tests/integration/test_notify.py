"""Webhook notifications against a real PostgreSQL and a real local HTTP receiver: the decision
rules on PostgresStore (the same scenarios the unit tests run on MemoryStore), the per-schedule
lock, claiming with SKIP LOCKED and leases, delivery with retries, and the migration."""

from __future__ import annotations

import asyncio
import json
import logging
import socket
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any

import pytest
import sqlalchemy as sa
from alembic import command
from alembic.config import Config
from alembic.script import ScriptDirectory

from agent_runner.contract import RunOutcome
from harness.postgres import PostgresServer
from integration.llm_server import Reply, ScriptedServer
from nocturne_operator.notifications import bodies as webhook_bodies
from nocturne_operator.notifications import notices, outbox
from nocturne_operator.notifications.notices import Delivery, Kind, NoticeSubject, RunInfo, Status
from nocturne_operator.notifications.notify import Notifier
from nocturne_operator.notifications.outbox import PostgresStore, Store
from nocturne_operator.storage import (
    MIGRATIONS_DIR,
    History,
    HistoryUnavailableError,
    upgrade,
)
from unit.test_notify import RULES, SUBJECT, run, target

pytestmark = pytest.mark.integration

T0 = datetime(2026, 11, 1, 9, 0, tzinfo=UTC)
HOOK = "/services/T000/B000/s3cr3tT0ken"


@dataclass
class Schema:
    name: str
    url: str


@pytest.fixture
def schema(postgres: PostgresServer) -> Iterator[Schema]:
    """A fresh schema migrated to head, dropped afterwards."""
    name = f"notify_{uuid.uuid4().hex[:8]}"
    url = postgres.fresh_schema(name)
    upgrade(url)
    yield Schema(name, url)
    engine = sa.create_engine(postgres.url, poolclass=sa.NullPool)
    with engine.begin() as conn:
        conn.execute(sa.text(f"DROP SCHEMA {name} CASCADE"))
    engine.dispose()


@pytest.fixture
def store(schema: Schema) -> Iterator[PostgresStore]:
    with History.connect(schema.url) as history:
        yield PostgresStore(history.engine)


# ---- decision rules -------------------------------------------------------------------------


@pytest.mark.parametrize("rule", RULES, ids=[r.__name__.removeprefix("rule_") for r in RULES])
def test_rules_on_postgres(rule: Callable[[Store], None], store: PostgresStore) -> None:
    rule(store)


def test_rows_hold_what_the_notice_says(store: PostgresStore) -> None:
    notes = Notifier(store, lambda *_: "", lambda *_: None)
    notes.run_finished(SUBJECT, target(fmt="slack"), run("a", "Failed", error="boom"), now=T0)
    (row,) = store.recent(SUBJECT.namespace, SUBJECT.name)
    assert (row.kind, row.status, row.resolved, row.attempts) == (
        Kind.FAILED,
        Status.PENDING,
        False,
        0,
    )
    assert (row.dedupe_key, row.secret_name, row.secret_key, row.format) == (
        "uid-a",
        "hook",
        "url",
        "slack",
    )
    assert row.created_at == row.next_attempt_at == T0
    assert row.created_at.tzinfo is not None
    assert row.sent_at is None
    assert row.last_error is None
    assert row.run is not None
    assert row.run["costUSD"] == "0.12"
    with store.engine.connect() as conn:
        kind = conn.execute(
            sa.text("SELECT jsonb_typeof(payload->'run'->'costUSD') FROM notifications")
        )
        assert kind.scalar_one() == "string"


def test_two_threads_cannot_both_pass_the_cooldown(store: PostgresStore) -> None:
    """The per-schedule advisory lock serialises the check and the insert."""
    notes = Notifier(store, lambda *_: "", lambda *_: None)
    for round_ in range(8):
        subject = NoticeSubject("ns", f"race-{round_}", f"uid-{round_}")
        results, errors = race(notes, subject)
        assert errors == []
        assert sorted(results) == [[], [Kind.FAILED]]
        statuses = sorted(d.status.value for d in store.recent("ns", subject.name))
        assert statuses == ["PENDING", "SUPPRESSED"]


def race(notes: Notifier, subject: NoticeSubject) -> tuple[list[list[Kind]], list[BaseException]]:
    """Two handler threads report a failed Job of ``subject`` at the same moment."""
    barrier = threading.Barrier(2)
    results: list[list[Kind]] = []
    errors: list[BaseException] = []

    def finish(job: str) -> None:
        try:
            barrier.wait()
            results.append(notes.run_finished(subject, target(), run(job, "Failed"), now=T0))
        except BaseException as exc:  # reported by the caller
            errors.append(exc)

    threads = [threading.Thread(target=finish, args=(job,)) for job in ("a", "b")]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return results, errors


def test_claims_skip_rows_another_claimer_holds(store: PostgresStore) -> None:
    notes = Notifier(store, lambda *_: "", lambda *_: None)
    for i in range(20):
        subject = NoticeSubject("ns", f"s{i}", f"uid-{i}")
        notes.run_finished(subject, target(), run("a", "Failed"), now=T0)
    barrier = threading.Barrier(2)
    claimed: list[list[int]] = []

    def claim() -> None:
        barrier.wait()
        due = store.claim_due(T0, lease=timedelta(minutes=1), limit=15)
        claimed.append([d.id for d in due])

    threads = [threading.Thread(target=claim) for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    first, second = claimed
    assert not set(first) & set(second)
    assert len(first) + len(second) == 20
    # Claimed rows wait for their lease; then an unfinished delivery is due again.
    assert store.claim_due(T0 + timedelta(seconds=59), lease=timedelta(minutes=1), limit=50) == []
    again = store.claim_due(T0 + timedelta(minutes=1), lease=timedelta(minutes=1), limit=50)
    assert len(again) == 20
    assert {d.attempts for d in again} == {2}


def test_an_unreachable_database_is_a_clear_error(postgres: PostgresServer) -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    url = postgres.url.replace(f":{postgres.port}/", f":{port}/")
    with History.connect(url, connect_timeout=2) as history:
        store = PostgresStore(history.engine)
        notes = Notifier(store, lambda *_: "", lambda *_: None)
        with pytest.raises(HistoryUnavailableError, match="unavailable") as caught:
            notes.run_finished(SUBJECT, target(), run("a"), now=T0)
    assert postgres.password not in str(caught.value)


# ---- the migration --------------------------------------------------------------------------


def catalog(url: str, schema: str) -> dict[str, list[tuple[Any, ...]]]:
    """Columns, constraints and indexes of ``notifications`` as PostgreSQL describes them."""
    queries = {
        "columns": """
            SELECT a.attname, format_type(a.atttypid, a.atttypmod), a.attnotnull,
                   pg_get_expr(d.adbin, d.adrelid), a.attidentity
            FROM pg_attribute a
            JOIN pg_class c ON c.oid = a.attrelid
            JOIN pg_namespace ns ON ns.oid = c.relnamespace
            LEFT JOIN pg_attrdef d ON d.adrelid = a.attrelid AND d.adnum = a.attnum
            WHERE ns.nspname = :schema AND c.relname = 'notifications' AND a.attnum > 0
              AND NOT a.attisdropped
            ORDER BY a.attnum""",
        "constraints": """
            SELECT con.conname, con.contype, pg_get_constraintdef(con.oid)
            FROM pg_constraint con
            JOIN pg_class c ON c.oid = con.conrelid
            JOIN pg_namespace ns ON ns.oid = c.relnamespace
            WHERE ns.nspname = :schema AND c.relname = 'notifications'
            ORDER BY con.conname""",
        "indexes": """
            SELECT indexname, replace(indexdef, schemaname || '.', '')
            FROM pg_indexes
            WHERE schemaname = :schema AND tablename = 'notifications'
            ORDER BY indexname""",
    }
    engine = sa.create_engine(url, poolclass=sa.NullPool)
    with engine.connect() as conn:
        found = {
            what: [tuple(row) for row in conn.execute(sa.text(sql), {"schema": schema})]
            for what, sql in queries.items()
        }
    engine.dispose()
    return found


def test_the_migration_creates_the_table_the_module_describes(
    schema: Schema, postgres: PostgresServer
) -> None:
    modelled = f"model_{uuid.uuid4().hex[:8]}"
    url = postgres.fresh_schema(modelled)
    engine = sa.create_engine(url, poolclass=sa.NullPool)
    outbox.NOTIFICATIONS.metadata.create_all(engine)
    engine.dispose()
    try:
        migrated = catalog(schema.url, schema.name)
        assert migrated == catalog(url, modelled)
    finally:
        engine = sa.create_engine(postgres.url, poolclass=sa.NullPool)
        with engine.begin() as conn:
            conn.execute(sa.text(f"DROP SCHEMA {modelled} CASCADE"))
        engine.dispose()
    indexes = dict(migrated["indexes"])
    assert indexes["ix_notifications_due"].endswith(
        "USING btree (next_attempt_at) WHERE (status = 'PENDING'::text)"
    )
    assert indexes["ix_notifications_schedule_uid_kind_created"].endswith(
        "(schedule_uid, kind, created_at)"
    )
    assert indexes["uq_notifications_schedule_uid_kind_dedupe_key"].endswith(
        "(schedule_uid, kind, dedupe_key)"
    )
    types = {name: type_ for name, type_, *_ in migrated["columns"]}
    assert types["created_at"] == types["next_attempt_at"] == "timestamp with time zone"
    assert types["payload"] == "jsonb"


def tables(url: str) -> tuple[list[str], list[str]]:
    engine = sa.create_engine(url, poolclass=sa.NullPool)
    with engine.connect() as conn:
        names = sorted(sa.inspect(conn).get_table_names())
        versions = list(conn.execute(sa.text("SELECT version_num FROM alembic_version")).scalars())
    engine.dispose()
    return names, versions


def test_downgrade_to_0001_and_upgrade_again(schema: Schema) -> None:
    history = ["agent_state", "alembic_version", "schedule_events", "schedule_executions"]
    # 0002, 0008, 0007, 0010
    later = ["namespace_budgets", "notifications", "run_checkpoints", "schedule_purged_totals"]
    [newest] = ScriptDirectory(str(MIGRATIONS_DIR)).get_heads()
    head = (sorted([*history, *later]), [newest])
    assert tables(schema.url) == head
    engine = sa.create_engine(schema.url, poolclass=sa.NullPool)
    with engine.connect() as conn:
        config = Config()
        config.set_main_option("script_location", str(MIGRATIONS_DIR))
        config.attributes["connection"] = conn
        command.downgrade(config, "0001")
        conn.commit()
    engine.dispose()
    assert tables(schema.url) == (history, ["0001"])
    upgrade(schema.url)
    assert tables(schema.url) == head


# ---- delivery -------------------------------------------------------------------------------


class Clock:
    """A clock the test moves."""

    def __init__(self, now: datetime) -> None:
        self.now = now

    def __call__(self) -> datetime:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += timedelta(seconds=seconds)


@dataclass
class Harness:
    store: PostgresStore
    receiver: ScriptedServer
    clock: Clock
    secrets: dict[tuple[str, str, str], str]
    outcomes: list[tuple[int, str, str, str]] = field(default_factory=list)

    def notifier(self, store: Store | None = None, **options: Any) -> Notifier:
        def resolve(namespace: str, name: str, key: str) -> str:
            try:
                return self.secrets[(namespace, name, key)]
            except KeyError:
                raise LookupError(f"Secret {namespace}/{name} has no key {key!r}") from None

        def on_outcome(delivery: Delivery, result: str, detail: str) -> None:
            self.outcomes.append((delivery.id, delivery.kind.value, result, detail))

        options = {
            "retry_base": timedelta(milliseconds=10),
            "jitter": 0.0,
            "clock": self.clock,
            # The receiver listens on loopback: what NOCTURNE_WEBHOOK_ALLOW_PRIVATE is for.
            "allow_private": True,
            "webhook_secrets": {"hook", "refused"},
            **options,
        }
        return Notifier(store or self.store, resolve, on_outcome, **options)

    def results(self) -> list[str]:
        return [result for _, _, result, _ in self.outcomes]

    def row(self) -> Delivery:
        (row,) = self.store.recent(SUBJECT.namespace, SUBJECT.name)
        return row


@pytest.fixture
def harness(store: PostgresStore) -> Iterator[Harness]:
    with ScriptedServer() as receiver:
        secrets = {(SUBJECT.namespace, "hook", "url"): receiver.url + HOOK + "\n"}
        yield Harness(store, receiver, Clock(T0), secrets)


def passes(notes: Notifier, clock: Clock, count: int, *, step: float = 1.0) -> list[int]:
    """``count`` delivery passes, the clock moved ``step`` seconds after each."""

    async def go() -> list[int]:
        attempted = []
        for _ in range(count):
            attempted.append(await notes.deliver_due())
            clock.advance(step)
        return attempted

    return asyncio.run(go())


def failed_run(notes: Notifier, fmt: notices.Format = "json") -> None:
    notes.run_finished(
        SUBJECT, target({Kind.FAILED}, fmt=fmt), run("a", "Failed", error="boom"), now=T0
    )


def test_retried_then_sent(harness: Harness) -> None:
    harness.receiver.script(HOOK, Reply(500, body=b""), Reply(502, body=b""), Reply(204, body=b""))
    notes = harness.notifier()
    failed_run(notes)
    assert passes(notes, harness.clock, 1, step=0) == [1]
    row = harness.row()
    assert (row.status, row.attempts) == (Status.PENDING, 1)
    assert row.next_attempt_at == T0 + timedelta(milliseconds=10)
    assert row.last_error == "HTTP 500 Internal Server Error; attempt 1 of 6, next in 0.01s"
    assert passes(notes, harness.clock, 1, step=0) == [0]  # not due yet
    assert passes(notes, harness.clock, 3, step=1) == [0, 1, 1]
    row = harness.row()
    assert (row.status, row.attempts, row.last_error) == (Status.SENT, 3, None)
    assert row.sent_at == T0 + timedelta(seconds=2)
    assert harness.results() == ["retried", "retried", "sent"]
    requests = harness.receiver.requests_to(HOOK)
    assert len(requests) == 3
    for request in requests:
        assert request.headers["content-type"] == "application/json"
        assert request.headers["user-agent"] == "nocturne-operator"
        assert request.headers["x-nocturne-delivery"] == str(row.id)
        assert request.headers["x-nocturne-event"] == "Failed"
        assert request.json() == webhook_bodies.json_body(row)


def test_slack_format_is_posted_as_blocks(harness: Harness) -> None:
    harness.receiver.script(HOOK, Reply(200, body=b"ok"))
    notes = harness.notifier()
    failed_run(notes, fmt="slack")
    passes(notes, harness.clock, 1)
    (request,) = harness.receiver.requests_to(HOOK)
    body = request.json()
    assert body["blocks"][0]["text"]["text"] == "❌ Failed: daily-news"
    assert harness.results() == ["sent"]


def test_retry_after_is_honoured(harness: Harness) -> None:
    harness.receiver.script(HOOK, Reply(429, headers={"Retry-After": "120"}), Reply(200))
    notes = harness.notifier()
    failed_run(notes)
    passes(notes, harness.clock, 1, step=0)
    assert harness.row().next_attempt_at == T0 + timedelta(seconds=120)
    harness.clock.advance(119)
    assert passes(notes, harness.clock, 1, step=1) == [0]
    assert passes(notes, harness.clock, 1) == [1]
    assert harness.row().status is Status.SENT
    assert harness.results() == ["retried", "sent"]


def test_a_client_error_fails_at_once(harness: Harness) -> None:
    harness.receiver.script(HOOK, Reply(400, body=b"invalid_payload"))
    notes = harness.notifier()
    failed_run(notes)
    assert passes(notes, harness.clock, 2) == [1, 0]
    row = harness.row()
    assert (row.status, row.attempts) == (Status.FAILED, 1)
    assert row.last_error == "HTTP 400 Bad Request"
    assert harness.outcomes == [(row.id, "Failed", "failed", "HTTP 400 Bad Request")]


def test_gives_up_after_max_attempts(harness: Harness) -> None:
    harness.receiver.script(HOOK, *[Reply(503, body=b"")] * 3, Reply(200))
    notes = harness.notifier(max_attempts=3)
    failed_run(notes)
    assert passes(notes, harness.clock, 4) == [1, 1, 1, 0]
    row = harness.row()
    assert (row.status, row.attempts) == (Status.FAILED, 3)
    assert row.last_error == "gave up after 3 attempts: HTTP 503 Service Unavailable"
    assert harness.results() == ["retried", "retried", "failed"]
    assert harness.receiver.pending(HOOK) == 1


def test_a_missing_secret_is_retried_then_failed(harness: Harness) -> None:
    harness.secrets.clear()
    notes = harness.notifier(max_attempts=2)
    failed_run(notes)
    assert passes(notes, harness.clock, 3) == [1, 1, 0]
    row = harness.row()
    assert row.status is Status.FAILED
    assert row.last_error == (
        "gave up after 2 attempts: webhook URL not found: Secret news-team/hook has no key 'url'"
    )
    assert harness.results() == ["retried", "failed"]
    assert harness.receiver.requests == []


def test_a_secret_without_an_http_url_fails_naming_the_secret(harness: Harness) -> None:
    harness.secrets[(SUBJECT.namespace, "hook", "url")] = "ftp://files.example/s3cr3tT0ken"
    notes = harness.notifier()
    failed_run(notes)
    passes(notes, harness.clock, 1)
    row = harness.row()
    assert row.status is Status.FAILED
    assert row.last_error == "Secret news-team/hook key url does not hold an http(s) URL"


def test_a_hanging_receiver_times_out_and_is_retried(harness: Harness) -> None:
    harness.receiver.script(HOOK, Reply(200, delay=2.0), Reply(200))
    notes = harness.notifier(timeout=0.3)
    failed_run(notes)
    started = time.monotonic()
    assert passes(notes, harness.clock, 2) == [1, 1]
    assert time.monotonic() - started < 2.0
    assert harness.results() == ["retried", "sent"]
    assert "0.3" in harness.outcomes[0][3]


def test_the_url_never_reaches_logs_rows_or_outcomes(
    harness: Harness, caplog: pytest.LogCaptureFixture
) -> None:
    with socket.socket() as sock:  # a port nobody listens on
        sock.bind(("127.0.0.1", 0))
        closed = sock.getsockname()[1]
    subjects = [NoticeSubject(SUBJECT.namespace, f"s{i}", f"uid-{i}") for i in range(5)]
    harness.secrets[(SUBJECT.namespace, "refused", "url")] = f"http://127.0.0.1:{closed}{HOOK}"
    harness.receiver.script(
        HOOK,
        Reply(500, body=f"no upstream for {HOOK}".encode()),
        Reply(404, body=f"no such hook: {harness.receiver.url}{HOOK}".encode()),
        Reply(200, delay=1.0),
        Reply(200),
    )
    notes = harness.notifier(timeout=0.3, max_attempts=2)
    for subject in subjects[:4]:
        notes.run_finished(subject, target({Kind.FAILED}), run("a", "Failed"), now=T0)
    refused = notices.Target("refused", "url", "json", timedelta(0), frozenset({Kind.FAILED}))
    notes.run_finished(subjects[4], refused, run("a", "Failed"), now=T0)
    with caplog.at_level(logging.DEBUG):
        passes(notes, harness.clock, 3)
    rows = [d for s in subjects for d in harness.store.recent(s.namespace, s.name)]
    assert {d.status for d in rows} >= {Status.SENT, Status.FAILED}
    assert "HTTP Request: POST http://127.0.0.1" in caplog.text  # httpx did log its requests
    texts = [caplog.text, *(str(d.last_error) for d in rows), *(o[3] for o in harness.outcomes)]
    for text in texts:
        assert "s3cr3tT0ken" not in text
        assert "T000/B000" not in text
    assert any("HTTP 404" in d for *_, d in harness.outcomes)
    assert any("ConnectError: Connection refused" in d for *_, d in harness.outcomes)


class FlakyStore:
    """A PostgresStore whose first claim fails as if the database were down."""

    def __init__(self, store: PostgresStore) -> None:
        self.store = store
        self.claims = 0

    def schedule(self, subject: NoticeSubject) -> Any:
        return self.store.schedule(subject)

    def claim_due(self, now: datetime, *, lease: timedelta, limit: int) -> list[Delivery]:
        self.claims += 1
        if self.claims == 1:
            raise HistoryUnavailableError("claim due notifications: database unavailable")
        return self.store.claim_due(now, lease=lease, limit=limit)

    def finish(self, delivery_id: int, **values: Any) -> Delivery | None:
        return self.store.finish(delivery_id, **values)

    def recent(self, namespace: str, name: str, *, limit: int = 50) -> list[Delivery]:
        return self.store.recent(namespace, name, limit=limit)

    def purge(self, before: datetime) -> int:
        return self.store.purge(before)


def test_the_loop_delivers_after_a_wake_and_survives_errors(
    harness: Harness, caplog: pytest.LogCaptureFixture
) -> None:
    harness.receiver.script(HOOK, Reply(200))
    flaky = FlakyStore(harness.store)
    notes = harness.notifier(flaky, clock=lambda: datetime.now(UTC))

    async def go() -> None:
        wake = asyncio.Event()
        loop = asyncio.create_task(notes.run(wake, idle=0.05))
        while flaky.claims < 3:  # the failed pass, then idle passes
            await asyncio.sleep(0.01)
        # Long idle from now on: only the wake makes the next pass happen soon.
        loop.cancel()
        with pytest.raises(asyncio.CancelledError):
            await loop
        loop = asyncio.create_task(notes.run(wake, idle=60))
        await asyncio.sleep(0.05)
        now = datetime.now(UTC)
        # From a handler thread, as kopf would; enqueueing wakes the loop (thread-safe).
        await asyncio.to_thread(
            notes.run_finished, SUBJECT, target({Kind.FAILED}), run("a", "Failed"), now=now
        )
        deadline = time.monotonic() + 5
        while harness.results() != ["sent"] and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
        loop.cancel()
        with pytest.raises(asyncio.CancelledError):
            await loop

    with caplog.at_level(logging.WARNING, logger="nocturne_operator.notifications.notify"):
        asyncio.run(go())
    assert harness.results() == ["sent"]
    assert len(harness.receiver.requests_to(HOOK)) == 1
    assert "notification delivery paused: claim due notifications: database unavailable" in (
        caplog.text
    )


def test_an_explicit_wake_event_starts_a_pass(harness: Harness) -> None:
    harness.receiver.script(HOOK, Reply(200))
    notes = harness.notifier(clock=lambda: datetime.now(UTC))

    async def go() -> float:
        wake = asyncio.Event()
        loop = asyncio.create_task(notes.run(wake, idle=60))
        await asyncio.sleep(0.05)
        # Stored by something else (no auto-wake from this notifier): the event does it.
        other = Notifier(harness.store, lambda *_: "", lambda *_: None)
        other.run_finished(
            SUBJECT, target({Kind.FAILED}), run("a", "Failed"), now=datetime.now(UTC)
        )
        started = time.monotonic()
        wake.set()
        while not harness.results() and time.monotonic() - started < 5:
            await asyncio.sleep(0.01)
        loop.cancel()
        with pytest.raises(asyncio.CancelledError):
            await loop
        return time.monotonic() - started

    assert asyncio.run(go()) < 5
    assert len(harness.receiver.requests_to(HOOK)) == 1


def test_the_delivered_body_is_plain_json(harness: Harness) -> None:
    harness.receiver.script(HOOK, Reply(200))
    notes = harness.notifier()
    notes.run_finished(
        SUBJECT,
        target({Kind.SUCCEEDED}),
        RunInfo(
            job="daily-news-a",
            job_uid="uid-a",
            result=RunOutcome.SUCCEEDED,
            cost_usd=Decimal("1.5"),
            started_at=T0,
            completed_at=None,
            output="<digest> & more",
            error=None,
            alert=False,
            alert_reason=None,
        ),
        now=T0,
    )
    passes(notes, harness.clock, 1)
    (request,) = harness.receiver.requests_to(HOOK)
    body = json.loads(request.body)
    assert body["run"]["costUSD"] == "1.50"
    assert body["run"]["completedAt"] is None
    assert body["run"]["output"] == "<digest> & more"
    assert body["state"] == "firing"


# ---- the fence ------------------------------------------------------------------------------


def test_a_response_body_never_reaches_a_detail_a_row_or_a_log(
    harness: Harness, caplog: pytest.LogCaptureFixture
) -> None:
    harness.receiver.script(
        HOOK,
        Reply(500, body=b"SECRET-BODY from the internal admin API"),
        Reply(403, body=b"SECRET-BODY again"),
    )
    notes = harness.notifier(max_attempts=3)
    failed_run(notes)
    with caplog.at_level(logging.DEBUG):
        assert passes(notes, harness.clock, 3) == [1, 1, 0]
    row = harness.row()
    assert row.status is Status.FAILED
    assert [d for *_, d in harness.outcomes] == [
        "HTTP 500 Internal Server Error; attempt 1 of 3, next in 0.01s",
        "HTTP 403 Forbidden",
    ]
    for text in (caplog.text, str(row.last_error), *(d for *_, d in harness.outcomes)):
        assert "SECRET-BODY" not in text


def test_loopback_is_refused_without_allow_private(
    harness: Harness, caplog: pytest.LogCaptureFixture
) -> None:
    harness.receiver.script(HOOK, Reply(200, body=b"SECRET-BODY"))
    notes = harness.notifier(allow_private=False)
    failed_run(notes)
    with caplog.at_level(logging.DEBUG):
        assert passes(notes, harness.clock, 2) == [1, 0]
    assert harness.receiver.requests == []
    row = harness.row()
    assert row.status is Status.FAILED
    assert row.last_error == (
        "refused: address 127.0.0.1 is loopback (allowed only with NOCTURNE_WEBHOOK_ALLOW_PRIVATE)"
    )
    assert harness.outcomes == [(row.id, "Failed", "failed", row.last_error)]
    assert "s3cr3tT0ken" not in caplog.text


def test_a_name_resolving_to_loopback_is_refused_without_saying_the_address(
    harness: Harness,
) -> None:
    url = harness.receiver.url.replace("127.0.0.1", "localhost") + HOOK
    harness.secrets[(SUBJECT.namespace, "hook", "url")] = url
    notes = harness.notifier(allow_private=False)
    failed_run(notes)
    passes(notes, harness.clock, 1)
    assert harness.receiver.requests == []
    assert harness.row().last_error == (
        "refused: the webhook's host is loopback (allowed only with NOCTURNE_WEBHOOK_ALLOW_PRIVATE)"
    )


def test_metadata_addresses_stay_refused_with_allow_private(harness: Harness) -> None:
    harness.secrets[(SUBJECT.namespace, "hook", "url")] = "http://169.254.169.254/latest/"
    notes = harness.notifier(allow_private=True)
    failed_run(notes)
    started = time.monotonic()
    passes(notes, harness.clock, 1)
    assert time.monotonic() - started < 1  # refused before any connection attempt
    assert harness.row().last_error == (
        "refused: address 169.254.169.254 is a cloud metadata endpoint"
    )


def test_a_name_is_resolved_once_and_the_post_goes_to_the_checked_address(
    harness: Harness,
) -> None:
    """DNS rebinding: the name would resolve elsewhere on a second lookup; there is none, and
    the receiver still sees the name in Host."""
    answers = [["127.0.0.1"], ["169.254.169.254"]]
    lookups: list[str] = []

    def rebinding(host: str, port: int) -> list[str]:
        lookups.append(host)
        return answers.pop(0)

    port = harness.receiver.port
    harness.secrets[(SUBJECT.namespace, "hook", "url")] = f"http://hooks.internal:{port}{HOOK}"
    harness.receiver.script(HOOK, Reply(204, body=b""))
    notes = harness.notifier(resolver=rebinding)
    failed_run(notes)
    passes(notes, harness.clock, 1)
    assert harness.results() == ["sent"]
    assert lookups == ["hooks.internal"]
    (request,) = harness.receiver.requests_to(HOOK)
    assert request.headers["host"] == f"hooks.internal:{port}"


def test_redirects_are_not_followed(harness: Harness) -> None:
    harness.receiver.script(
        HOOK, Reply(302, body=b"", headers={"Location": f"{harness.receiver.url}/elsewhere"})
    )
    notes = harness.notifier()
    failed_run(notes)
    passes(notes, harness.clock, 1)
    assert harness.row().last_error == "HTTP 302 Found (redirects are not followed)"
    assert [r.path for r in harness.receiver.requests] == [HOOK]


def test_a_secret_the_admin_does_not_allow_is_not_read(harness: Harness) -> None:
    reads: list[str] = []
    secrets = harness.secrets

    class Spy(dict[tuple[str, str, str], str]):
        def __getitem__(self, key: tuple[str, str, str]) -> str:
            reads.append(key[1])
            return secrets[key]

    harness.secrets = Spy()
    notes = harness.notifier(webhook_secrets={"slack"})
    failed_run(notes)
    passes(notes, harness.clock, 1)
    assert reads == []
    assert harness.row().last_error == (
        "Secret hook is not one the cluster admin allows for webhooks"
    )
    assert harness.receiver.requests == []
