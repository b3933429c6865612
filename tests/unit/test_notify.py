"""Webhook notifications without I/O: bodies in both formats, targets, backoff, how an HTTP
answer is read, and the decision rules on the in-memory store.

The ``RULES`` scenarios take any Store; tests/integration/test_notify.py runs the same ones on
PostgreSQL, so both stores are held to one behaviour.
"""

from __future__ import annotations

import asyncio
import ipaddress
import json
import logging
from collections.abc import Callable, Sequence
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from http import HTTPStatus
from typing import Any

import httpx
import pytest

from agent_runner.addresses import BlockedAddressError
from agent_runner.contract import RunOutcome
from nocturne_operator.adapters import metrics
from nocturne_operator.api.model import Notifications
from nocturne_operator.notifications import bodies as webhook_bodies
from nocturne_operator.notifications import notices
from nocturne_operator.notifications import notify as n
from nocturne_operator.notifications.notices import (
    Delivery,
    Kind,
    NoticeSubject,
    RunInfo,
    Status,
    Target,
)
from nocturne_operator.notifications.notify import Notifier
from nocturne_operator.notifications.outbox import MemoryStore, Store

T0 = datetime(2026, 11, 1, 9, 0, tzinfo=UTC)
SUBJECT = NoticeSubject("news-team", "daily-news", "uid-1")
ALL = frozenset(Kind)


def target(
    kinds: frozenset[Kind] | set[Kind] = ALL,
    *,
    minutes: int = 60,
    fmt: notices.Format = "json",
) -> Target:
    return Target("hook", "url", fmt, timedelta(minutes=minutes), frozenset(kinds))


def run(
    job: str,
    result: str = "Succeeded",
    *,
    alert: bool = False,
    reason: str | None = None,
    output: str | None = "Today's digest",
    error: str | None = None,
    cost: str = "0.120000",
    ended: datetime = T0 + timedelta(minutes=2, seconds=5),
) -> RunInfo:
    return RunInfo(
        job=f"daily-news-{job}",
        job_uid=f"uid-{job}",
        # Tests name results as status shows them ("BudgetExceeded").
        result=next(o for o in RunOutcome if o.display == result),
        cost_usd=Decimal(cost),
        started_at=T0,
        completed_at=ended,
        output=output,
        error=error,
        alert=alert,
        alert_reason=reason,
    )


Outcome = tuple[int, str, str, str]


def notifier(store: Store, outcomes: list[Outcome] | None = None) -> Notifier:
    def on_outcome(delivery: Delivery, result: str, detail: str) -> None:
        if outcomes is not None:
            outcomes.append((delivery.id, delivery.kind.value, result, detail))

    def no_url(namespace: str, name: str, key: str) -> str:
        raise LookupError(f"Secret {namespace}/{name} not found")

    return Notifier(store, no_url, on_outcome)


def rows(store: Store) -> list[tuple[str, str, bool]]:
    """(kind, status, resolved) of the schedule's notices, oldest first."""
    found = reversed(store.recent(SUBJECT.namespace, SUBJECT.name, limit=1000))
    return [(d.kind.value, d.status.value, d.resolved) for d in found]


def at(minutes: float) -> datetime:
    return T0 + timedelta(minutes=minutes)


# ---- decision rules, for any store ----------------------------------------------------------


def rule_unsubscribed_kinds_store_nothing(store: Store) -> None:
    notes = notifier(store)
    only_failed = target({Kind.FAILED})
    assert notes.run_finished(SUBJECT, only_failed, run("a"), now=at(0)) == []
    assert not notes.schedule_event(
        SUBJECT, only_failed, Kind.AUTO_PAUSED, key="p1", message="paused", now=at(1)
    )
    assert rows(store) == []
    assert notes.run_finished(SUBJECT, only_failed, run("b", "Failed"), now=at(2)) == [Kind.FAILED]
    # Recovered needs its own subscription; a success without it stores nothing.
    assert notes.run_finished(SUBJECT, only_failed, run("c"), now=at(3)) == []
    assert rows(store) == [("Failed", "PENDING", False)]


def rule_a_repeated_enqueue_changes_nothing(store: Store) -> None:
    notes = notifier(store)
    failing = run("a", "Failed", alert=True, reason="price dropped", error="boom")
    assert notes.run_finished(SUBJECT, target(), failing, now=at(0)) == [Kind.FAILED, Kind.ALERT]
    before = store.recent(SUBJECT.namespace, SUBJECT.name)
    assert notes.run_finished(SUBJECT, target(), failing, now=at(1)) == []
    assert store.recent(SUBJECT.namespace, SUBJECT.name) == before
    ok = run("b")
    assert notes.run_finished(SUBJECT, target(), ok, now=at(2)) == [
        Kind.SUCCEEDED,
        Kind.RECOVERED,
        Kind.ALERT,
    ]
    assert notes.run_finished(SUBJECT, target(), ok, now=at(3)) == []
    event = {"key": "2026-11-01T10:00:00Z", "message": "paused after 3 failures"}
    assert notes.schedule_event(SUBJECT, target(), Kind.AUTO_PAUSED, now=at(4), **event)
    assert not notes.schedule_event(SUBJECT, target(), Kind.AUTO_PAUSED, now=at(5), **event)
    assert len(rows(store)) == 6


def rule_cooldown_suppresses_firing_notices(store: Store) -> None:
    outcomes: list[Outcome] = []
    notes = notifier(store, outcomes)
    kinds = {Kind.FAILED, Kind.SILENT_STOP}
    assert notes.run_finished(SUBJECT, target(kinds), run("a", "Failed"), now=at(0)) == [
        Kind.FAILED
    ]
    assert notes.run_finished(SUBJECT, target(kinds), run("b", "TimedOut"), now=at(30)) == []
    # Another kind has its own cooldown.
    assert notes.schedule_event(
        SUBJECT, target(kinds), Kind.SILENT_STOP, key="s", message="quiet", now=at(31)
    )
    # The window is measured from the last notice that was not suppressed (a, at minute 0).
    assert notes.run_finished(SUBJECT, target(kinds), run("c", "Failed"), now=at(61)) == [
        Kind.FAILED
    ]
    assert rows(store) == [
        ("Failed", "PENDING", False),
        ("Failed", "SUPPRESSED", False),
        ("SilentStop", "PENDING", False),
        ("Failed", "PENDING", False),
    ]
    assert [(kind, result) for _, kind, result, _ in outcomes] == [("Failed", "suppressed")]
    # No cooldown: nothing is suppressed.
    assert notes.run_finished(SUBJECT, target(kinds, minutes=0), run("d", "Failed"), now=at(62))


def rule_resolved_notices_are_never_suppressed(store: Store) -> None:
    notes = notifier(store)
    t = target({Kind.FAILED, Kind.AUTO_PAUSED, Kind.RECOVERED}, minutes=600)
    notes.run_finished(SUBJECT, t, run("a", "Failed", ended=at(0)), now=at(0))
    assert notes.run_finished(SUBJECT, t, run("b", ended=at(10)), now=at(10)) == [Kind.RECOVERED]
    assert notes.schedule_event(SUBJECT, t, Kind.AUTO_PAUSED, key="p", message="x", now=at(20))
    # A second Recovered well within the cooldown of the first.
    assert notes.run_finished(SUBJECT, t, run("c", ended=at(30)), now=at(30)) == [Kind.RECOVERED]
    assert rows(store) == [
        ("Failed", "PENDING", False),
        ("Recovered", "PENDING", True),
        ("AutoPaused", "PENDING", False),
        ("Recovered", "PENDING", True),
    ]
    recovered = store.recent(SUBJECT.namespace, SUBJECT.name, limit=1)[0]
    assert "recovered from AutoPaused" in recovered.message


def rule_recovery_follows_a_failure_notice_only(store: Store) -> None:
    notes = notifier(store)
    t = target({Kind.FAILED, Kind.RECOVERED})
    assert notes.run_finished(SUBJECT, t, run("a"), now=at(0)) == []
    notes.run_finished(SUBJECT, t, run("b", "BudgetExceeded", error="per-run cap"), now=at(1))
    assert notes.run_finished(SUBJECT, t, run("c"), now=at(2)) == [Kind.RECOVERED]
    assert notes.run_finished(SUBJECT, t, run("d"), now=at(3)) == []
    assert rows(store) == [("Failed", "PENDING", False), ("Recovered", "PENDING", True)]


def rule_a_flapping_schedule_sends_failed_recovered_then_nothing(store: Store) -> None:
    notes = notifier(store)
    t = target({Kind.FAILED, Kind.RECOVERED})
    sent = [
        notes.run_finished(
            SUBJECT,
            t,
            run(str(i), "Failed" if i % 2 == 0 else "Succeeded", ended=at(10 * i)),
            now=at(10 * i),
        )
        for i in range(6)
    ]
    assert sent == [[Kind.FAILED], [Kind.RECOVERED], [], [], [], []]
    assert rows(store) == [
        ("Failed", "PENDING", False),
        ("Recovered", "PENDING", True),
        ("Failed", "SUPPRESSED", False),
        ("Failed", "SUPPRESSED", False),
    ]


def rule_an_alert_is_cleared_by_the_next_unflagged_success(store: Store) -> None:
    notes = notifier(store)
    t = target({Kind.ALERT}, minutes=60)
    assert notes.run_finished(
        SUBJECT, t, run("a", alert=True, reason="AAPL < 100", ended=at(0)), now=at(0)
    ) == [Kind.ALERT]
    assert (
        notes.run_finished(SUBJECT, t, run("b", alert=True, ended=at(5)), now=at(5)) == []
    )  # cooldown
    assert notes.run_finished(SUBJECT, t, run("c", ended=at(10)), now=at(10)) == [
        Kind.ALERT
    ]  # all-clear
    assert notes.run_finished(SUBJECT, t, run("d", ended=at(15)), now=at(15)) == []
    # The latest Alert row counts whatever its status: a suppressed firing is cleared too.
    assert notes.run_finished(SUBJECT, t, run("e", alert=True, ended=at(20)), now=at(20)) == []
    assert (
        notes.run_finished(SUBJECT, t, run("f", "Failed", ended=at(25)), now=at(25)) == []
    )  # not a success
    assert notes.run_finished(SUBJECT, t, run("g", ended=at(30)), now=at(30)) == [Kind.ALERT]
    assert rows(store) == [
        ("Alert", "PENDING", False),
        ("Alert", "SUPPRESSED", False),
        ("Alert", "PENDING", True),
        ("Alert", "SUPPRESSED", False),
        ("Alert", "PENDING", True),
    ]
    firing = store.recent(SUBJECT.namespace, SUBJECT.name)[-1]
    assert firing.message == "Run daily-news-a raised an alert: AAPL < 100"


def rule_a_replayed_old_success_does_not_recover_from_a_later_pause(store: Store) -> None:
    """After a restart the operator replays recent Jobs: a success that ended before the
    auto-pause must not announce a recovery, nor clear an alert raised after it."""
    notes = notifier(store)
    t = target({Kind.AUTO_PAUSED, Kind.RECOVERED, Kind.ALERT})
    early = run("ok", ended=at(0))
    notes.run_finished(SUBJECT, t, early, now=at(0))
    notes.run_finished(SUBJECT, t, run("flag", alert=True, ended=at(5)), now=at(5))
    assert notes.schedule_event(SUBJECT, t, Kind.AUTO_PAUSED, key="j3", message="x", now=at(60))
    assert notes.run_finished(SUBJECT, t, early, now=at(90)) == []  # the replay
    assert notes.run_finished(SUBJECT, t, run("fixed", ended=at(120)), now=at(120)) == [
        Kind.RECOVERED,
        Kind.ALERT,
    ]


def rule_content_and_holds_are_never_held_back_by_the_cooldown(store: Store) -> None:
    """Each Succeeded notice carries that run's output; an auto-pause after a failed
    verification run is news however soon it follows the first one."""
    notes = notifier(store)
    t = target({Kind.SUCCEEDED, Kind.AUTO_PAUSED}, minutes=600)
    assert notes.run_finished(SUBJECT, t, run("a", ended=at(0)), now=at(0)) == [Kind.SUCCEEDED]
    assert notes.run_finished(SUBJECT, t, run("b", ended=at(1)), now=at(1)) == [Kind.SUCCEEDED]
    assert notes.schedule_event(SUBJECT, t, Kind.AUTO_PAUSED, key="j1", message="x", now=at(2))
    assert notes.schedule_event(SUBJECT, t, Kind.AUTO_PAUSED, key="j2", message="x", now=at(3))


def rule_cancelled_runs_send_nothing(store: Store) -> None:
    notes = notifier(store)
    assert notes.run_finished(SUBJECT, target(), run("a", "Cancelled", alert=True), now=at(0)) == []
    assert rows(store) == []


def rule_failed_results_name_the_result_and_the_error(store: Store) -> None:
    notes = notifier(store)
    for i, result in enumerate(["Failed", "BudgetExceeded", "TimedOut"]):
        notes.run_finished(
            SUBJECT,
            target(minutes=0),
            run(result, result, error=f"{result} happened\nTraceback ..."),
            now=at(i),
        )
    messages = [d.message for d in reversed(store.recent(SUBJECT.namespace, SUBJECT.name))]
    assert messages == [
        "Run daily-news-Failed failed (Failed) after 2m 5s, cost $0.12. Error: Failed happened",
        "Run daily-news-BudgetExceeded hit its budget (BudgetExceeded) after 2m 5s, cost $0.12. "
        "Error: BudgetExceeded happened",
        "Run daily-news-TimedOut timed out (TimedOut) after 2m 5s, cost $0.12. "
        "Error: TimedOut happened",
    ]
    first = store.recent(SUBJECT.namespace, SUBJECT.name)[-1]
    assert first.run is not None
    assert first.run["error"] == "Failed happened\nTraceback ..."
    assert first.run["costUSD"] == "0.12"


def rule_schedules_are_independent(store: Store) -> None:
    notes = notifier(store)
    other = NoticeSubject(SUBJECT.namespace, "other", "uid-2")
    assert notes.run_finished(SUBJECT, target(), run("a", "Failed"), now=at(0)) == [Kind.FAILED]
    # Same Job UID key, other schedule: not a repeat, no shared cooldown, no recovery.
    assert notes.run_finished(other, target(), run("a", "Failed"), now=at(1)) == [Kind.FAILED]
    assert notes.run_finished(other, target(), run("b"), now=at(2)) == [
        Kind.SUCCEEDED,
        Kind.RECOVERED,
    ]
    assert len(rows(store)) == 1
    # The same name created again is another schedule (another UID): it inherits no failure.
    again = NoticeSubject(SUBJECT.namespace, SUBJECT.name, "uid-again")
    assert notes.run_finished(again, target(), run("c"), now=at(3)) == [Kind.SUCCEEDED]


def rule_purge_drops_old_finished_notices_only(store: Store) -> None:
    notes = notifier(store)
    t = target({Kind.FAILED, Kind.SUCCEEDED}, minutes=0)
    notes.run_finished(SUBJECT, t, run("old", "Failed", ended=at(0)), now=at(0))
    notes.run_finished(SUBJECT, t, run("new", ended=at(100)), now=at(100))
    [old_failed] = [
        d for d in store.recent(SUBJECT.namespace, SUBJECT.name) if d.kind is Kind.FAILED
    ]
    store.finish(
        old_failed.id, status=Status.SENT, next_attempt_at=at(1), sent_at=at(1), last_error=None
    )
    # Waiting notices stay whatever their age; finished ones before the cut go.
    assert store.purge(at(200)) == 1
    assert rows(store) == [("Succeeded", "PENDING", False)]
    assert store.purge(at(200)) == 0


RULES: list[Callable[[Store], None]] = [
    rule_unsubscribed_kinds_store_nothing,
    rule_a_repeated_enqueue_changes_nothing,
    rule_cooldown_suppresses_firing_notices,
    rule_resolved_notices_are_never_suppressed,
    rule_recovery_follows_a_failure_notice_only,
    rule_a_flapping_schedule_sends_failed_recovered_then_nothing,
    rule_an_alert_is_cleared_by_the_next_unflagged_success,
    rule_cancelled_runs_send_nothing,
    rule_failed_results_name_the_result_and_the_error,
    rule_schedules_are_independent,
    rule_a_replayed_old_success_does_not_recover_from_a_later_pause,
    rule_content_and_holds_are_never_held_back_by_the_cooldown,
    rule_purge_drops_old_finished_notices_only,
]


@pytest.mark.parametrize("rule", RULES, ids=[r.__name__.removeprefix("rule_") for r in RULES])
def test_rules_on_the_memory_store(rule: Callable[[Store], None]) -> None:
    rule(MemoryStore())


def test_suppressed_notices_are_counted() -> None:
    counter = metrics.NOTIFICATIONS.labels("Failed", "suppressed")
    before = counter._value.get()
    notes = notifier(MemoryStore())
    notes.run_finished(SUBJECT, target(), run("a", "Failed"), now=at(0))
    notes.run_finished(SUBJECT, target(), run("b", "Failed"), now=at(1))
    assert counter._value.get() == before + 1


def test_schedule_event_takes_schedule_kinds_only() -> None:
    notes = notifier(MemoryStore())
    with pytest.raises(ValueError, match="run notices come from run_finished"):
        notes.schedule_event(SUBJECT, target(), Kind.SUCCEEDED, key="k", message="m", now=T0)
    with pytest.raises(ValueError, match="key must not be empty"):
        notes.schedule_event(SUBJECT, target(), Kind.AUTO_PAUSED, key="", message="m", now=T0)
    with pytest.raises(ValueError, match="timezone-aware"):
        notes.schedule_event(
            SUBJECT,
            target(),
            Kind.AUTO_PAUSED,
            key="k",
            message="m",
            now=datetime(2026, 1, 1),  # noqa: DTZ001
        )


def test_run_info_is_checked() -> None:
    with pytest.raises(ValueError, match=r"RunInfo\.result: .* must be a final RunOutcome"):
        replace(run("a"), result=RunOutcome.RUNNING)
    with pytest.raises(
        ValueError, match=r"RunInfo\.result: 'Succeeded' must be a final RunOutcome"
    ):
        replace(run("a"), result="Succeeded")  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="must be a Decimal"):
        replace(run("a"), cost_usd=0.1)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"RunInfo\.started_at"):
        replace(run("a"), started_at=datetime(2026, 1, 1))  # noqa: DTZ001


def test_a_failing_on_outcome_is_logged_not_raised(caplog: pytest.LogCaptureFixture) -> None:
    def broken(delivery: Delivery, result: str, detail: str) -> None:
        raise RuntimeError("event API down")

    notes = Notifier(MemoryStore(), lambda *_: "", broken)
    notes.run_finished(SUBJECT, target(), run("a", "Failed"), now=at(0))
    assert notes.run_finished(SUBJECT, target(), run("b", "Failed"), now=at(1)) == []
    assert "on_outcome failed" in caplog.text


def test_memory_store_rows_are_bounded_but_keep_the_latest_of_each_kind() -> None:
    store = MemoryStore()
    notes = notifier(store)
    t = target({Kind.FAILED, Kind.SUCCEEDED, Kind.RECOVERED}, minutes=0)
    notes.run_finished(SUBJECT, t, run("first", "Failed"), now=at(0))
    for i in range(300):
        notes.run_finished(SUBJECT, t, run(str(i)), now=at(1 + i))
        for due in store.claim_due(at(1 + i), lease=timedelta(minutes=1), limit=10):
            store.finish(
                due.id,
                status=Status.SENT,
                next_attempt_at=at(1 + i),
                sent_at=at(1 + i),
                last_error=None,
            )
    kept = store.recent(SUBJECT.namespace, SUBJECT.name, limit=1000)
    assert len(kept) == 256
    assert kept[-1].kind is Kind.FAILED  # the recovery rule still sees the last failure
    assert notes.run_finished(SUBJECT, t, run("last"), now=at(400)) == [Kind.SUCCEEDED]


# ---- targets --------------------------------------------------------------------------------


def spec(**fields: Any) -> Notifications:
    return Notifications.model_validate(fields)


def test_target_from_spec() -> None:
    ref = {"name": "slack-hook", "key": "url"}
    assert Target.from_spec(spec()) is None
    assert Target.from_spec(spec(webhookSecretRef=ref)) is None  # nothing subscribed
    t = Target.from_spec(spec(webhookSecretRef=ref, events=["Failed", "Recovered"]))
    assert t == Target(
        "slack-hook", "url", "json", timedelta(hours=1), frozenset({Kind.FAILED, Kind.RECOVERED})
    )
    slack = Target.from_spec(
        spec(webhookSecretRef=ref, events=["Alert"], cooldownMinutes=0, format="slack")
    )
    assert slack is not None
    assert slack.format == "slack"
    assert slack.cooldown == timedelta(0)
    assert slack.kinds == {Kind.ALERT}


def test_kinds_match_the_api_and_the_metric_labels() -> None:
    from nocturne_operator.api.model import NOTIFICATION_EVENTS  # noqa: PLC0415

    assert [k.value for k in Kind] == list(NOTIFICATION_EVENTS)
    assert {Kind.FAILED, Kind.AUTO_PAUSED, Kind.SILENT_STOP} == notices.FAILURE_KINDS
    samples = {
        (s.labels["kind"], s.labels["result"])
        for family in metrics.NOTIFICATIONS.collect()
        for s in family.samples
        if s.name.endswith("_total")
    }
    assert samples == {
        (k.value, r) for k in Kind for r in ("sent", "failed", "suppressed", "retried")
    }


# ---- backoff and the HTTP answer ------------------------------------------------------------


def test_retry_delay_doubles_up_to_the_cap() -> None:
    base, cap = timedelta(seconds=10), timedelta(minutes=10)
    delays = [n.retry_delay(a, base=base, cap=cap).total_seconds() for a in range(1, 9)]
    assert delays == [10, 20, 40, 80, 160, 320, 600, 600]
    assert n.retry_delay(10_000, base=base, cap=cap) == cap


def test_retry_delay_honours_retry_after_within_the_cap() -> None:
    base, cap = timedelta(seconds=10), timedelta(minutes=10)
    assert n.retry_delay(1, base=base, cap=cap, retry_after=120) == timedelta(minutes=2)
    assert n.retry_delay(1, base=base, cap=cap, retry_after=86_400) == cap
    assert n.retry_delay(3, base=base, cap=cap, retry_after=1) == timedelta(seconds=40)


def test_retry_delay_jitter_only_shortens() -> None:
    base, cap = timedelta(seconds=10), timedelta(minutes=10)
    for attempts in range(1, 12):
        plain = n.retry_delay(attempts, base=base, cap=cap)
        jittered = n.retry_delay(attempts, base=base, cap=cap, jitter=0.1)
        assert plain * 0.9 <= jittered <= plain


@pytest.mark.parametrize(
    ("code", "result"),
    [
        (200, "sent"),
        (204, "sent"),
        (301, "failed"),
        (400, "failed"),
        (403, "failed"),
        (404, "failed"),
        (408, "retried"),
        (425, "retried"),
        (429, "retried"),
        (500, "retried"),
        (503, "retried"),
    ],
)
def test_http_answers(code: int, result: str) -> None:
    answer = n._answer(code, 7.0)
    assert answer.result == result
    if result != "sent":
        assert answer.detail.startswith(f"HTTP {code} {HTTPStatus(code).phrase}")


def test_an_answer_is_told_by_its_code_alone() -> None:
    """Neither the receiver's reason phrase nor its body reach a detail (an Event)."""
    assert n._answer(599, None).detail == "HTTP 599"
    assert n._answer(500, None).detail == "HTTP 500 Internal Server Error"


def test_retry_after_takes_seconds_only() -> None:
    assert n._retry_after("120") == 120.0
    assert n._retry_after(" 5 ") == 5.0
    assert n._retry_after("Wed, 21 Oct 2026 07:28:00 GMT") is None
    assert n._retry_after(None) is None
    assert n._retry_after("-1") is None


def test_webhook_urls_must_be_http() -> None:
    good = n._webhook_url("https://hooks.slack.com/services/T0/B0/secret\n")
    assert good is not None
    assert good.path == "/services/T0/B0/secret"
    for bad in ["", "hooks.slack.com/x", "ftp://host/x", "file:///etc/passwd", "http://"]:
        assert n._webhook_url(bad) is None, bad


def test_transport_failures_are_told_in_our_words() -> None:
    """An exception's text may quote the receiver (h11 quotes a bad status line) or the URL."""
    quoted = httpx.RemoteProtocolError("illegal status line: b'SECRET-BODY'")
    assert n._transport_failure(quoted) == "RemoteProtocolError"
    refused = httpx.ConnectError("https://hooks.example/s3cr3t: nope")
    refused.__cause__ = ConnectionRefusedError(111, "Connection refused")
    assert n._transport_failure(refused) == "ConnectError: Connection refused"


def test_httpx_request_logs_show_no_webhook_path(caplog: pytest.LogCaptureFixture) -> None:
    notifier(MemoryStore())  # installs the filter
    url = httpx.URL("https://hooks.slack.com/services/T0/B0/s3cr3t")
    with caplog.at_level(logging.INFO, logger="httpx"):
        logging.getLogger("httpx").info('HTTP Request: %s %s "%s"', "POST", url, "200 OK")
    assert "s3cr3t" not in caplog.text
    assert "https://hooks.slack.com/***" in caplog.text


# ---- bodies ---------------------------------------------------------------------------------


def stored(*calls: Callable[[Notifier], object], fmt: notices.Format = "json") -> list[Delivery]:
    store = MemoryStore()
    notes = notifier(store)
    for call in calls:
        call(notes)
    found = reversed(store.recent(SUBJECT.namespace, SUBJECT.name))
    return [replace(d, format=fmt) for d in found]


def every_kind(fmt: notices.Format) -> dict[str, Delivery]:
    """One notice of each kind (and the alert all-clear), keyed by kind or "Alert/resolved"."""
    t = target(minutes=0, fmt=fmt)

    def finished(job: RunInfo, minute: int) -> Callable[[Notifier], object]:
        return lambda notes: notes.run_finished(SUBJECT, t, job, now=at(minute))

    def event(kind: Kind, minute: int) -> Callable[[Notifier], object]:
        return lambda notes: notes.schedule_event(
            SUBJECT, t, kind, key=f"k{minute}", message=f"{kind.value} <now> & then", now=at(minute)
        )

    deliveries = stored(
        finished(run("a", "Failed", error="HTTP 500 from <api>"), 0),
        finished(run("b", alert=True, reason="price < 100 & falling"), 1),
        finished(run("c"), 2),
        event(Kind.AUTO_PAUSED, 3),
        event(Kind.BUDGET_EXCEEDED, 4),
        event(Kind.SILENT_STOP, 5),
        fmt=fmt,
    )
    return {
        f"{d.kind.value}/resolved" if d.kind is Kind.ALERT and d.resolved else d.kind.value: d
        for d in deliveries
    }


def test_every_kind_renders_in_json() -> None:
    bodies = {key: webhook_bodies.json_body(d) for key, d in every_kind("json").items()}
    assert sorted(bodies) == sorted([*(k.value for k in Kind), "Alert/resolved"])
    failed = bodies["Failed"]
    assert failed == {
        "version": "nocturne.dev/v1",
        "id": failed["id"],
        "kind": "Failed",
        "state": "firing",
        "schedule": {"namespace": "news-team", "name": "daily-news", "uid": "uid-1"},
        "message": "Run daily-news-a failed (Failed) after 2m 5s, cost $0.12. "
        "Error: HTTP 500 from <api>",
        "at": "2026-11-01T09:00:00Z",
        "run": {
            "job": "daily-news-a",
            "result": "Failed",
            "costUSD": "0.12",
            "startedAt": "2026-11-01T09:00:00Z",
            "completedAt": "2026-11-01T09:02:05Z",
            "output": "Today's digest",
            "error": "HTTP 500 from <api>",
            "alertReason": None,
        },
        "text": "Failed: news-team/daily-news: Run daily-news-a failed (Failed) after 2m 5s, "
        "cost $0.12. Error: HTTP 500 from <api>",
    }
    assert bodies["Recovered"]["state"] == "resolved"
    assert bodies["Alert/resolved"]["state"] == "resolved"
    assert bodies["Alert"]["state"] == "firing"
    assert bodies["Alert"]["run"]["alertReason"] == "price < 100 & falling"
    assert bodies["AutoPaused"]["run"] is None
    assert bodies["AutoPaused"]["message"] == "AutoPaused <now> & then"
    for body in bodies.values():
        json.dumps(body)  # plain JSON: no Decimal, no datetime
        assert "\n" not in body["text"]
        assert isinstance(body["run"] is None or body["run"]["costUSD"], bool | str)


def slack_texts(body: dict[str, Any]) -> list[str]:
    texts = []
    for block in body["blocks"]:
        if "text" in block:
            texts.append(block["text"]["text"])
        texts.extend(element["text"] for element in block.get("elements", []))
    return texts


def test_every_kind_renders_for_slack_within_its_limits() -> None:
    bodies = {key: webhook_bodies.slack_body(d) for key, d in every_kind("slack").items()}
    for key, body in bodies.items():
        header = body["blocks"][0]
        assert header["type"] == "header"
        assert header["text"]["type"] == "plain_text"
        assert len(header["text"]["text"]) <= 150
        assert all(len(text) <= 3000 for text in slack_texts(body)), key
        assert "\n" not in body["text"]
    assert bodies["Failed"]["blocks"][0]["text"]["text"] == "❌ Failed: daily-news"
    assert bodies["Alert/resolved"]["blocks"][0]["text"]["text"] == "✅ Alert cleared: daily-news"
    # Succeeded carries the output, Failed the error, Alert the reason and output.
    assert "*Output*\nToday's digest" in slack_texts(bodies["Succeeded"])
    assert "*Error*\n```HTTP 500 from &lt;api&gt;```" in slack_texts(bodies["Failed"])
    alert = slack_texts(bodies["Alert"])
    assert "*Alert reason*\nprice &lt; 100 &amp; falling" in alert
    assert "*Output*\nToday's digest" in alert
    assert not any("*Output*" in t for t in slack_texts(bodies["Recovered"]))
    assert not any("*Output*" in t for t in slack_texts(bodies["Alert/resolved"]))
    # Agent and user text is escaped everywhere, including the fallback text.
    assert "AutoPaused &lt;now&gt; &amp; then" in slack_texts(bodies["AutoPaused"])
    assert bodies["AutoPaused"]["text"].endswith("AutoPaused &lt;now&gt; &amp; then")
    assert "Cost $0.12" in slack_texts(bodies["Succeeded"])[-2]


def test_slack_truncates_long_output_with_a_pointer_to_the_history() -> None:
    long = "<b>" + "x" * 20_000
    (success,) = stored(
        lambda notes: notes.run_finished(
            SUBJECT, target({Kind.SUCCEEDED}), run("a", output=long), now=T0
        ),
        fmt="slack",
    )
    assert success.run is not None
    assert len(success.run["output"].encode()) <= notices.PAYLOAD_TEXT_LIMIT_BYTES  # stored: 16 KiB
    output = slack_texts(webhook_bodies.slack_body(success))[-1]
    assert len(output) == 3000
    assert output.startswith("*Output*\n&lt;b&gt;xxx")
    assert output.endswith("… (truncated, full output: nocturne history daily-news -n news-team)")
    json_output = webhook_bodies.json_body(success)["run"]["output"]
    assert json_output.endswith(f"…[truncated, {len(long)} bytes in total]")


def test_slack_cuts_never_split_an_entity() -> None:
    escaped = webhook_bodies._slack_escape("a" * 10 + "&" * 10)
    for limit in range(11, 40):
        cut = webhook_bodies._fit(escaped, limit, "…")
        assert len(cut) <= limit
        body = cut.removesuffix("…")
        assert body.count("&") == body.count("&amp;"), cut


def test_slack_header_is_cut_to_150_characters() -> None:
    (failed,) = stored(
        lambda notes: notes.run_finished(SUBJECT, target(), run("a", "Failed"), now=T0),
        fmt="slack",
    )
    long_name = replace(failed, schedule_name="n" * 253)
    header = webhook_bodies.slack_body(long_name)["blocks"][0]["text"]["text"]
    assert len(header) == 150
    assert header.endswith("…")


def test_render_body_picks_the_format() -> None:
    (failed,) = stored(
        lambda notes: notes.run_finished(SUBJECT, target(), run("a", "Failed"), now=T0)
    )
    assert webhook_bodies.render_body(failed)["version"] == "nocturne.dev/v1"
    assert "blocks" in webhook_bodies.render_body(replace(failed, format="slack"))


def test_nul_and_lone_surrogates_are_made_storable() -> None:
    (succeeded,) = stored(
        lambda notes: notes.run_finished(
            SUBJECT, target({Kind.SUCCEEDED}), run("a", output="a\x00b\ud800c"), now=T0
        )
    )
    assert succeeded.run is not None
    assert succeeded.run["output"] == "a\ufffdb?c"


def test_delivery_status_values() -> None:
    assert [s.value for s in Status] == ["PENDING", "SENT", "FAILED", "SUPPRESSED"]


def test_the_loop_purges_at_most_hourly() -> None:
    clock = [at(0)]
    store = MemoryStore()
    notes = Notifier(
        store, lambda *_: "", lambda *_: None, clock=lambda: clock[0], retention=timedelta(days=1)
    )
    purged: list[datetime] = []
    real = store.purge

    def spy(before: datetime) -> int:
        purged.append(before)
        return real(before)

    store.purge = spy  # type: ignore[method-assign]
    for minutes in (0, 30, 61, 90, 125):
        clock[0] = at(minutes)
        asyncio.run(notes.purge_old())
    assert purged == [
        at(0) - timedelta(days=1),
        at(61) - timedelta(days=1),
        at(125) - timedelta(days=1),
    ]


# ---- the fence: which Secrets are read, which addresses are reached -------------------------


class Resolver:
    """Answers every lookup with ``addresses``; records the hosts asked for."""

    def __init__(self, *addresses: str) -> None:
        self.addresses = list(addresses)
        self.lookups: list[str] = []

    def __call__(self, host: str, port: int) -> Sequence[str]:
        self.lookups.append(host)
        return self.addresses


def deliver_once(
    url: str, *, secrets: frozenset[str] = frozenset({"hook"}), **options: Any
) -> tuple[list[tuple[str, str, str]], list[Outcome]]:
    """One failed run's notice through one delivery pass; (Secret reads, outcomes)."""
    reads: list[tuple[str, str, str]] = []
    outcomes: list[Outcome] = []

    def resolve_url(namespace: str, name: str, key: str) -> str:
        reads.append((namespace, name, key))
        return url

    def on_outcome(delivery: Delivery, result: str, detail: str) -> None:
        outcomes.append((delivery.id, delivery.kind.value, result, detail))

    notes = Notifier(
        MemoryStore(),
        resolve_url,
        on_outcome,
        clock=lambda: T0,
        webhook_secrets=secrets,
        **{"allow_private": False, **options},
    )
    notes.run_finished(SUBJECT, target({Kind.FAILED}), run("a", "Failed"), now=T0)
    assert asyncio.run(notes.deliver_due()) == 1
    return reads, outcomes


def test_a_secret_the_admin_does_not_allow_is_never_read() -> None:
    reads, [(_, _, result, detail)] = deliver_once("https://hooks.example/x", secrets=frozenset())
    assert reads == []
    assert result == "failed"
    assert detail == "Secret hook is not one the cluster admin allows for webhooks"


def test_webhook_settings_default_to_the_cluster_settings(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("NOCTURNE_WEBHOOK_SECRETS", '["team-hook"]')
    monkeypatch.setenv("NOCTURNE_WEBHOOK_ALLOW_PRIVATE", "true")
    notes = Notifier(MemoryStore(), lambda *_: "", lambda *_: None)
    assert notes.webhook_secrets == frozenset({"team-hook"})
    assert notes.allow_private is True
    monkeypatch.delenv("NOCTURNE_WEBHOOK_SECRETS")
    monkeypatch.delenv("NOCTURNE_WEBHOOK_ALLOW_PRIVATE")
    defaults = Notifier(MemoryStore(), lambda *_: "", lambda *_: None)
    assert (defaults.webhook_secrets, defaults.allow_private) == (frozenset({"slack"}), False)


@pytest.mark.parametrize(
    ("url", "allow_private", "detail"),
    [
        (
            "http://127.0.0.1:9/hook/s3cr3t",
            False,
            "refused: address 127.0.0.1 is loopback (allowed only with "
            "NOCTURNE_WEBHOOK_ALLOW_PRIVATE)",
        ),
        (
            "https://[::1]/hook/s3cr3t",
            False,
            "refused: address ::1 is loopback (allowed only with NOCTURNE_WEBHOOK_ALLOW_PRIVATE)",
        ),
        (
            "http://169.254.169.254/latest/meta-data/",
            True,
            "refused: address 169.254.169.254 is a cloud metadata endpoint",
        ),
        (
            "http://[fd00:ec2::254]/latest/meta-data/",
            True,
            "refused: address fd00:ec2::254 is a cloud metadata endpoint",
        ),
        (
            "http://100.100.100.200/latest/meta-data/",
            True,
            "refused: address 100.100.100.200 is a cloud metadata endpoint",
        ),
        (
            "https://169.254.10.10/hook/s3cr3t",
            True,
            "refused: address 169.254.10.10 is link-local (cloud metadata endpoints live here)",
        ),
        (
            "http://93.184.215.14/hook/s3cr3t",
            True,
            "refused: webhook URLs must be https (http only to private addresses, with "
            "NOCTURNE_WEBHOOK_ALLOW_PRIVATE)",
        ),
        (
            "http://10.0.0.1/hook/s3cr3t",
            False,
            "refused: address 10.0.0.1 is private (allowed only with "
            "NOCTURNE_WEBHOOK_ALLOW_PRIVATE)",
        ),
    ],
)
def test_the_address_guard_refuses_before_any_connection(
    url: str, allow_private: bool, detail: str
) -> None:
    reads, [(_, _, result, said)] = deliver_once(url, allow_private=allow_private)
    assert reads == [(SUBJECT.namespace, "hook", "url")]
    assert (result, said) == ("failed", detail)


@pytest.mark.parametrize(
    ("addresses", "detail"),
    [
        (("169.254.169.254",), "refused: the webhook's host is a cloud metadata endpoint"),
        (
            ("93.184.215.14", "fd00:ec2::254"),
            "refused: the webhook's host is a cloud metadata endpoint",
        ),
        (
            ("127.0.0.1",),
            "refused: the webhook's host is loopback (allowed only with "
            "NOCTURNE_WEBHOOK_ALLOW_PRIVATE)",
        ),
    ],
)
def test_a_name_is_judged_by_every_address_it_resolves_to(
    addresses: tuple[str, ...], detail: str
) -> None:
    """The detail (an Event the tenant reads) does not say what the name resolved to."""
    resolver = Resolver(*addresses)
    _, [(_, _, result, said)] = deliver_once("https://hooks.example/s3cr3t", resolver=resolver)
    assert (result, said) == ("failed", detail)
    assert resolver.lookups == ["hooks.example"]
    for address in addresses:
        assert address not in said


def test_an_unresolvable_host_is_retried_without_details() -> None:
    def failing(host: str, port: int) -> Sequence[str]:
        raise OSError("no such host")

    _, [(_, _, result, said)] = deliver_once("https://hooks.example/s3cr3t", resolver=failing)
    assert result == "retried"
    assert said.startswith("cannot resolve the webhook's host; attempt 1 of 6")


def test_blocked_address_errors_carry_reason_and_hint() -> None:
    error = BlockedAddressError(ipaddress.ip_address("10.0.0.1"), "private", " (hint)")
    assert (str(error), error.reason, error.hint) == (
        "address 10.0.0.1 is private (hint)",
        "private",
        " (hint)",
    )
