"""Stored texts (provider errors, outputs, condition messages) reach people's terminals: their
escape sequences are shown, never obeyed (issue 12)."""

from __future__ import annotations

from datetime import UTC, datetime
from decimal import Decimal
from typing import Any

from agent_runner.contract import RunOutcome
from nocturne_operator.cli import reports
from nocturne_operator.storage import ExecutionRecord

EVIL = "\x1b]0;pwned\x07\x1b[31mred\x1b[0m\r\x08\x9b2J"


def record(**fields: Any) -> ExecutionRecord:
    values: dict[str, Any] = {
        "id": 1,
        "namespace": "research",
        "schedule_name": "digest",
        "schedule_uid": "uid-12345678",
        "job_name": "digest-1",
        "job_uid": "j",
        "pod_uid": "p",
        "attempt": 0,
        "manual_request": None,
        "status": RunOutcome.FAILED,
        "started_at": datetime(2026, 1, 1, tzinfo=UTC),
        "completed_at": None,
        "cost_usd": Decimal("0.01"),
        "input_tokens": 1,
        "output_tokens": 2,
        "model": "m",
        "provider": "openai",
        "error": EVIL,
        "output": None,
        "alert": False,
        "alert_reason": None,
        "metadata": {},
        "updated_at": datetime(2026, 1, 1, tzinfo=UTC),
    }
    values.update(fields)
    return ExecutionRecord(**values)


class FakeHistory:
    def runs(self, *_args: Any, **_kwargs: Any) -> list[ExecutionRecord]:
        return [record()]


def no_controls(text: str) -> None:
    assert not any((ord(ch) < 32 and ch != "\n") or 0x7F <= ord(ch) < 0xA0 for ch in text), repr(
        text
    )


def test_history_table_shows_escape_sequences_as_text() -> None:
    text = reports.history_report(
        FakeHistory(),  # type: ignore[arg-type]
        "research",
        "digest",
        since=None,
        until=None,
        statuses=None,
        limit=50,
        before_id=None,
        output="table",
    )
    no_controls(text)
    assert "\\x1b]0;pwned" in text


def test_describe_shows_escape_sequences_as_text() -> None:
    obj = {
        "metadata": {"namespace": "research", "name": "digest"},
        "spec": {"schedule": "@daily", "timeZone": "UTC", "budget": {"maxPerRunUSD": EVIL}},
        "status": {
            "conditions": [
                {"type": "Ready", "status": "False", "reason": EVIL, "message": EVIL},
            ],
            "nextRuns": [{"local": EVIL, "utc": EVIL}],
            "totalCostUSD": EVIL,
        },
    }
    text = reports.describe(obj, [record(job_name=EVIL)])
    no_controls(text)
    assert "\\x1b[31mred" in text
