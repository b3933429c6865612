"""The monthly budget's period: the calendar month in the schedule's time zone."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest

from nocturne_operator.storage import month_start, next_month_start


def test_month_starts_at_local_midnight_on_the_first() -> None:
    moment = datetime(2026, 10, 31, 16, 0, tzinfo=UTC)  # already November in Tokyo
    start = month_start(moment, "Asia/Tokyo")
    assert start.astimezone(UTC) == datetime(2026, 10, 31, 15, 0, tzinfo=UTC)
    assert next_month_start(moment, "Asia/Tokyo").astimezone(UTC) == datetime(
        2026, 11, 30, 15, 0, tzinfo=UTC
    )
    assert month_start(moment, "UTC") == datetime(2026, 10, 1, tzinfo=UTC)


def test_december_rolls_into_january() -> None:
    moment = datetime(2026, 12, 31, 23, 59, tzinfo=UTC)
    assert next_month_start(moment, "UTC") == datetime(2027, 1, 1, tzinfo=UTC)


def test_month_that_starts_in_a_dst_gap() -> None:
    """Paraguay sprang forward at 00:00 on Sunday 2023-10-01: local midnight did not exist, the
    month began at 01:00 -03, which is 04:00 UTC."""
    moment = datetime(2023, 10, 15, tzinfo=UTC)
    start = month_start(moment, "America/Asuncion")
    assert start.astimezone(UTC) == datetime(2023, 10, 1, 4, 0, tzinfo=UTC)
    # The same instant seen from the previous month's side is the next month's start.
    assert next_month_start(datetime(2023, 9, 20, tzinfo=UTC), "America/Asuncion").astimezone(
        UTC
    ) == datetime(2023, 10, 1, 4, 0, tzinfo=UTC)


def test_month_across_the_autumn_fold() -> None:
    """A month that contains a DST fold is one hour longer; its bounds are still midnights."""
    start = month_start(datetime(2026, 10, 26, tzinfo=UTC), "Europe/Berlin")
    end = next_month_start(datetime(2026, 10, 26, tzinfo=UTC), "Europe/Berlin")
    assert start.astimezone(UTC) == datetime(2026, 9, 30, 22, 0, tzinfo=UTC)
    assert end.astimezone(UTC) == datetime(2026, 10, 31, 23, 0, tzinfo=UTC)
    assert (end.astimezone(UTC) - start.astimezone(UTC)).total_seconds() == (31 * 24 + 1) * 3600


def test_naive_moment_is_refused() -> None:
    with pytest.raises(ValueError, match="moment"):
        month_start(datetime(2026, 1, 1), "UTC")  # noqa: DTZ001 - the point of the test
