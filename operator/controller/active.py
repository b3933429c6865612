"""The runs in flight, as their runners last reported through this process's run API: what
``status.activeRun`` shows (``kubectl get asched``, ``nocturne watch``).

The run API tells ``ActiveRuns`` of every grant, progress report and finish (it is the API's
``RunObserver``); each change queues the schedule's key -- at once for a start or an end, at
most once per ``refresh`` for progress, so a chatty runner costs a status write every few
seconds, not one per report. The reconcile pass reads ``of(key)`` and writes status: the
operator stays the only writer of status, and a pass stays idempotent (the same reports give
the same status).

With two replicas (issue 15) a runner's reports reach either one: ``controller.relay`` sends
every change (``on_start``/``on_progress`` -> ``put``, a finish -> ``end``) to every replica
through PostgreSQL, and each keeps the same entries, the standby too (a takeover shows them at
once). Kept in memory: after a restart of every replica, a run already in flight does not show
(its reports name no attempt, start or budget) -- the next attempt or run shows from its grant
on; a rolling restart keeps them (the new replica hears the old one's). A runner killed without
its final report leaves an entry that ends with its Job (``forget``, from the pass that sees the
Job finished) or at its deadline (``expires_at``).
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Collection
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime, timedelta
from decimal import Decimal

from agent_runner.contract import FinishReport, Grant, ProgressReport, quantize_usd
from nocturne_operator.api.money import usd
from nocturne_operator.api.timestamps import rfc3339
from nocturne_operator.runapi.auth import RunIdentity

__all__ = ["ActiveRun", "ActiveRuns"]

Key = tuple[str, str]  # (namespace, schedule)
Queue = Callable[[Key, float], None]
"""(key, within seconds) -> None: reconcile the schedule within that many seconds."""

# A run's entry outlives its deadline by this much: its Job's end is recorded by then.
_EXPIRY_SLACK = timedelta(minutes=1)
_ACTIVITY_CHARS = 120
_ENDED_KEPT = 10_000


def _clean(text: str | None) -> str | None:
    """A runner's activity as status may show it: printable, one line, short."""
    if not text:
        return None
    line = " ".join("".join(ch if ch.isprintable() else " " for ch in text).split())
    if len(line) > _ACTIVITY_CHARS:
        line = line[: _ACTIVITY_CHARS - 1] + "…"
    return line or None


@dataclass(frozen=True)
class ActiveRun:
    """One attempt in flight. ``cost`` and ``budget`` are the run's: what the Job's earlier
    attempts spent is in both."""

    job: str
    job_uid: str
    attempt: int
    started_at: datetime
    step: int
    max_steps: int
    cost: Decimal
    budget: Decimal
    spent_before: Decimal
    activity: str | None
    updated_at: datetime
    expires_at: datetime

    def status(self, others: int = 0) -> dict[str, object]:
        """``status.activeRun``."""
        summary = f"step {self.step}/{self.max_steps}, {usd(self.cost)} of {usd(self.budget)} USD"
        run: dict[str, object] = {
            "job": self.job,
            "attempt": self.attempt,
            "startedAt": rfc3339(self.started_at),
            "step": self.step,
            "maxSteps": self.max_steps,
            "costUSD": usd(self.cost),
            "budgetUSD": usd(self.budget),
            "updatedAt": rfc3339(self.updated_at),
            "summary": summary,
        }
        if self.activity:
            run["activity"] = self.activity
        if others:
            run["others"] = others
        return run


@dataclass
class ActiveRuns:
    """Thread-safe: the run API reports from the event loop, passes read from workers."""

    queue: Queue = lambda _key, _within: None
    refresh: float = 5.0
    clock: Callable[[], datetime] = lambda: datetime.now(UTC)
    _runs: dict[Key, dict[str, ActiveRun]] = field(default_factory=dict)
    # (Job UID, attempt) of attempts that ended, oldest first: a late report is not shown.
    _ended: dict[tuple[str, int], None] = field(default_factory=dict)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def started(self, identity: RunIdentity, grant: Grant) -> None:
        """An attempt got its grant: it shows at once (a retry's checkpoint counts its steps)."""
        self.put(*self.on_start(identity, grant), 0.0)

    def progressed(self, identity: RunIdentity, report: ProgressReport) -> None:
        """Cost so far and what the runner does now; status within ``refresh`` seconds."""
        update = self.on_progress(identity, report)
        if update is not None:
            self.put(*update, self.refresh)

    def finished(self, identity: RunIdentity, report: FinishReport) -> None:
        """The attempt ended: it no longer shows."""
        del report
        self.end((identity.namespace, identity.schedule), identity.job_uid)

    def on_start(self, identity: RunIdentity, grant: Grant) -> tuple[Key, ActiveRun]:
        """The entry a grant makes (not kept yet: ``put``)."""
        now = self.clock()
        task = identity.task
        step = grant.resume.step if grant.resume is not None else 0
        run = ActiveRun(
            job=identity.job_name,
            job_uid=identity.job_uid,
            attempt=grant.attempt,
            started_at=now,
            step=step,
            max_steps=task.agent.max_steps,
            cost=grant.spent_before_usd,
            budget=grant.spent_before_usd + grant.limit_usd,
            spent_before=grant.spent_before_usd,
            activity=f"resuming after step {step}" if step else "starting",
            updated_at=now,
            expires_at=now + timedelta(seconds=task.timeout_seconds) + _EXPIRY_SLACK,
        )
        return (identity.namespace, identity.schedule), run

    def on_progress(
        self, identity: RunIdentity, report: ProgressReport
    ) -> tuple[Key, ActiveRun] | None:
        """The entry a progress report makes of the one kept (not kept yet: ``put``); None
        for a run this process never heard start of (a restart of every replica)."""
        key = (identity.namespace, identity.schedule)
        with self._lock:
            run = self._runs.get(key, {}).get(identity.job_uid)
        if run is None:
            return None
        return key, replace(
            run,
            step=max(run.step, report.steps),
            cost=quantize_usd(run.spent_before + report.cost_usd),
            activity=_clean(report.activity) or run.activity,
            updated_at=self.clock(),
        )

    def put(self, key: Key, run: ActiveRun, within: float) -> None:
        """Keep ``run`` (replacing the Job's entry) and have status show it ``within``
        seconds; an attempt already ended (``end``) is not shown again."""
        with self._lock:
            if (run.job_uid, run.attempt) in self._ended:
                return
            self._runs.setdefault(key, {})[run.job_uid] = run
        self.queue(key, within)

    def end(self, key: Key, job_uid: str) -> None:
        """The Job's attempt in flight ended: it no longer shows (nor does a report of it that
        reaches this process later, through another replica)."""
        with self._lock:
            run = self._runs.get(key, {}).get(job_uid)
            if run is not None:
                self._ended[(job_uid, run.attempt)] = None
                while len(self._ended) > _ENDED_KEPT:
                    del self._ended[next(iter(self._ended))]
        self.forget(key, [job_uid])
        self.queue(key, 0.0)

    def forget(self, key: Key, job_uids: Collection[str]) -> None:
        """These Jobs' attempts are over (their Job finished or is gone)."""
        with self._lock:
            runs = self._runs.get(key)
            if runs is None:
                return
            for uid in job_uids:
                runs.pop(uid, None)
            if not runs:
                del self._runs[key]

    def of(self, key: Key) -> list[ActiveRun]:
        """The schedule's runs in flight, the latest started first (expired ones dropped)."""
        now = self.clock()
        with self._lock:
            runs = self._runs.get(key)
            if runs is None:
                return []
            for uid in [uid for uid, run in runs.items() if run.expires_at <= now]:
                del runs[uid]
            if not runs:
                del self._runs[key]
                return []
            return sorted(runs.values(), key=lambda r: (r.started_at, r.job), reverse=True)
