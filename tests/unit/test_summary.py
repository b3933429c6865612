"""The termination-message summary: always valid JSON within 4096 bytes; garbage parses to None."""

from __future__ import annotations

import json
import logging
import random
from datetime import UTC, datetime, timedelta, timezone
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest
from pydantic import ValidationError

from agent_runner.contract import RunOutcome
from agent_runner.summary import (
    MESSAGE_LIMIT_BYTES,
    Summary,
    parse_summary,
    write_termination_message,
)

STARTED = datetime(2026, 11, 27, 0, 0, tzinfo=UTC)


def full(**overrides: Any) -> Summary:
    values: dict[str, Any] = {
        "execution_id": 42,
        "status": "SUCCEEDED",
        "cost_usd": Decimal("0.41"),
        "input_tokens": 12_000,
        "output_tokens": 800,
        "model": "gpt-4o-mini",
        "provider": "openai",
        "attempt": 1,
        "started_at": STARTED,
        "completed_at": STARTED + timedelta(minutes=3),
        "alert": True,
        "alert_reason": "price dropped",
        "error": None,
        "output_preview": "# AI news\n- item",
        "history_written": True,
    }
    return Summary(**(values | overrides))


def size(text: str) -> int:
    return len(text.encode("utf-8"))


def test_compact_camel_case_json_round_trips() -> None:
    summary = full()
    message = summary.to_message()
    assert message == summary.to_json()
    assert json.loads(message) == {
        "version": 1,
        "executionId": 42,
        "status": "SUCCEEDED",
        "costUSD": "0.41",
        "inputTokens": 12000,
        "outputTokens": 800,
        "model": "gpt-4o-mini",
        "provider": "openai",
        "attempt": 1,
        "startedAt": "2026-11-27T00:00:00Z",
        "completedAt": "2026-11-27T00:03:00Z",
        "alert": True,
        "alertReason": "price dropped",
        "outputPreview": "# AI news\n- item",
        "historyWritten": True,
    }
    assert json.dumps(json.loads(message), separators=(",", ":"), ensure_ascii=False) == message
    assert parse_summary(message) == summary


def test_minimal_summary() -> None:
    summary = Summary(status="FAILED", error="database down")
    assert summary.to_message() == (
        '{"version":1,"status":"FAILED","costUSD":"0","inputTokens":0,"outputTokens":0,'
        '"alert":false,"error":"database down","historyWritten":false}'
    )


@pytest.mark.parametrize(
    ("cost", "text"),
    [
        (Decimal("0.1234561"), "0.123457"),  # rounded up: never under-report
        (Decimal("2.00"), "2"),
        (Decimal("0"), "0"),
        (Decimal("1E+2"), "100"),
        (Decimal("99999999.999999"), "99999999.999999"),
    ],
)
def test_cost_is_a_decimal_string(cost: Decimal, text: str) -> None:
    message = Summary(status="SUCCEEDED", cost_usd=cost).to_message()
    assert json.loads(message)["costUSD"] == text


def test_invalid_values_are_refused_when_building() -> None:
    with pytest.raises(ValidationError, match=r"cost_usd|costUSD"):
        Summary(status="SUCCEEDED", cost_usd=0.5)  # type: ignore[arg-type]
    with pytest.raises(ValidationError):
        Summary(status="SUCCEEDED", cost_usd=Decimal(-1))
    with pytest.raises(ValidationError):
        Summary(status="DONE")
    with pytest.raises(ValidationError):
        Summary(status="SUCCEEDED", started_at=datetime(2026, 1, 1))  # noqa: DTZ001
    with pytest.raises(ValidationError):
        Summary(status="SUCCEEDED", input_tokens=-1)


def test_times_are_written_in_utc() -> None:
    tokyo = timezone(timedelta(hours=9))
    summary = Summary(status="SUCCEEDED", started_at=datetime(2026, 11, 27, 9, tzinfo=tokyo))
    assert json.loads(summary.to_message())["startedAt"] == "2026-11-27T00:00:00Z"


def test_one_outcome_spelled_three_ways() -> None:
    """The wire and the database carry the value, status and notices the display name, metrics
    the label; every outcome but RUNNING is final."""
    spellings = [(o.value, o.display, o.metric, o.final) for o in RunOutcome]
    assert spellings == [
        ("RUNNING", "Running", "running", False),
        ("SUCCEEDED", "Succeeded", "succeeded", True),
        ("FAILED", "Failed", "failed", True),
        ("BUDGET_EXCEEDED", "BudgetExceeded", "budget_exceeded", True),
        ("TIMED_OUT", "TimedOut", "timed_out", True),
        ("CANCELLED", "Cancelled", "cancelled", True),
    ]
    assert Summary(status="TIMED_OUT").status is RunOutcome.TIMED_OUT


# ---- bounded size ------------------------------------------------------------------------------


def test_huge_output_fills_the_space_left_and_keeps_the_error() -> None:
    error = "Traceback: " + "x" * 500
    summary = full(output_preview="word " * 1_000_000, error=error)
    message = summary.to_message()
    assert MESSAGE_LIMIT_BYTES - 8 <= size(message) <= MESSAGE_LIMIT_BYTES
    data = json.loads(message)
    assert data["error"] == error
    assert data["outputPreview"].startswith("word word")
    assert data["outputPreview"].endswith("…")
    parsed = parse_summary(message)
    assert parsed is not None
    assert (parsed.status, parsed.cost_usd, parsed.execution_id) == (
        "SUCCEEDED",
        Decimal("0.41"),
        42,
    )


def test_long_error_is_cut_to_its_own_cap() -> None:
    summary = full(error="e" * 100_000, output_preview=None)
    error = summary.error
    assert error is not None
    assert len(error) == 1024
    assert error.endswith("…")
    assert size(summary.to_message()) < MESSAGE_LIMIT_BYTES


def test_worst_case_escaping_still_fits() -> None:
    # Control characters take 6 bytes each in JSON, emoji 4: every text field at its cap.
    nasty = '\x01\x1f"\\😀' * 5000
    summary = full(
        output_preview=nasty,
        error=nasty,
        alert_reason=nasty,
        model=nasty,
        provider=nasty,
    )
    message = summary.to_message()
    assert size(message) <= MESSAGE_LIMIT_BYTES
    data = json.loads(message)
    assert data["status"] == "SUCCEEDED"
    assert data["costUSD"] == "0.41"
    assert data["executionId"] == 42
    assert parse_summary(message) is not None


def test_small_limits_keep_the_essentials() -> None:
    summary = full(output_preview="o" * 5000, error="e" * 5000)
    for limit in (1000, 400, 256):
        message = summary.to_message(limit)
        assert size(message) <= limit
        data = json.loads(message)
        assert (data["status"], data["costUSD"], data["executionId"]) == ("SUCCEEDED", "0.41", 42)
    biggest = 2**63 - 1
    numbers = full(
        execution_id=biggest,
        status="BUDGET_EXCEEDED",
        cost_usd=Decimal("99999999.999999"),
        input_tokens=biggest,
        output_tokens=biggest,
        attempt=biggest,
    )
    assert size(numbers.to_message(256)) <= 256
    with pytest.raises(ValueError, match="limit: 100 bytes cannot hold a summary"):
        numbers.to_message(100)


ALPHABET = [
    *"abcXYZ 019",
    '"',
    "\\",
    "\n",
    "\t",
    "\x00",
    "\x1f",
    "\x7f",
    "é",
    "日本",
    "😀",
    "👩‍👩‍👧",
    "\u0301",
    "\u2028",
    "\ufeff",
    "\ud800",  # a lone surrogate, as left by undecodable bytes
    "\udfff",
]


def random_text(rng: random.Random) -> str:
    length = rng.choice([0, 1, 10, 100, 1000, 3000, 5000, 20_000])
    return "".join(rng.choices(ALPHABET, k=length))


def test_random_unicode_always_gives_valid_bounded_json() -> None:
    rng = random.Random(20261127)  # noqa: S311 - reproducible test data
    for _ in range(300):
        originals = {
            name: random_text(rng) if rng.random() < 0.8 else None
            for name in ("output_preview", "error", "alert_reason", "model", "provider")
        }
        cost = Decimal(rng.randrange(0, 10**12)) / Decimal(10**6)
        summary = full(cost_usd=cost, **originals)
        message = summary.to_message()
        assert size(message) <= MESSAGE_LIMIT_BYTES
        data = json.loads(message)
        parsed = parse_summary(message)
        assert parsed is not None
        assert parsed.cost_usd == summary.cost_usd
        assert (parsed.status, parsed.input_tokens, parsed.history_written) == (
            "SUCCEEDED",
            12_000,
            True,
        )
        for name, original in originals.items():
            key = {"output_preview": "outputPreview", "alert_reason": "alertReason"}.get(name, name)
            kept = data.get(key)
            if original is None or kept is None:
                continue
            clean = original.encode("utf-8", "replace").decode("utf-8")
            assert kept == clean or (kept.endswith("…") and clean.startswith(kept[:-1]))


# ---- parsing is tolerant -------------------------------------------------------------------------


VALID = full().to_message()


@pytest.mark.parametrize(
    "garbage",
    [
        None,
        "",
        "   \n",
        "not json",
        "Error: something went wrong\nTraceback ...",
        "{",
        VALID[:-1],  # cut short
        VALID[: len(VALID) // 2],
        "[]",
        "null",
        "123",
        '"SUCCEEDED"',
        "{}",
        '{"status":"WEIRD"}',
        '{"status":"SUCCEEDED","version":2}',
        '{"status":"SUCCEEDED","costUSD":"NaN"}',
        '{"status":"SUCCEEDED","costUSD":"-1"}',
        '{"status":"SUCCEEDED","costUSD":"1e999999999"}',
        '{"status":"SUCCEEDED","inputTokens":"many"}',
        '{"status":"SUCCEEDED","startedAt":"yesterday"}',
        '{"status":"SUCCEEDED","executionId":99999999999999999999999}',
        "[" * 100_000 + "]" * 100_000,
        '{"a":' * 50_000 + "1" + "}" * 50_000,
        "{" + " " * 10_000_000 + "}",
        b"\xff\xfe\x00garbage",
        b'{"status":"SUCCEEDED","model":"\xff"}' + b" " * 100_000,
    ],
    ids=lambda value: repr(value)[:40],
)
def test_garbage_parses_to_none(garbage: str | bytes | None) -> None:
    assert parse_summary(garbage) is None


def test_parse_accepts_bytes_whitespace_and_unknown_fields() -> None:
    assert parse_summary(f"\n {VALID}\n") == full()
    assert parse_summary(VALID.encode()) == full()
    newer = json.loads(VALID) | {"newField": {"x": 1}}
    assert parse_summary(json.dumps(newer)) == full()
    # A number where a decimal string is expected is read exactly, not as a float.
    parsed = parse_summary('{"status":"FAILED","costUSD":0.1}')
    assert parsed is not None
    assert parsed.cost_usd == Decimal("0.1")


# ---- writing ------------------------------------------------------------------------------------


def test_write_termination_message(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    target = tmp_path / "termination-log"
    summary = full(output_preview="x" * 100_000)
    assert write_termination_message(summary, target) is True
    assert target.stat().st_size <= MESSAGE_LIMIT_BYTES
    assert parse_summary(target.read_bytes()) is not None
    with caplog.at_level(logging.WARNING):
        assert write_termination_message(summary, tmp_path / "missing" / "log") is False
    assert "could not write the run summary" in caplog.text
