"""The drill's checks themselves (pure, no cluster): what counts as an unhandled exception in an
operator log, and what status must say of a schedule's rows."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path

from drills.invariants import Row, expected_status, scan_logs

STAMP = "[2026-12-02 14:06:03,660]"
REFUSED = """{stamp} nocturne_operator.co [ERROR   ] periodic reconcile of ns/a failed
Traceback (most recent call last):
  File "x.py", line 1, in f
ConnectionRefusedError: [Errno 111] Connection refused

The above exception was the direct cause of the following exception:

Traceback (most recent call last):
  File "x.py", line 2, in g
urllib3.exceptions.MaxRetryError: HTTPSConnectionPool(host='127.0.0.1', port=1): Max retries
"""
HANDLER_FAILED = (
    "{stamp} kopf.objects [ERROR   ] Handler 'h' failed with an exception. Will retry.\n"
)
UNAVAILABLE = (
    HANDLER_FAILED
    + """Traceback (most recent call last):
  File "x.py", line 1, in f
kubernetes.client.exceptions.ApiException: (503)
Reason: Service Unavailable
HTTP response body: {{}}
"""
)
BUG = (
    HANDLER_FAILED
    + """Traceback (most recent call last):
  File "x.py", line 1, in f
KeyError: 'uid'
"""
)
DATABASE = (
    HANDLER_FAILED
    + """Traceback (most recent call last):
  File "x.py", line 1, in f
sqlalchemy.exc.OperationalError: (psycopg.OperationalError) connection refused
"""
)
KOPF_RETRY = (
    "{stamp} kopf._cogs.clients.w [ERROR   ] Request attempt #1/9 failed; will retry: GET x\n"
)
HANDLED = "{stamp} nocturne_operator.co [WARNING ] recording Job ns/j deferred: database down\n"


def scan(tmp_path: Path, *parts: str) -> tuple[tuple[str, ...], dict[str, int]]:
    log = tmp_path / "operator.log"
    log.write_text("".join(p.format(stamp=STAMP) for p in parts))
    found = scan_logs([log])
    return found.unhandled, dict(found.transient)


def test_an_absent_apiserver_is_transient_and_warnings_are_not_findings(tmp_path: Path) -> None:
    unhandled, transient = scan(tmp_path, REFUSED, UNAVAILABLE, KOPF_RETRY, HANDLED)
    assert unhandled == ()
    assert transient == {
        "urllib3.exceptions.MaxRetryError": 1,
        "kubernetes.client.exceptions.ApiException": 1,
        "kopf request retried": 1,
    }


def test_a_bug_or_a_database_error_escaping_a_handler_is_a_finding(tmp_path: Path) -> None:
    unhandled, _ = scan(tmp_path, HANDLED, BUG, DATABASE)
    assert [u.rsplit(" -> ", 1)[1].split(":")[0] for u in unhandled] == [
        "KeyError",
        "sqlalchemy.exc.OperationalError",
    ]


def row(job: str, attempt: int, status: str, cost: str, minute: int) -> Row:
    started = datetime(2026, 12, 2, 14, 0, tzinfo=UTC) + timedelta(minutes=minute)
    return Row(
        minute, "s", "uid-s", job, f"uid-{job}", f"pod-{job}-{attempt}", attempt, status,
        started, Decimal(cost), None, None,
    )  # fmt: skip


def test_status_counts_jobs_by_their_last_attempt_and_costs_every_attempt() -> None:
    rows = [
        row("a", 0, "FAILED", "0.01", 0),
        row("a", 1, "SUCCEEDED", "0.02", 1),
        row("b", 0, "BUDGET_EXCEEDED", "0", 2),
        row("c", 0, "CANCELLED", "0.005", 3),
    ]
    assert expected_status(rows) == {
        "succeeded": 1,
        "failed": 1,
        "totalCostUSD": Decimal("0.035"),
    }
