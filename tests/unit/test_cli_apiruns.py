"""The CLI's runs through the agentruns API (issue 17): an AgentRun reads back as the record the
reports print, and cost periods are cut as PostgreSQL's date_trunc cuts them in a zone."""

from __future__ import annotations

from dataclasses import replace
from datetime import UTC, datetime
from decimal import Decimal
from zoneinfo import ZoneInfo

import pytest

from agent_runner.contract import RunOutcome
from nocturne_operator.cli.apiruns import RunsApiError, _period, from_agent_run
from nocturne_operator.runsapi.resources import agent_run
from nocturne_operator.storage import ExecutionRecord

RECORD = ExecutionRecord(
    id=10412,
    namespace="research",
    schedule_name="daily-ai-news",
    schedule_uid="uid-1",
    job_name="daily-ai-news-29412345",
    job_uid="job-uid",
    pod_uid="pod-uid",
    attempt=1,
    manual_request="r1",
    status=RunOutcome.SUCCEEDED,
    started_at=datetime(2026, 12, 3, 0, 0, 4, tzinfo=UTC),
    completed_at=datetime(2026, 12, 3, 0, 0, 45, tzinfo=UTC),
    cost_usd=Decimal("0.0042"),
    input_tokens=1234,
    output_tokens=56,
    model="gpt-4o-mini",
    provider="openai",
    error=None,
    output="# Digest",
    alert=True,
    alert_reason="Lab B raised",
    metadata={
        "steps": 3,
        "toolCalls": [{"step": 1, "tool": "web_fetch", "target": "news.test", "ok": True}],
        "resumedFromStep": 2,
    },
    updated_at=datetime(2026, 12, 3, 0, 0, 45, tzinfo=UTC),
    granted_usd=Decimal("0.5"),
    revision=99,
)


def test_an_agent_run_reads_back_as_the_record_it_shows() -> None:
    back = from_agent_run(agent_run(RECORD, with_output=True))
    # What the API does not show: the pod, the grant, when the row was last written.
    expected = replace(RECORD, pod_uid="", granted_usd=None, updated_at=RECORD.started_at)
    assert back == expected
    listed = from_agent_run(agent_run(RECORD))  # a list: no output, no tool calls
    assert (listed.output, listed.metadata) == (None, {"steps": 3})


def test_an_object_that_is_not_a_run_is_an_error() -> None:
    obj = agent_run(RECORD)
    obj["status"]["result"] = "Exploded"
    with pytest.raises(RunsApiError, match="not a run"):
        from_agent_run(obj)


@pytest.mark.parametrize(
    ("moment", "by", "start"),
    [
        # Thursday 3 Dec 2026, 08:30 in Tokyo.
        ("2026-12-02T23:30:00+00:00", "day", "2026-12-03T00:00:00+09:00"),
        ("2026-12-02T23:30:00+00:00", "week", "2026-11-30T00:00:00+09:00"),
        ("2026-12-02T23:30:00+00:00", "month", "2026-12-01T00:00:00+09:00"),
    ],
)
def test_periods_start_at_local_midnight(moment: str, by: str, start: str) -> None:
    local = datetime.fromisoformat(moment).astimezone(ZoneInfo("Asia/Tokyo"))
    assert _period(local, by) == datetime.fromisoformat(start)


def test_a_month_across_a_dst_change_starts_at_its_own_offset() -> None:
    """31 Mar 2026 in Berlin is summer time (+02:00); its month began in winter (+01:00)."""
    local = datetime(2026, 3, 31, 12, tzinfo=ZoneInfo("Europe/Berlin"))
    start = _period(local, "month")
    assert start.utcoffset() is not None
    assert start.astimezone(UTC) == datetime(2026, 2, 28, 23, tzinfo=UTC)
