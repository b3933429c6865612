"""What must hold after a drill, whatever was killed: each check reads the cluster's objects, the
history rows (straight from SQL, not through the product's queries) or the operators' logs and
returns a ``Verdict`` with the evidence of every violation."""

from __future__ import annotations

import re
from collections import Counter, defaultdict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from decimal import Decimal
from pathlib import Path
from typing import Any

import sqlalchemy as sa

FINAL_FAILURES = frozenset({"FAILED", "BUDGET_EXCEEDED", "TIMED_OUT"})


@dataclass(frozen=True)
class SeenJob:
    """A finished Job the drill saw in the namespace."""

    uid: str
    name: str
    schedule: str
    request: str | None
    outcome: str  # Complete or Failed


@dataclass(frozen=True)
class Row:
    """One row of ``schedule_executions`` (one attempt)."""

    id: int
    schedule_name: str
    schedule_uid: str
    job_name: str
    job_uid: str
    pod_uid: str
    attempt: int
    status: str
    started_at: datetime
    cost_usd: Decimal
    granted_usd: Decimal | None
    error: str | None

    def brief(self) -> str:
        return (
            f"row {self.id} {self.schedule_name} Job {self.job_name} attempt {self.attempt} "
            f"{self.status} cost {self.cost_usd} granted {self.granted_usd}"
            + (f" ({self.error[:120]})" if self.error else "")
        )


def load_rows(database_url: str) -> list[Row]:
    """Every execution row, oldest first."""
    engine = sa.create_engine(database_url, poolclass=sa.NullPool)
    try:
        with engine.connect() as conn:
            found = conn.execute(
                sa.text(
                    "SELECT id, schedule_name, schedule_uid, job_name, job_uid, pod_uid, attempt,"
                    " status, started_at, cost_usd, granted_usd, error"
                    " FROM schedule_executions ORDER BY id"
                )
            ).all()
    finally:
        engine.dispose()
    return [Row(*r) for r in found]


@dataclass(frozen=True)
class Verdict:
    """One invariant's result: what was checked, and the evidence of each violation."""

    invariant: str
    checked: str
    evidence: tuple[str, ...] = ()

    @property
    def held(self) -> bool:
        return not self.evidence


def each_finished_job_once(jobs: Mapping[str, SeenJob], rows: Sequence[Row]) -> Verdict:
    """Every finished Job has exactly one history row (the drill's schedules retry nothing, so
    one pod per Job), and every row belongs to a Job the drill saw."""
    per_job = Counter(r.job_uid for r in rows)
    evidence = [
        f"Job {job.name} ({job.outcome}, uid {uid}) has {per_job[uid]} rows"
        for uid, job in sorted(jobs.items(), key=lambda item: item[1].name)
        if per_job[uid] != 1
    ]
    evidence += [
        f"{r.brief()}: no such finished Job was seen" for r in rows if r.job_uid not in jobs
    ]
    return Verdict(
        "every finished Job is in history exactly once",
        f"{len(jobs)} finished Jobs, {len(rows)} rows",
        tuple(evidence),
    )


def expected_status(rows: Iterable[Row]) -> dict[str, Any]:
    """What status says of one schedule's rows: Jobs by their last attempt's result, and the cost
    of every attempt."""
    last: dict[str, Row] = {}
    total = Decimal(0)
    for row in rows:
        total += row.cost_usd
        key = (row.attempt, row.started_at, row.id)
        held = last.get(row.job_uid)
        if held is None or key > (held.attempt, held.started_at, held.id):
            last[row.job_uid] = row
    return {
        "succeeded": sum(r.status == "SUCCEEDED" for r in last.values()),
        "failed": sum(r.status in FINAL_FAILURES for r in last.values()),
        "totalCostUSD": total,
    }


def reported_status(schedule: Mapping[str, Any]) -> dict[str, Any]:
    """The same three numbers as the schedule's status reports them."""
    status = schedule.get("status") or {}
    runs = status.get("runs") or {}
    return {
        "succeeded": runs.get("succeeded", 0),
        "failed": runs.get("failed", 0),
        "totalCostUSD": Decimal(status.get("totalCostUSD") or "0"),
    }


def status_mismatches(schedules: Sequence[Mapping[str, Any]], rows: Sequence[Row]) -> list[str]:
    """Schedules whose status totals differ from the sums of their rows (by schedule UID)."""
    by_uid: dict[str, list[Row]] = defaultdict(list)
    for row in rows:
        by_uid[row.schedule_uid].append(row)
    found = []
    for obj in schedules:
        meta = obj["metadata"]
        want = expected_status(by_uid.get(meta["uid"], []))
        got = reported_status(obj)
        if want != got:
            found.append(f"{meta['name']}: status says {_show(got)}, PostgreSQL {_show(want)}")
    return found


def _show(values: Mapping[str, Any]) -> str:
    return ", ".join(f"{k}={v}" for k, v in values.items())


def status_equals_history(schedules: Sequence[Mapping[str, Any]], rows: Sequence[Row]) -> Verdict:
    return Verdict(
        "status totals (runs, totalCostUSD) equal the sums in PostgreSQL",
        f"{len(schedules)} schedules",
        tuple(status_mismatches(schedules, rows)),
    )


def within_caps(schedules: Sequence[Mapping[str, Any]], rows: Sequence[Row]) -> Verdict:
    """No schedule's recorded spend is past maxTotalUSD, no Job's past maxPerRunUSD."""
    by_uid: dict[str, list[Row]] = defaultdict(list)
    for row in rows:
        by_uid[row.schedule_uid].append(row)
    evidence = []
    for obj in schedules:
        budget = obj["spec"]["budget"]
        name, mine = obj["metadata"]["name"], by_uid.get(obj["metadata"]["uid"], [])
        total = sum((r.cost_usd for r in mine), Decimal(0))
        if "maxTotalUSD" in budget and total > Decimal(budget["maxTotalUSD"]):
            evidence.append(f"{name}: spent {total} > maxTotalUSD {budget['maxTotalUSD']}")
        per_job: dict[str, Decimal] = defaultdict(Decimal)
        for row in mine:
            per_job[row.job_name] += row.cost_usd
        evidence += [
            f"{name}: Job {job} spent {cost} > maxPerRunUSD {budget['maxPerRunUSD']}"
            for job, cost in sorted(per_job.items())
            if cost > Decimal(budget["maxPerRunUSD"])
        ]
    return Verdict(
        "no schedule spent past a cap (maxTotalUSD, maxPerRunUSD)",
        f"{len(schedules)} schedules, {len(rows)} rows",
        tuple(evidence),
    )


def nothing_running(rows: Sequence[Row]) -> Verdict:
    return Verdict(
        "no row left RUNNING once the reaper has run",
        f"{len(rows)} rows",
        tuple(r.brief() for r in rows if r.status == "RUNNING"),
    )


# --- the operators' logs ---------------------------------------------------------------------

_RECORD = re.compile(r"^\[\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3}\] (\S+)\s*\[(\w+)\s*\] (.*)$")
_EXCEPTION_LINE = re.compile(
    r"^((?:[A-Za-z_]\w*\.)*[A-Z]\w*(?:Error|Exception|Exit|Timeout|Interrupt)\w*)(?::\s?(.*))?$"
)
# The apiserver being away (restart) or refusing for a moment: the operator's workers retry the
# pass with backoff, and kopf's watch and API client retry themselves.
_APISERVER_UNAVAILABLE = frozenset(
    {
        "ConnectionRefusedError",
        "ConnectionResetError",
        "aiohttp.client_exceptions.ClientConnectorError",
        "aiohttp.client_exceptions.ServerDisconnectedError",
        "aiohttp.client_exceptions.ClientOSError",
        "urllib3.exceptions.MaxRetryError",
        "urllib3.exceptions.NewConnectionError",
        "urllib3.exceptions.ProtocolError",
        "kopf._cogs.clients.errors.APIServerError",
    }
)
_API_STATUS_UNAVAILABLE = re.compile(r"^\((429|500|502|503|504)\)")
# kopf's own lines for what it retries itself (API requests).
_KOPF_RETRIES = ("failed; will retry", "failed temporarily")


@dataclass(frozen=True)
class LogRecord:
    """One operator log record and the lines that follow it (a traceback)."""

    source: str
    logger: str
    level: str
    message: str
    more: tuple[str, ...]

    def exception(self) -> tuple[str, str] | None:
        """The traceback's final exception (type, message), or None without a traceback."""
        if not any(line.startswith("Traceback (most recent call last)") for line in self.more):
            return None
        for line in reversed(self.more):
            match = _EXCEPTION_LINE.match(line)
            if match:
                return match.group(1), match.group(2) or ""
        return "?", self.more[-1] if self.more else ""


def log_records(path: Path) -> list[LogRecord]:
    records: list[LogRecord] = []
    head: tuple[str, str, str] | None = None
    more: list[str] = []
    for line in [
        *path.read_text(errors="replace").splitlines(),
        "[0000-00-00 00:00:00,000] - [END ] -",
    ]:
        match = _RECORD.match(line)
        if match is None:
            more.append(line)
            continue
        if head is not None:
            records.append(LogRecord(path.name, *head, tuple(more)))
        head, more = (match.group(1), match.group(2), match.group(3)), []
    return records


def unavailable_apiserver(kind: str, message: str) -> bool:
    """The exception says the apiserver was away or refused for a moment."""
    if kind in _APISERVER_UNAVAILABLE:
        return True
    return kind.endswith("ApiException") and bool(_API_STATUS_UNAVAILABLE.match(message))


@dataclass(frozen=True)
class LogFindings:
    """Exceptions nobody handled, and the handled transient ones (counted, not findings)."""

    unhandled: tuple[str, ...]
    transient: Counter[str]


def scan_logs(paths: Iterable[Path]) -> LogFindings:
    """Tracebacks and ERROR/CRITICAL records of the operators' logs. Not findings: kopf's own
    request retries, and passes or handlers that failed because the apiserver was away (retried
    with backoff). Everything else is: a database error escaping a handler (the product catches
    HistoryError), an unexpected exception anywhere, kopf giving up on a handler."""
    unhandled: list[str] = []
    transient: Counter[str] = Counter()
    for path in paths:
        for record in log_records(path):
            exception = record.exception()
            where = f"{record.source}: [{record.logger}] {record.message[:200]}"
            if exception is not None:
                kind, message = exception
                if unavailable_apiserver(kind, message):
                    transient[kind] += 1
                else:
                    unhandled.append(f"{where} -> {kind}: {message[:300]}")
            elif record.level in ("ERROR", "CRITICAL"):
                if any(marker in record.message for marker in _KOPF_RETRIES):
                    transient["kopf request retried"] += 1
                else:
                    unhandled.append(where)
            elif "Task exception was never retrieved" in record.message:
                unhandled.append(where)
    return LogFindings(tuple(unhandled), transient)


def operator_logs_clean(findings: LogFindings, exits: Sequence[str], logs: int) -> Verdict:
    return Verdict(
        "no unhandled operator exception in any operator log",
        f"{logs} operator logs",
        (*findings.unhandled, *(f"operator exited on its own: {e}" for e in exits)),
    )


# --- the report ------------------------------------------------------------------------------


def report_table(faults: Mapping[str, int], verdicts: Sequence[Verdict]) -> str:
    """The drill's result as Markdown: faults injected per kind, then each invariant."""
    lines = ["| fault injected | count |", "|---|---:|"]
    lines += [f"| {kind} | {count} |" for kind, count in faults.items()]
    lines += ["", "| invariant | checked | result |", "|---|---|---|"]
    for verdict in verdicts:
        result = "held" if verdict.held else f"VIOLATED ({len(verdict.evidence)})"
        lines.append(f"| {verdict.invariant} | {verdict.checked} | {result} |")
    return "\n".join(lines)
