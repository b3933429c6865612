"""The history repository against a real PostgreSQL: every test migrates its own schema."""

from __future__ import annotations

import threading
import time
import uuid
from collections import Counter
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any
from zoneinfo import ZoneInfo

import pytest
import sqlalchemy as sa

from agent_runner.contract import RunOutcome
from harness.postgres import PostgresServer
from nocturne_operator.storage import (
    ERROR_LIMIT_BYTES,
    OUTPUT_LIMIT_BYTES,
    STATE_LIMIT_BYTES,
    STATE_OUTPUT_LIMIT_BYTES,
    CostPeriod,
    EventKind,
    ExecutionKey,
    ExecutionNotFoundError,
    History,
    HistoryError,
    HistoryUnavailableError,
    StateTooLargeError,
    redact_url,
    upgrade,
)

pytestmark = pytest.mark.integration

T0 = datetime(2026, 3, 1, 9, 0, tzinfo=UTC)


def key(
    job: str = "job-1",
    pod: str = "pod-a",
    attempt: int = 0,
    schedule: str = "daily-news",
    namespace: str = "research",
) -> ExecutionKey:
    return ExecutionKey(
        namespace=namespace,
        schedule_name=schedule,
        schedule_uid=f"uid-{schedule}",
        job_name=f"{schedule}-{job}",
        job_uid=f"juid-{job}",
        pod_uid=f"puid-{pod}",
        attempt=attempt,
    )


def start(history: History, k: ExecutionKey | None = None, at: datetime = T0) -> int:
    return history.start(k or key(), model="gpt-4o-mini", provider="openai", started_at=at)


def finish(history: History, execution_id: int, **overrides: Any) -> RunOutcome:
    values: dict[str, Any] = {
        "status": RunOutcome.SUCCEEDED,
        "completed_at": T0 + timedelta(minutes=5),
        "cost_usd": Decimal("0.5"),
        "input_tokens": 1000,
        "output_tokens": 200,
    }
    return history.finish(execution_id, **(values | overrides))


def count_rows(history: History) -> int:
    with history.engine.connect() as conn:
        return int(conn.execute(sa.text("SELECT count(*) FROM schedule_executions")).scalar_one())


# ---- start / progress / finish ---------------------------------------------------------------


def test_start_inserts_running_row_with_key(history: History) -> None:
    k = ExecutionKey("research", "daily-news", "suid", "daily-news-1", "juid", "puid", 2, "req-7")
    execution_id = history.start(k, model="claude-x", provider="anthropic", started_at=T0)
    record = history.get(execution_id)
    assert record is not None
    assert (record.namespace, record.schedule_name, record.schedule_uid) == (
        "research",
        "daily-news",
        "suid",
    )
    assert (record.job_name, record.job_uid, record.pod_uid) == ("daily-news-1", "juid", "puid")
    assert (record.attempt, record.manual_request) == (2, "req-7")
    assert record.status is RunOutcome.RUNNING
    assert record.started_at == T0
    assert record.completed_at is None
    assert record.cost_usd == Decimal(0)
    assert (record.input_tokens, record.output_tokens) == (0, 0)
    assert (record.model, record.provider) == ("claude-x", "anthropic")
    assert (record.alert, record.metadata, record.output, record.error) == (False, {}, None, None)
    assert record.updated_at.tzinfo is not None


def test_start_replayed_returns_same_row_without_resetting_it(history: History) -> None:
    first = start(history)
    history.record_progress(first, cost_usd=Decimal("0.25"), input_tokens=10, output_tokens=5)
    again = start(history, at=T0 + timedelta(minutes=3))
    assert again == first
    assert count_rows(history) == 1
    record = history.get(first)
    assert record is not None
    assert record.cost_usd == Decimal("0.25")
    assert record.started_at == T0


def test_start_after_finish_never_brings_back_running(history: History) -> None:
    execution_id = start(history)
    finish(history, execution_id, status="FAILED", error="boom")
    assert start(history) == execution_id
    record = history.get(execution_id)
    assert record is not None
    assert record.status is RunOutcome.FAILED
    assert record.error == "boom"


def test_concurrent_starts_of_one_attempt_make_one_row(history: History) -> None:
    barrier = threading.Barrier(6)
    ids: list[int] = []

    def worker() -> None:
        barrier.wait()
        ids.append(start(history))

    threads = [threading.Thread(target=worker) for _ in range(6)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(ids) == 6
    assert len(set(ids)) == 1
    assert count_rows(history) == 1


def test_start_refuses_a_key_that_belongs_to_another_schedule(history: History) -> None:
    start(history, key(schedule="a"))
    other = ExecutionKey("research", "b", "uid-b", "b-job", "juid-job-1", "puid-pod-a", 0)
    with pytest.raises(HistoryError, match=r"already belongs to execution \d+ of research/a"):
        start(history, other)


def test_start_validates_its_inputs() -> None:
    with pytest.raises(ValueError, match=r"ExecutionKey.job_uid: '' must be a non-empty string"):
        ExecutionKey("ns", "s", "suid", "job", "", "puid", 0)
    with pytest.raises(ValueError, match=r"ExecutionKey.attempt: -1 must be an integer >= 0"):
        ExecutionKey("ns", "s", "suid", "job", "juid", "puid", -1)


def test_start_rejects_naive_datetime(history: History) -> None:
    with pytest.raises(ValueError, match=r"started_at: .* must be a timezone-aware datetime"):
        start(history, at=datetime(2026, 1, 1))  # noqa: DTZ001 - the point of the test


def test_record_progress_never_lowers_cost_or_tokens(history: History) -> None:
    execution_id = start(history)
    history.record_progress(
        execution_id, cost_usd=Decimal("0.30"), input_tokens=100, output_tokens=10
    )
    first = history.get(execution_id)
    assert first is not None
    time.sleep(0.01)
    history.record_progress(
        execution_id, cost_usd=Decimal("0.20"), input_tokens=50, output_tokens=5
    )
    record = history.get(execution_id)
    assert record is not None
    assert (record.cost_usd, record.input_tokens, record.output_tokens) == (
        Decimal("0.3"),
        100,
        10,
    )
    history.record_progress(
        execution_id, cost_usd=Decimal("0.4"), input_tokens=100, output_tokens=90
    )
    record = history.get(execution_id)
    assert record is not None
    assert (record.cost_usd, record.input_tokens, record.output_tokens) == (
        Decimal("0.4"),
        100,
        90,
    )
    assert record.updated_at > first.updated_at
    assert record.status is RunOutcome.RUNNING


def test_record_progress_after_finish_changes_nothing(history: History) -> None:
    execution_id = start(history)
    finish(history, execution_id, cost_usd=Decimal("0.5"))
    history.record_progress(execution_id, cost_usd=Decimal("9"), input_tokens=9, output_tokens=9)
    record = history.get(execution_id)
    assert record is not None
    assert (record.status, record.cost_usd) == (RunOutcome.SUCCEEDED, Decimal("0.5"))


def test_record_progress_and_finish_of_unknown_execution(history: History) -> None:
    with pytest.raises(ExecutionNotFoundError, match="record progress of execution 999"):
        history.record_progress(999, cost_usd=Decimal(0), input_tokens=0, output_tokens=0)
    with pytest.raises(ExecutionNotFoundError, match="finish execution 999 as SUCCEEDED"):
        finish(history, 999)


def test_money_is_decimal_rounded_up_to_micro_usd(history: History) -> None:
    execution_id = start(history)
    history.record_progress(
        execution_id, cost_usd=Decimal("0.0000001"), input_tokens=1, output_tokens=0
    )
    record = history.get(execution_id)
    assert record is not None
    assert record.cost_usd == Decimal("0.000001")
    with pytest.raises(TypeError, match=r"cost_usd: 0\.5 must be a Decimal"):
        history.record_progress(execution_id, cost_usd=0.5, input_tokens=1, output_tokens=0)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="cost_usd: -1 must be a finite amount >= 0"):
        history.record_progress(execution_id, cost_usd=Decimal(-1), input_tokens=1, output_tokens=0)
    with pytest.raises(ValueError, match="cost_usd: NaN must be a finite amount"):
        finish(history, execution_id, cost_usd=Decimal("NaN"))
    with pytest.raises(ValueError, match="exceeds the largest storable amount"):
        finish(history, execution_id, cost_usd=Decimal("1e9"))
    with pytest.raises(ValueError, match="output_tokens: -3 must be an integer between 0"):
        finish(history, execution_id, output_tokens=-3)


def test_finish_records_everything_about_a_failed_run(history: History) -> None:
    execution_id = start(history)
    done = T0 + timedelta(seconds=42)
    status = history.finish(
        execution_id,
        status=RunOutcome.BUDGET_EXCEEDED,
        completed_at=done,
        cost_usd=Decimal("1.999999"),
        input_tokens=12_345,
        output_tokens=678,
        output="partial digest",
        error="budget of 2.00 USD exhausted after 3 calls",
        alert=True,
        alert_reason="price of X dropped 40%",
        metadata={"steps": 3, "tools": ["web_fetch"], "note": "日本語"},
    )
    assert status is RunOutcome.BUDGET_EXCEEDED
    record = history.get(execution_id)
    assert record is not None
    assert record.status is RunOutcome.BUDGET_EXCEEDED
    assert record.completed_at == done
    assert record.cost_usd == Decimal("1.999999")
    assert (record.input_tokens, record.output_tokens) == (12_345, 678)
    assert record.output == "partial digest"
    assert record.error == "budget of 2.00 USD exhausted after 3 calls"
    assert (record.alert, record.alert_reason) == (True, "price of X dropped 40%")
    assert record.metadata == {"steps": 3, "tools": ["web_fetch"], "note": "日本語"}


def test_finish_is_idempotent_and_the_first_final_status_wins(history: History) -> None:
    execution_id = start(history)
    assert finish(history, execution_id, output="digest") is RunOutcome.SUCCEEDED
    assert finish(history, execution_id, output="digest") is RunOutcome.SUCCEEDED
    # A late finish by someone else (the reaper, a SIGTERM handler) keeps the outcome ...
    late = finish(
        history,
        execution_id,
        status="FAILED",
        error="reaped",
        output=None,
        cost_usd=Decimal("0.75"),
        input_tokens=1500,
    )
    assert late is RunOutcome.SUCCEEDED
    record = history.get(execution_id)
    assert record is not None
    assert (record.status, record.output, record.error) == (
        RunOutcome.SUCCEEDED,
        "digest",
        None,
    )
    # ... but money really spent still shows: cost and tokens only rise.
    assert (record.cost_usd, record.input_tokens, record.output_tokens) == (
        Decimal("0.75"),
        1500,
        200,
    )
    assert finish(history, execution_id, cost_usd=Decimal("0.1")) is RunOutcome.SUCCEEDED
    record = history.get(execution_id)
    assert record is not None
    assert record.cost_usd == Decimal("0.75")


def test_finish_refuses_metadata_postgresql_cannot_store(history: History) -> None:
    execution_id = start(history)
    with pytest.raises(ValueError, match=r"finish\(\): metadata is not storable JSON"):
        finish(history, execution_id, metadata={"when": datetime.now(UTC)})
    with pytest.raises(ValueError, match="contains a NUL character"):
        finish(history, execution_id, metadata={"x": "\x00"})
    record = history.get(execution_id)
    assert record is not None
    assert record.status is RunOutcome.RUNNING


def test_finish_refuses_running(history: History) -> None:
    execution_id = start(history)
    with pytest.raises(ValueError, match="status RUNNING is not a final status"):
        finish(history, execution_id, status="RUNNING")
    with pytest.raises(ValueError, match="'DONE' is not a valid RunOutcome"):
        finish(history, execution_id, status="DONE")


def test_finish_stores_any_text_and_cuts_huge_output(history: History) -> None:
    execution_id = start(history)
    output = "é" * OUTPUT_LIMIT_BYTES  # 2 bytes each: twice the limit
    history.finish(
        execution_id,
        status="FAILED",
        completed_at=T0,
        cost_usd=Decimal(0),
        input_tokens=0,
        output_tokens=0,
        output=output,
        error="nul \x00 and a lone surrogate \ud800" + "x" * ERROR_LIMIT_BYTES,
    )
    record = history.get(execution_id)
    assert record is not None
    assert record.output is not None
    assert record.error is not None
    assert len(record.output.encode()) <= OUTPUT_LIMIT_BYTES
    assert record.output.startswith("éé")
    assert record.output.endswith(f"…[truncated, {2 * OUTPUT_LIMIT_BYTES} bytes in total]")
    assert record.error.startswith("nul \ufffd and a lone surrogate ?x")
    assert len(record.error.encode()) <= ERROR_LIMIT_BYTES


def test_runs_leave_output_out_unless_asked(history: History) -> None:
    execution_id = start(history)
    finish(history, execution_id, output="the digest")
    assert history.runs("research", "daily-news")[0].output is None
    assert history.runs("research", "daily-news", include_output=True)[0].output == "the digest"
    record = history.get(execution_id, include_output=False)
    assert record is not None
    assert record.output is None


# ---- retries share one budget ---------------------------------------------------------------


def test_spent_for_job_sums_every_attempt(history: History) -> None:
    assert history.spent_for_job("juid-job-1") == Decimal(0)
    first = start(history, key(pod="a", attempt=0))
    finish(history, first, status="FAILED", cost_usd=Decimal("0.70"))
    second = start(history, key(pod="b", attempt=1))
    assert history.spent_for_job("juid-job-1") == Decimal("0.7")
    assert history.spent_for_job("juid-job-1", exclude_pod_uid="puid-b") == Decimal("0.7")
    history.record_progress(second, cost_usd=Decimal("0.2"), input_tokens=1, output_tokens=1)
    assert history.spent_for_job("juid-job-1") == Decimal("0.9")
    assert history.spent_for_job("juid-job-1", exclude_pod_uid="puid-b") == Decimal("0.7")
    other = start(history, key(job="job-2", pod="c"))
    history.record_progress(other, cost_usd=Decimal("5"), input_tokens=1, output_tokens=1)
    assert history.spent_for_job("juid-job-1") == Decimal("0.9")
    assert [r.attempt for r in history.for_job("juid-job-1")] == [0, 1]
    assert isinstance(history.spent_for_job("juid-job-2"), Decimal)


def test_state_round_trip(history: History) -> None:
    assert history.load_state("research", "daily-news") is None
    execution_id = start(history)
    state = {"prices": {"X": "12.30", "Y": [1, 2.5, None, True]}, "seen": "日本語 😀"}
    history.save_state(
        "research", "daily-news", state=state, output="yesterday", execution_id=execution_id
    )
    saved = history.load_state("research", "daily-news")
    assert saved is not None
    assert saved.state == state
    assert saved.output == "yesterday"
    assert saved.execution_id == execution_id
    assert saved.updated_at.tzinfo is not None

    history.save_state("research", "daily-news", state={"v": 2}, output=None, execution_id=None)
    saved = history.load_state("research", "daily-news")
    assert saved is not None
    assert (saved.state, saved.output, saved.execution_id) == ({"v": 2}, None, None)
    # A state key and another schedule are separate documents.
    history.save_state("research", "daily-news", "eu", state=[1], output="x", execution_id=None)
    eu = history.load_state("research", "daily-news", "eu")
    assert eu is not None
    assert eu.state == [1]
    assert history.load_state("research", "other") is None
    assert history.load_state("other-ns", "daily-news") is None


def test_state_belongs_to_the_incarnation_that_saved_it(history: History) -> None:
    """A schedule deleted and re-created under its name does not receive its predecessor's
    state; state saved before UIDs were kept (0005) still reaches the name's schedule."""
    history.save_state("research", "news", state={"old": 1}, output="o", execution_id=None)
    legacy = history.load_state("research", "news", schedule_uid="uid-old")
    assert legacy is not None
    assert legacy.state == {"old": 1}
    # The old incarnation saves; then the new one's first success replaces it, and the old one
    # would no longer see it. Each time only the saver's UID receives the state.
    for saver, other, state in (("uid-old", "uid-new", {"v": 1}), ("uid-new", "uid-old", {"v": 2})):
        history.save_state(
            "research", "news", state=state, output=None, execution_id=None, schedule_uid=saver
        )
        assert history.load_state("research", "news", schedule_uid=other) is None
        mine = history.load_state("research", "news", schedule_uid=saver)
        assert mine is not None
        assert mine.state == state


def test_state_size_limits_are_enforced_with_clear_errors(history: History) -> None:
    # {"k":"..."} is 8 bytes of framing: exactly at the limit is fine.
    history.save_state(
        "ns",
        "s",
        state={"k": "a" * (STATE_LIMIT_BYTES - 8)},
        output="o" * STATE_OUTPUT_LIMIT_BYTES,
        execution_id=None,
    )
    with pytest.raises(
        StateTooLargeError,
        match=r"agent state of ns/s \(stateKey 'big'\) is 65537 bytes as compact JSON; "
        r"the limit is 65536 bytes",
    ):
        history.save_state(
            "ns", "s", "big", state={"k": "a" * (STATE_LIMIT_BYTES - 7)}, output=None,
            execution_id=None,
        )  # fmt: skip
    with pytest.raises(StateTooLargeError, match=r"output is 262145 bytes; the limit is 262144"):
        history.save_state(
            "ns", "s", "big", state={}, output="o" * (STATE_OUTPUT_LIMIT_BYTES + 1),
            execution_id=None,
        )  # fmt: skip
    with pytest.raises(StateTooLargeError, match="is not storable JSON: Out of range float"):
        history.save_state(
            "ns", "s", "big", state={"x": float("nan")}, output=None, execution_id=None
        )
    with pytest.raises(StateTooLargeError, match="NUL character"):
        history.save_state("ns", "s", "big", state={"x": "a\x00"}, output=None, execution_id=None)
    with pytest.raises(StateTooLargeError, match="NUL character"):
        history.save_state("ns", "s", "big", state={"x": "\\\x00"}, output=None, execution_id=None)
    history.save_state("ns", "s", "text", state={"x": "\\u0000"}, output=None, execution_id=None)
    text = history.load_state("ns", "s", "text")
    assert text is not None
    assert text.state == {"x": "\\u0000"}
    with pytest.raises(StateTooLargeError, match="is not storable JSON"):
        history.save_state("ns", "s", "big", state={"x": object()}, output=None, execution_id=None)
    assert history.load_state("ns", "s", "big") is None


def test_state_must_point_at_an_existing_execution(history: History) -> None:
    with pytest.raises(HistoryError, match=r"save agent state of ns/s .*fk_agent_state_execution"):
        history.save_state("ns", "s", state={}, output=None, execution_id=12345)


# ---- runs(): filters and keyset pagination ----------------------------------------------------


def seed_runs(history: History, n: int = 25) -> list[int]:
    """n runs of research/daily-news an hour apart (every third FAILED) plus noise elsewhere."""
    ids = []
    for i in range(n):
        execution_id = start(history, key(job=f"j{i}", pod=f"p{i}"), at=T0 + timedelta(hours=i))
        status = "FAILED" if i % 3 == 0 else "SUCCEEDED"
        finish(
            history, execution_id, status=status, completed_at=T0 + timedelta(hours=i, minutes=1)
        )
        ids.append(execution_id)
    start(history, key(job="other", pod="o1", schedule="other"), at=T0 + timedelta(hours=1))
    start(history, key(job="ns2", pod="n1", namespace="ops"), at=T0 + timedelta(hours=1))
    return ids


def test_runs_newest_first_and_filtered(history: History) -> None:
    ids = seed_runs(history)
    page = history.runs("research", "daily-news", limit=10)
    assert [r.id for r in page] == ids[::-1][:10]
    assert [r.started_at for r in page] == sorted((r.started_at for r in page), reverse=True)

    window = history.runs(
        "research", "daily-news", since=T0 + timedelta(hours=5), until=T0 + timedelta(hours=8)
    )
    assert [r.id for r in window] == [ids[7], ids[6], ids[5]]  # since inclusive, until exclusive

    failed = history.runs("research", "daily-news", status="FAILED", limit=100)
    assert [r.id for r in failed] == [ids[i] for i in range(24, -1, -1) if i % 3 == 0]
    both = history.runs("research", "daily-news", status=[RunOutcome.FAILED, "RUNNING"], limit=100)
    assert len(both) == 9
    assert history.runs("research", "daily-news", status="CANCELLED") == []
    assert [r.schedule_name for r in history.runs("research", "other")] == ["other"]
    assert [r.namespace for r in history.runs("ops", "daily-news")] == ["ops"]


def test_runs_keyset_pages_cover_everything_once(history: History) -> None:
    ids = seed_runs(history)
    # Three runs started at the same instant: ties are ordered by id.
    same = T0 + timedelta(hours=12, minutes=30)
    tied = [start(history, key(job=f"tie{i}", pod=f"t{i}"), at=same) for i in range(3)]
    expected = sorted(
        [(T0 + timedelta(hours=i), ids[i]) for i in range(25)] + [(same, t) for t in tied],
        reverse=True,
    )
    seen: list[int] = []
    before: int | None = None
    while True:
        page = history.runs("research", "daily-news", limit=4, before_id=before)
        if not page:
            break
        seen += [r.id for r in page]
        before = page[-1].id
    assert seen == [execution_id for _, execution_id in expected]

    filtered: list[int] = []
    before = None
    while page := history.runs(
        "research", "daily-news", status="FAILED", limit=2, before_id=before
    ):
        filtered += [r.id for r in page]
        before = page[-1].id
    assert filtered == [ids[i] for i in range(24, -1, -1) if i % 3 == 0]


def test_runs_rejects_bad_arguments(history: History) -> None:
    ids = seed_runs(history, 2)
    with pytest.raises(ValueError, match="before_id: 999 is not a run of research/daily-news"):
        history.runs("research", "daily-news", before_id=999)
    with pytest.raises(ValueError, match=r"before_id: \d+ is not a run of research/other"):
        history.runs("research", "other", before_id=ids[0])
    with pytest.raises(ValueError, match="limit: 0 must be between 1 and 1000"):
        history.runs("research", "daily-news", limit=0)
    with pytest.raises(ValueError, match="'BOGUS' is not a valid RunOutcome"):
        history.runs("research", "daily-news", status="BOGUS")
    with pytest.raises(ValueError, match=r"since: .* must be a timezone-aware datetime"):
        history.runs("research", "daily-news", since=datetime(2026, 1, 1))  # noqa: DTZ001


# ---- cost(): calendar periods in a time zone, across DST ---------------------------------------


NEW_YORK = ZoneInfo("America/New_York")


def seed_costs(history: History, runs: list[tuple[str, str]]) -> None:
    for i, (started, cost) in enumerate(runs):
        at = datetime.fromisoformat(started)
        execution_id = start(history, key(job=f"c{i}", pod=f"c{i}"), at=at)
        finish(history, execution_id, completed_at=at, cost_usd=Decimal(cost))


# US DST starts 2026-03-08 02:00 EST (-05:00 -> -04:00) and ends 2026-11-01 02:00 EDT.
DST_RUNS = [
    ("2026-03-08T04:30:00+00:00", "1.000000"),  # Sat 03-07 23:30 EST
    ("2026-03-08T05:30:00+00:00", "0.200000"),  # Sun 03-08 00:30 EST
    ("2026-03-08T06:59:00+00:00", "0.030000"),  # Sun 03-08 01:59 EST, last minute before the gap
    ("2026-03-09T03:30:00+00:00", "0.004000"),  # Sun 03-08 23:30 EDT
    ("2026-03-09T04:30:00+00:00", "0.000500"),  # Mon 03-09 00:30 EDT
    ("2026-04-01T03:59:00+00:00", "0.000060"),  # Tue 03-31 23:59 EDT
    ("2026-04-01T04:00:00+00:00", "0.000007"),  # Wed 04-01 00:00 EDT
    ("2026-11-01T05:30:00+00:00", "2.000000"),  # Sun 11-01 01:30 EDT (first 01:30)
    ("2026-11-01T06:30:00+00:00", "3.000000"),  # Sun 11-01 01:30 EST (the repeated hour)
    ("2026-11-02T04:30:00+00:00", "4.000000"),  # Sun 11-01 23:30 EST
]


def local(text: str) -> datetime:
    return datetime.fromisoformat(text).replace(tzinfo=NEW_YORK)


def test_cost_by_day_in_a_zone_across_dst(history: History) -> None:
    seed_costs(history, DST_RUNS)
    days = history.cost("research", "daily-news", by="day", tz="America/New_York")
    assert days == [
        CostPeriod(local("2026-03-07T00:00"), Decimal("1")),
        CostPeriod(local("2026-03-08T00:00"), Decimal("0.234")),
        CostPeriod(local("2026-03-09T00:00"), Decimal("0.0005")),
        CostPeriod(local("2026-03-31T00:00"), Decimal("0.00006")),
        CostPeriod(local("2026-04-01T00:00"), Decimal("0.000007")),
        CostPeriod(local("2026-11-01T00:00"), Decimal("9")),
    ]
    # Each period starts at local midnight with that day's offset (EST before, EDT after).
    assert [d.period_start.utcoffset() for d in days[:3]] == [
        timedelta(hours=-5),
        timedelta(hours=-5),
        timedelta(hours=-4),
    ]
    assert days[0].period_start.tzinfo == NEW_YORK
    assert [d.period_start.isoformat() for d in days[-1:]] == ["2026-11-01T00:00:00-04:00"]


def test_cost_by_week_and_month_in_a_zone_across_dst(history: History) -> None:
    seed_costs(history, DST_RUNS)
    weeks = history.cost("research", "daily-news", by="week", tz="America/New_York")
    assert weeks == [
        CostPeriod(local("2026-03-02T00:00"), Decimal("1.234")),  # Mon 03-02 .. Sun 03-08
        CostPeriod(local("2026-03-09T00:00"), Decimal("0.0005")),
        CostPeriod(local("2026-03-30T00:00"), Decimal("0.000067")),
        CostPeriod(local("2026-10-26T00:00"), Decimal("9")),  # Mon 10-26 .. Sun 11-01
    ]
    months = history.cost("research", "daily-news", by="month", tz="America/New_York")
    assert months == [
        CostPeriod(local("2026-03-01T00:00"), Decimal("1.23456")),
        CostPeriod(local("2026-04-01T00:00"), Decimal("0.000007")),
        CostPeriod(local("2026-11-01T00:00"), Decimal("9")),
    ]
    assert [m.period_start.utcoffset() for m in months] == [
        timedelta(hours=-5),
        timedelta(hours=-4),
        timedelta(hours=-4),
    ]


def test_cost_depends_on_the_zone_and_the_window(history: History) -> None:
    seed_costs(history, DST_RUNS)
    utc_days = history.cost("research", "daily-news", by="day")
    assert utc_days[:2] == [
        CostPeriod(datetime(2026, 3, 8, tzinfo=UTC), Decimal("1.23")),
        CostPeriod(datetime(2026, 3, 9, tzinfo=UTC), Decimal("0.0045")),
    ]
    assert sum(d.cost_usd for d in utc_days) == Decimal("10.234567")
    windowed = history.cost(
        "research",
        "daily-news",
        since=local("2026-03-08T00:00"),
        until=local("2026-04-01T00:00"),
        by="month",
        tz="America/New_York",
    )
    assert windowed == [CostPeriod(local("2026-03-01T00:00"), Decimal("0.23456"))]
    assert history.total_cost("research", "daily-news") == Decimal("10.234567")
    assert history.total_cost("research", "daily-news", since=local("2026-11-01T00:00")) == Decimal(
        "9"
    )
    assert history.cost("research", "nothing-here") == []
    assert history.total_cost("research", "nothing-here") == Decimal(0)


def test_cost_rejects_bad_arguments(history: History) -> None:
    with pytest.raises(ValueError, match="by: 'year' must be one of day, week, month"):
        history.cost("ns", "s", by="year")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="tz: 'Mars/Olympus' is not an IANA time zone name"):
        history.cost("ns", "s", tz="Mars/Olympus")


# ---- audit events, the reaper's query --------------------------------------------------------


def test_record_event_and_read_events(history: History) -> None:
    first = history.record_event(
        "research",
        "daily-news",
        EventKind.CREATED,
        actor="alice",
        schedule_uid="suid",
        at=T0,
    )
    second = history.record_event(
        "research",
        "daily-news",
        "auto_paused",
        reason="3 consecutive failures",
        details={"failures": 3, "jobs": ["a", "b", "c"]},
        at=T0 + timedelta(hours=1),
    )
    history.record_event("research", "other", "deleted")
    events = history.events("research", "daily-news")
    assert [e.id for e in events] == [second, first]
    assert (events[0].kind, events[0].reason, events[0].details) == (
        "auto_paused",
        "3 consecutive failures",
        {"failures": 3, "jobs": ["a", "b", "c"]},
    )
    assert (events[1].kind, events[1].actor, events[1].schedule_uid, events[1].at) == (
        "created",
        "alice",
        "suid",
        T0,
    )
    assert events[1].details == {}
    assert [e.id for e in history.events("research", "daily-news", since=T0 + timedelta(1))] == []
    assert [e.id for e in history.events("research", "daily-news", until=T0 + timedelta(1))] == [
        second,
        first,
    ]
    now_event = history.events("research", "other")[0]
    assert abs(now_event.at - datetime.now(UTC)) < timedelta(minutes=5)
    with pytest.raises(ValueError, match="kind: 'Auto-Paused' must be lower_snake_case"):
        history.record_event("research", "daily-news", "Auto-Paused")


def test_a_schedule_is_created_and_deleted_once_in_the_audit_trail(
    history: History, postgres: PostgresServer
) -> None:
    """kopf may report one creation twice under load: the trail keeps the first (issue 18)."""
    created = [
        history.record_event("research", "news", EventKind.CREATED, schedule_uid="uid-1")
        for _ in range(3)
    ]
    assert len(set(created)) == 1
    # Another incarnation of the name is another schedule; other kinds repeat as they happen.
    history.record_event("research", "news", EventKind.CREATED, schedule_uid="uid-2")
    history.record_event("research", "news", EventKind.UPDATED, schedule_uid="uid-1")
    history.record_event("research", "news", EventKind.UPDATED, schedule_uid="uid-1")
    deleted = {
        history.record_event("research", "news", EventKind.DELETED, schedule_uid="uid-1")
        for _ in range(2)
    }
    assert len(deleted) == 1
    kinds = Counter((e.schedule_uid, e.kind) for e in history.events("research", "news"))
    assert kinds == {
        ("uid-1", "created"): 1,
        ("uid-2", "created"): 1,
        ("uid-1", "updated"): 2,
        ("uid-1", "deleted"): 1,
    }


def test_migration_0004_keeps_the_first_of_repeated_creations(postgres: PostgresServer) -> None:
    schema = f"t_{uuid.uuid4().hex[:12]}"
    url = postgres.fresh_schema(schema)
    upgrade(url, "0003")
    engine = sa.create_engine(url, poolclass=sa.NullPool)
    insert = sa.text(
        "INSERT INTO schedule_events (namespace, schedule_name, schedule_uid, kind)"
        " VALUES ('research', 'news', :uid, :kind)"
    )
    with engine.begin() as conn:
        for uid, kind in [
            ("u1", "created"),
            ("u1", "created"),
            ("u1", "paused"),
            ("u1", "paused"),
            ("u2", "created"),
            ("u1", "deleted"),
            ("u1", "deleted"),
        ]:
            conn.execute(insert, {"uid": uid, "kind": kind})
        first = conn.execute(
            sa.text(
                "SELECT min(id) FROM schedule_events WHERE kind = 'created' AND schedule_uid = 'u1'"
            )
        ).scalar_one()
    upgrade(url)
    with engine.connect() as conn:
        rows = conn.execute(
            sa.text("SELECT schedule_uid, kind, id FROM schedule_events ORDER BY id")
        ).all()
    engine.dispose()
    kinds = Counter((uid, kind) for uid, kind, _ in rows)
    assert kinds == {
        ("u1", "created"): 1,
        ("u1", "paused"): 2,
        ("u2", "created"): 1,
        ("u1", "deleted"): 1,
    }
    assert first in {row_id for _, kind, row_id in rows if kind == "created"}


def test_stuck_running_lists_old_unfinished_executions(history: History) -> None:
    now = datetime.now(UTC)
    old = start(history, key(job="old", pod="o"), at=now - timedelta(hours=3))
    start(history, key(job="new", pod="n"), at=now - timedelta(minutes=1))
    done = start(history, key(job="done", pod="d"), at=now - timedelta(hours=4))
    finish(history, done)
    older = start(history, key(job="older", pod="x"), at=now - timedelta(hours=5))
    stuck = history.stuck_running(timedelta(hours=1))
    assert [r.id for r in stuck] == [older, old]
    assert all(r.status is RunOutcome.RUNNING for r in stuck)
    assert [r.id for r in history.stuck_running(timedelta(hours=1), limit=1)] == [older]


# ---- connection handling ---------------------------------------------------------------------


def test_unreachable_database_fails_fast_without_leaking_the_password(
    postgres: PostgresServer,
) -> None:
    dead = postgres.url.replace(f":{postgres.port}/", ":1/")
    t0 = time.monotonic()
    with (
        History.connect(dead, connect_timeout=2) as repo,
        pytest.raises(HistoryUnavailableError) as caught,
    ):
        start(repo)
    assert time.monotonic() - t0 < 5
    message = str(caught.value)
    assert message.startswith("start execution of research/daily-news job daily-news-job-1:")
    assert postgres.password not in message
    assert f"nocturne:***@127.0.0.1:1/{postgres.database}" in message
    assert "unavailable" in message


def test_wrong_password_is_reported_without_it(postgres: PostgresServer) -> None:
    wrong = postgres.url.replace(postgres.password, "s3cret-wrong")
    with History.connect(wrong) as repo, pytest.raises(HistoryUnavailableError) as caught:
        repo.spent_for_job("j")
    assert "password authentication failed" in str(caught.value)
    assert "s3cret-wrong" not in str(caught.value)
    with pytest.raises(HistoryError) as bad:
        upgrade(wrong, connect_timeout=2)
    assert "s3cret-wrong" not in str(bad.value)


def test_session_settings_keep_the_url_options(url: str) -> None:
    repo = History.connect(url, statement_timeout_ms=1234, application_name="runner-x")
    with repo, repo.engine.connect() as conn:
        assert conn.execute(sa.text("SHOW statement_timeout")).scalar_one() == "1234ms"
        assert conn.execute(sa.text("SHOW application_name")).scalar_one() == "runner-x"
        search_path = conn.execute(sa.text("SHOW search_path")).scalar_one()
        assert sa.make_url(url).query["options"] == f"-csearch_path={search_path}"


def test_redact_url() -> None:
    assert redact_url("postgresql+psycopg://u:hunter2@db:5432/x") == (
        "postgresql+psycopg://u:***@db:5432/x"
    )
    assert redact_url(sa.make_url("postgresql://u:p%40ss@db/x")) == "postgresql://u:***@db/x"
    assert "hunter2" not in redact_url("postgresql://u:hunter2@db:notaport/x")
    assert redact_url("postgresql://db/x") == "postgresql://db/x"
    with pytest.raises(
        HistoryError, match=r"database URL mysql://u:\*\*\*@db/x: the history needs"
    ):
        History.connect("mysql://u:pw@db/x")
