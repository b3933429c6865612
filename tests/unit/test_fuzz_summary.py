"""Fuzzing the termination-summary parser (issue 12): random bytes, text and JSON documents give a
summary or None, never an exception; every summary round-trips through its JSON and its bounded
termination message. The table-driven cases are in test_summary.py.

Deterministic: the properties run under ``PROFILE`` (derandomized, no example database).
"""

from __future__ import annotations

import contextlib
import json
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any

from hypothesis import example, given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from agent_runner.contract import MAX_USD, RunOutcome
from agent_runner.summary import MESSAGE_LIMIT_BYTES, Summary, parse_summary

PROFILE = settings(max_examples=300, derandomize=True, database=None, deadline=timedelta(seconds=1))
MAX_INT = 2**63 - 1

ANY_TEXT = st.text(st.characters(exclude_categories=()), max_size=30)
JSON_VALUES = st.recursive(
    st.none()
    | st.booleans()
    | st.integers()
    | st.integers(min_value=-(2**70), max_value=2**70)
    | st.floats()
    | ANY_TEXT,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(ANY_TEXT, inner, max_size=4),
    max_leaves=10,
)
STATUSES = st.sampled_from([o.value for o in RunOutcome])
TIMES = st.one_of(
    st.datetimes(timezones=st.timezones()).map(lambda t: t.isoformat()),
    # Any local time with any offset, the first and last hours included.
    st.builds(
        lambda t, offset: t.isoformat() + offset,
        st.one_of(
            st.datetimes(),
            st.datetimes(max_value=datetime(1, 1, 1, 0, 59)),  # noqa: DTZ001 - local times
            st.datetimes(min_value=datetime(9999, 12, 31, 23, 1)),  # noqa: DTZ001
        ),
        st.sampled_from(["Z", "+00:00", "+01:00", "-01:00", "+23:59", "-23:59"]),
    ),
    st.sampled_from(
        [
            "2026-11-27T00:00:00",
            "2026-11-27T00:00:00Z",
            "2026-02-30T00:00:00Z",
            "2026-11-27T24:00:00Z",
            "2026-11-27T00:00:00+24:00",
            "",
        ]
    ),
)
# What each field of a summary may be sent as: mostly plausible, sometimes anything.
FIELD_VALUES: dict[str, st.SearchStrategy[Any]] = {
    "version": st.sampled_from([1, 2, 0, "1", 1.0, True]),
    "executionId": st.integers(min_value=-1, max_value=2**64),
    "status": STATUSES | ANY_TEXT,
    "costUSD": st.one_of(
        st.decimals(min_value=0, max_value=MAX_USD * 2).map(str),
        st.sampled_from(["NaN", "-0", "1e999999999", "1E-999999999", "0.0000001", "-1"]),
        st.floats().map(str),
    ),
    "inputTokens": st.integers(min_value=-1, max_value=2**64),
    "outputTokens": st.integers(min_value=-1, max_value=2**64),
    "model": ANY_TEXT,
    "provider": ANY_TEXT,
    "attempt": st.integers(min_value=-1, max_value=2**64),
    "startedAt": TIMES,
    "completedAt": TIMES,
    "alert": st.booleans(),
    "alertReason": ANY_TEXT,
    "error": ANY_TEXT,
    "outputPreview": st.text(st.characters(exclude_categories=()), max_size=5000),
    "historyWritten": st.booleans(),
}
DOCUMENTS = st.one_of(
    st.fixed_dictionaries(
        {"status": FIELD_VALUES["status"]},
        optional={
            name: values | JSON_VALUES for name, values in FIELD_VALUES.items() if name != "status"
        },
    ),
    st.dictionaries(st.sampled_from(sorted(FIELD_VALUES)) | ANY_TEXT, JSON_VALUES, max_size=6),
    JSON_VALUES,
)
# The JSON text of a document, as json.dumps writes it (escaped or raw) or cut short.
MESSAGES = st.builds(
    lambda doc, ascii_only, cut: json.dumps(doc, ensure_ascii=ascii_only)[:cut],
    DOCUMENTS,
    st.booleans(),
    st.one_of(st.none(), st.integers(min_value=0, max_value=200)),
)
ANY_INPUT = st.one_of(
    st.none(),
    st.binary(max_size=300),
    ANY_TEXT,
    MESSAGES,
    MESSAGES.map(lambda text: text.encode("utf-8", "surrogatepass")),
)
SUMMARIES = st.builds(
    Summary,
    execution_id=st.none() | st.integers(min_value=1, max_value=MAX_INT),
    status=STATUSES,
    cost_usd=st.decimals(min_value=0, max_value=MAX_USD, places=6),
    input_tokens=st.integers(min_value=0, max_value=MAX_INT),
    output_tokens=st.integers(min_value=0, max_value=MAX_INT),
    model=st.none() | ANY_TEXT,
    provider=st.none() | ANY_TEXT,
    attempt=st.none() | st.integers(min_value=0, max_value=MAX_INT),
    started_at=st.none() | st.datetimes(timezones=st.just(UTC)),
    completed_at=st.none() | st.datetimes(timezones=st.just(UTC)),
    alert=st.booleans(),
    alert_reason=st.none() | ANY_TEXT,
    error=st.none() | st.text(st.characters(exclude_categories=()), max_size=2000),
    output_preview=st.none() | st.text(st.characters(exclude_categories=()), max_size=6000),
    history_written=st.booleans(),
)


@PROFILE
@given(message=ANY_INPUT)
def test_property_anything_parses_to_a_summary_or_none(message: str | bytes | None) -> None:
    parsed = parse_summary(message)
    if parsed is None:
        return
    assert isinstance(parsed, Summary)
    # What the operator accepted it can store and show: its JSON reads back the same.
    assert parse_summary(parsed.to_json()) == parsed
    assert len(parsed.to_message().encode()) <= MESSAGE_LIMIT_BYTES


@PROFILE
@given(message=MESSAGES)
# Found by this property: a time valid where it is written but before year 1 (or after 9999) in
# UTC raised OverflowError out of the model, and only the catch-all made it None.
@example(message='{"status":"FAILED","startedAt":"0001-01-01T00:00:00+01:00"}')
@example(message='{"status":"FAILED","completedAt":"9999-12-31T23:59:59-01:00"}')
def test_property_the_parsers_catch_all_is_a_last_resort(message: str) -> None:
    # parse_summary catches everything so the operator never crashes on a pod's message;
    # known bad input is refused by the model itself, as a ValidationError.
    with contextlib.suppress(ValidationError):
        Summary.model_validate_json(message)


@PROFILE
@given(summary=SUMMARIES, limit=st.sampled_from([256, 300, 1024, MESSAGE_LIMIT_BYTES]))
@example(summary=Summary(status="FAILED", cost_usd=Decimal("99999999.999999")), limit=256)
def test_property_every_summary_round_trips(summary: Summary, limit: int) -> None:
    assert parse_summary(summary.to_json()) == summary
    message = summary.to_message(limit)
    assert len(message.encode()) <= limit
    parsed = parse_summary(message)
    assert parsed is not None
    # The numbers, status and flags survive any cut; text is kept or cut with a marker.
    kept = {"status", "cost_usd", "input_tokens", "output_tokens", "execution_id", "alert"}
    assert parsed.model_dump(include=kept) == summary.model_dump(include=kept)
    for name in ("model", "provider", "alert_reason", "error", "output_preview"):
        original, text = getattr(summary, name), getattr(parsed, name)
        if text is not None and text != original:
            assert text.endswith("…")
            assert original.startswith(text[:-1])
