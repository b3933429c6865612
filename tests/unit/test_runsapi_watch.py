"""Where an agentruns watch stands (issue 17): every change sent once per revision, a run
ADDED at most once, full pages read one after another, and nothing settled that a write still
in flight could land below."""

from __future__ import annotations

from dataclasses import replace
from datetime import UTC, datetime, timedelta

from nocturne_operator.runsapi.server import _WatchStream
from nocturne_operator.storage import ExecutionRecord
from unit.test_cli_apiruns import RECORD

BEGAN = datetime(2026, 12, 3, 9, 0, tzinfo=UTC)
NOW = BEGAN + timedelta(minutes=10)


def run(
    run_id: int, revision: int, *, written: datetime, started: datetime = BEGAN
) -> ExecutionRecord:
    return replace(RECORD, id=run_id, revision=revision, updated_at=written, started_at=started)


def test_a_run_is_added_once_and_modified_after_even_once_settled() -> None:
    stream = _WatchStream(100, BEGAN)
    recent = NOW - timedelta(seconds=5)
    first = [run(1, 101, written=recent)]
    assert [k for k, _ in stream.events(first)] == ["ADDED"]
    assert stream.events(first) == []  # read again within the settle window: not sent again
    stream.advance(first, NOW, full=False)
    assert stream.settled == 100  # written 5 s ago: not settled yet
    old = [run(1, 101, written=NOW - timedelta(minutes=2))]
    stream.advance(old, NOW, full=False)
    assert stream.settled == 101
    # Its next change (a long model call later) is MODIFIED, never ADDED again.
    assert [k for k, _ in stream.events([run(1, 150, written=NOW)])] == ["MODIFIED"]
    # A run that started before the watch began is MODIFIED on first sight.
    earlier = run(2, 151, written=NOW, started=BEGAN - timedelta(hours=1))
    assert [k for k, _ in stream.events([earlier])] == ["MODIFIED"]


def test_a_full_page_is_followed_at_once_and_the_window_read_again_after() -> None:
    stream = _WatchStream(0, BEGAN)
    page = [run(i, i, written=NOW) for i in range(1, 501)]
    stream.events(page)
    assert stream.advance(page, NOW, full=True) is True
    assert (stream.cursor, stream.settled) == (500, 0)  # next page from past it
    rest = [run(501, 501, written=NOW)]
    stream.events(rest)
    assert stream.advance(rest, NOW, full=False) is False
    assert stream.cursor == stream.settled == 0  # then the unsettled window again


def test_settling_stops_at_the_first_recent_write() -> None:
    stream = _WatchStream(0, BEGAN)
    rows = [
        run(1, 1, written=NOW - timedelta(minutes=5)),
        run(2, 2, written=NOW - timedelta(seconds=10)),  # may still have company below
        run(3, 3, written=NOW - timedelta(minutes=5)),
    ]
    stream.events(rows)
    stream.advance(rows, NOW, full=False)
    assert stream.settled == 1
