"""``nocturne history``, ``nocturne cost``, ``nocturne describe`` and ``nocturne db stats``: run
history, cost and the database's tables for people (tables) and scripts (JSON), read from
PostgreSQL with the indexed queries."""

from __future__ import annotations

import json
import re
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any

from agent_runner.contract import RunOutcome
from nocturne_operator.api.money import usd
from nocturne_operator.settings import Settings
from nocturne_operator.storage import CostPeriod, ExecutionRecord, History, TableStats

_STATUSES = [s.value for s in RunOutcome]
_UID_CHARS = 8  # enough to tell a name's incarnations apart in a table; JSON has the whole UID
# C0 and C1 controls, DEL and the bidirectional overrides: stored texts (provider errors, outputs,
# condition messages) come from strangers, and a terminal obeys an escape sequence it is shown.
_CONTROLS = re.compile("[\x00-\x1f\x7f-\x9f\u200e\u200f\u202a-\u202e\u2066-\u2069]")


def printable(text: object) -> str:
    """``text`` safe for a terminal: every control character shown as an escape (``\\x1b``),
    so a stored text can neither move the cursor nor set a title or colours."""
    return _CONTROLS.sub(_escape, str(text))


def printable_block(text: str) -> str:
    """Like ``printable``, but lines and tabs stay (an agent's output, a digest)."""
    return _CONTROLS.sub(lambda m: m.group() if m.group() in "\n\t" else _escape(m), text)


def _escape(match: re.Match[str]) -> str:
    code = ord(match.group())
    return f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}"


def parse_time(text: str | None, what: str) -> datetime | None:
    """An ISO 8601 time or date; dates and naive times are UTC. ValueError names the flag."""
    if not text:
        return None
    try:
        moment = datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        raise ValueError(f"{what} {text!r}: not an ISO 8601 date or time") from None
    return moment if moment.tzinfo else moment.replace(tzinfo=UTC)


def parse_statuses(values: Sequence[str] | None) -> list[str] | None:
    """Validated --status values (case-insensitive)."""
    if not values:
        return None
    upper = [v.upper() for v in values]
    bad = [v for v in upper if v not in _STATUSES]
    if bad:
        raise ValueError(f"--status {bad[0]!r}: expected one of {', '.join(_STATUSES)}")
    return upper


def history_report(
    history: History,
    namespace: str,
    name: str,
    *,
    since: datetime | None,
    until: datetime | None,
    statuses: list[str] | None,
    limit: int,
    before_id: int | None,
    output: str,
) -> str:
    """One page of runs, newest first; the JSON carries the cursor for the next page. Runs of
    every incarnation of the name are listed, each with its schedule's UID (a schedule deleted
    and re-created under the same name is a new schedule with totals of its own)."""
    rows = history.runs(
        namespace, name, since=since, until=until, status=statuses, limit=limit, before_id=before_id
    )
    next_before = rows[-1].id if len(rows) == limit else None
    if output == "json":
        return json.dumps(
            {"runs": [_run_json(r) for r in rows], "nextBeforeId": next_before}, indent=2
        )
    if not rows:
        return f"no runs of {namespace}/{name} in that range"
    table = _table(
        ["ID", "STARTED (UTC)", "STATUS", "COST USD", "TOKENS IN/OUT", "JOB", "UID", "ERROR"],
        [
            [
                str(r.id),
                r.started_at.astimezone(UTC).strftime("%Y-%m-%d %H:%M"),
                r.status.value,
                usd(r.cost_usd),
                f"{r.input_tokens}/{r.output_tokens}",
                r.job_name,
                r.schedule_uid[:_UID_CHARS],
                (r.error or "")[:60],
            ]
            for r in rows
        ],
    )
    more = f"\nmore: --before-id {next_before}" if next_before else ""
    return table + more


def cost_report(periods: Sequence[CostPeriod], by: str, output: str) -> str:
    """Cost per day, week or month, with the total."""
    total = sum((p.cost_usd for p in periods), Decimal(0))
    if output == "json":
        return json.dumps(
            {
                "by": by,
                "periods": [
                    {"start": p.period_start.isoformat(), "costUSD": usd(p.cost_usd)}
                    for p in periods
                ],
                "totalUSD": usd(total),
            },
            indent=2,
        )
    if not periods:
        return "no cost in that range"
    rows = [[p.period_start.strftime("%Y-%m-%d"), usd(p.cost_usd)] for p in periods]
    rows.append(["total", usd(total)])
    return _table([by.upper(), "COST USD"], rows)


def db_stats_report(tables: Sequence[TableStats], settings: Settings, output: str) -> str:
    """Each history table's rows, total size (indexes and TOAST included), oldest row and how
    long its rows are kept, with the retention settings these came from."""
    kept = {
        "schedule_executions": settings.history_retention_days,
        "schedule_events": settings.audit_retention_days,
        "notifications": settings.notification_retention_days,
        "schedule_purged_totals": 0,  # never purged: the lifetime sums read it
    }
    retention = {
        "historyDays": settings.history_retention_days,
        "auditDays": settings.audit_retention_days,
        "notificationDays": settings.notification_retention_days,
        "batchSize": settings.retention_batch_size,
    }
    if output == "json":
        return json.dumps(
            {
                "tables": [
                    {
                        "name": t.name,
                        "rows": t.rows,
                        "rowsEstimated": t.rows_estimated,
                        "totalBytes": t.total_bytes,
                        "oldest": t.oldest.isoformat() if t.oldest else None,
                        "retentionDays": kept.get(t.name),
                    }
                    for t in tables
                ],
                "retention": retention,
            },
            indent=2,
        )

    def days(name: str) -> str:
        if name not in kept:
            return "-"
        return f"{kept[name]} days" if kept[name] else "forever"

    table = _table(
        ["TABLE", "ROWS", "SIZE", "OLDEST (UTC)", "KEPT"],
        [
            [
                t.name,
                f"{'~' if t.rows_estimated else ''}{t.rows:,}",
                _size(t.total_bytes),
                f"{t.oldest.astimezone(UTC):%Y-%m-%d %H:%M}" if t.oldest else "-",
                days(t.name),
            ]
            for t in tables
        ],
    )
    return "\n".join(
        [
            table,
            "~: PostgreSQL's estimate (pg_class.reltuples, as of the last VACUUM or ANALYZE); "
            "others counted.",
            "SIZE: the table with its indexes and TOAST.",
            f"Retention (these settings: --config, NOCTURNE_*): runs {days('schedule_executions')} "
            f"after they ended (their totals kept), audit rows {days('schedule_events')}; "
            f"{settings.retention_batch_size} rows a purge batch.",
        ]
    )


def _size(n: int) -> str:
    """Bytes for people, in binary units."""
    if n < 1024:
        return f"{n} B"
    size = n / 1024
    for unit in ("KiB", "MiB", "GiB"):
        if size < 1024:
            return f"{size:.1f} {unit}"
        size /= 1024
    return f"{size:.1f} TiB"


def describe(schedule: Mapping[str, Any], runs: Sequence[ExecutionRecord]) -> str:
    """The schedule, its next runs in local time, recent runs, cost to date and conditions."""
    meta, spec = schedule["metadata"], schedule.get("spec") or {}
    status = schedule.get("status") or {}
    budget = spec.get("budget") or {}
    lines = [
        f"Name:          {meta['namespace']}/{meta['name']}",
        f"Schedule:      {spec.get('schedule')!r} in {spec.get('timeZone', 'UTC')}",
        f"Phase:         {status.get('phase', 'Pending')}",
        f"Suspended:     {spec.get('suspend', False)}",
        f"Budget:        {budget.get('maxPerRunUSD')} USD per run, total cap "
        f"{budget.get('maxTotalUSD', 'none')}, monthly cap {budget.get('maxMonthlyUSD', 'none')}",
        f"Cost to date:  {status.get('totalCostUSD', '0.00')} USD"
        + (
            f" ({month['costUSD']} USD in {month['month']})"
            if (month := status.get("thisMonth"))
            else ""
        ),
        f"Notifications: {_notifications(spec.get('notifications') or {})}",
        f"Runs:          {status.get('runs', {}).get('succeeded', 0)} succeeded, "
        f"{status.get('runs', {}).get('failed', 0)} failed, "
        f"{status.get('consecutiveFailures', 0)} failures in a row",
        "Next runs:",
        *[f"  {r['local']}   ({r['utc']})" for r in status.get("nextRuns") or []],
        "Conditions:",
        *[
            f"  {c['type']}={c['status']} {c['reason']}: {c.get('message', '')}"
            for c in status.get("conditions") or []
        ],
        "Last runs:",
    ]
    lines += [
        f"  {r.started_at.astimezone(UTC):%Y-%m-%d %H:%M}Z  {r.status.value:<15} "
        f"{usd(r.cost_usd):>10} USD  {r.job_name}"
        for r in runs
    ] or ["  (none)"]
    # Each line is one line: a value's own newline is shown as an escape, like any control.
    return "\n".join(printable(line) for line in lines)


def _notifications(notifications: Mapping[str, Any]) -> str:
    ref = notifications.get("webhookSecretRef")
    events = notifications.get("events") or []
    if not ref or not events:
        return "none"
    return (
        f"{', '.join(events)} to the webhook in Secret {ref['name']} (key {ref['key']}), "
        f"{notifications.get('format', 'json')} format, cooldown "
        f"{notifications.get('cooldownMinutes', 60)} min"
    )


def _run_json(r: ExecutionRecord) -> dict[str, Any]:
    return {
        "id": r.id,
        "scheduleUID": r.schedule_uid,
        "job": r.job_name,
        "attempt": r.attempt,
        "status": r.status.value,
        "startedAt": r.started_at.isoformat(),
        "completedAt": r.completed_at.isoformat() if r.completed_at else None,
        "costUSD": usd(r.cost_usd),
        "grantedUSD": usd(r.granted_usd) if r.granted_usd is not None else None,
        "inputTokens": r.input_tokens,
        "outputTokens": r.output_tokens,
        "model": r.model,
        "error": r.error,
        "alert": r.alert,
        "manualRequest": r.manual_request,
    }


def _table(header: list[str], rows: list[list[str]]) -> str:
    rows = [[printable(cell) for cell in row] for row in rows]
    widths = [max(len(str(row[i])) for row in [header, *rows]) for i in range(len(header))]
    return "\n".join(
        "  ".join(str(cell).ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip()
        for row in [header, *rows]
    )


def run_header(r: ExecutionRecord) -> list[str]:
    """One run for people, all but its output: what, how it ended, what it cost, what the
    agent was refused."""
    how = f"run-now {r.manual_request!r}" if r.manual_request else "scheduled"
    lines = [f"{r.namespace}/{r.schedule_name}: Job {r.job_name}, attempt {r.attempt} ({how})"]
    started = f"{r.started_at.astimezone(UTC):%Y-%m-%d %H:%M:%S} UTC"
    if r.completed_at is not None:
        took = (r.completed_at - r.started_at).total_seconds()
        lines.append(f"{r.status.display}: started {started}, took {took:.1f} s")
    else:
        lines.append(f"{r.status.display}: started {started}, not finished")
    steps = r.metadata.get("steps")
    lines.append(
        f"cost {usd(r.cost_usd)} USD; tokens {r.input_tokens:,} in, {r.output_tokens:,} out; "
        f"model {r.model} ({r.provider})"
        + (f"; {steps} step{'' if steps == 1 else 's'}" if isinstance(steps, int) else "")
    )
    if r.alert:
        lines.append(f"alert: {r.alert_reason or '(no reason given)'}")
    if r.error:
        lines.append(f"error: {r.error.strip().splitlines()[0] if r.error.strip() else ''}")
    resumed = r.metadata.get("resumedFromStep")
    if isinstance(resumed, int):
        lines.append(f"resumed from the checkpoint after step {resumed} (earlier attempt)")
    calls = _tool_calls(r)
    if calls:
        lines.append("tool calls:")
        lines += [
            f"  step {c.get('step')}: {c.get('tool')}"
            + (f" {c['target']}" if c.get("target") else "")
            + ("" if c.get("ok", True) else " (failed)")
            for c in calls[-_TOOL_CALLS_SHOWN:]
        ]
        if len(calls) > _TOOL_CALLS_SHOWN:
            lines.append(f"  ... {len(calls) - _TOOL_CALLS_SHOWN} earlier calls not shown")
    refusals = _refusals(r)
    if refusals:
        lines.append("refused operations:")
        lines += [
            f"  step {x.get('step')}: {x.get('tool')}: {x.get('reason')}"
            + (f" ({x['detail']})" if x.get("detail") else "")
            for x in refusals
        ]
    return [printable(line) for line in lines]


def run_json(r: ExecutionRecord) -> dict[str, Any]:
    """One run for scripts, its output included."""
    steps = r.metadata.get("steps")
    return {
        "namespace": r.namespace,
        "schedule": r.schedule_name,
        **_run_json(r),
        "provider": r.provider,
        "alertReason": r.alert_reason,
        "steps": steps if isinstance(steps, int) else None,
        "refusals": _refusals(r),
        "toolCalls": _tool_calls(r),
        "resumedFromStep": r.metadata.get("resumedFromStep"),
        "output": r.output,
    }


_TOOL_CALLS_SHOWN = 20


def _tool_calls(r: ExecutionRecord) -> list[Mapping[str, Any]]:
    """The tool calls in brief (tool, host, ok, step), as the runner reported them."""
    return _reported(r, "toolCalls")


def _refusals(r: ExecutionRecord) -> list[Mapping[str, Any]]:
    """The operations the agent was refused, as the runner reported them."""
    return _reported(r, "refusals")


def _reported(r: ExecutionRecord, key: str) -> list[Mapping[str, Any]]:
    """A list the runner put in the run's metadata (its word: entries that are not objects are
    left out)."""
    return [x for x in r.metadata.get(key) or [] if isinstance(x, Mapping)]
