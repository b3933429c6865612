"""``nocturne watch NAME``: follow a schedule's run in flight from its ``status.activeRun`` --
steps and budget as bars, what it is doing now -- until it ends, then say how it ended.

Reads only the AgentSchedule, with the user's kubeconfig, once per ``interval``: status is the
operator's (it writes ``activeRun`` at most every few seconds from the runner's reports), so a
watcher costs one GET per second and nothing on the run's path. In a terminal the run is drawn
live with rich; piped, one line per change is printed, for logs and scripts. Every text that
comes from status (the activity is the runner's word) is shown with its control characters
escaped.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from decimal import Decimal, InvalidOperation
from typing import Any, TextIO

from rich.console import Console, Group
from rich.live import Live
from rich.progress_bar import ProgressBar
from rich.table import Table
from rich.text import Text

from nocturne_operator.api.timestamps import parse_rfc3339
from nocturne_operator.cli.reports import printable

__all__ = ["Followed", "follow", "line"]

Fetch = Callable[[], Mapping[str, Any] | None]
"""The AgentSchedule as it is now (None: it is gone)."""

# After its activeRun is gone, how long to wait for status.lastRun to show the run's result
# (the operator records the finished Job, then writes status).
RESULT_WAIT_SECONDS = 60.0


@dataclass(frozen=True)
class Followed:
    """How following ended: the Job followed (None if none ran) and status.lastRun once it
    names that Job (None when it did not within the wait, or the schedule is gone)."""

    job: str | None
    last_run: Mapping[str, Any] | None
    gone: bool = False


def _decimal(text: Any) -> Decimal:
    try:
        return Decimal(str(text))
    except (InvalidOperation, ValueError):
        return Decimal(0)


def line(run: Mapping[str, Any]) -> str:
    """One printable line for a run in flight (what is printed per change when piped)."""
    parts = [
        f"{run.get('job')} attempt {run.get('attempt', 0)}",
        f"step {run.get('step', 0)}/{run.get('maxSteps', '?')}",
        f"{run.get('costUSD', '0')} of {run.get('budgetUSD', '?')} USD",
    ]
    if run.get("activity"):
        parts.append(str(run["activity"]))
    return printable(" | ".join(parts))


def _elapsed(run: Mapping[str, Any], now: datetime) -> str:
    try:
        seconds = int((now - parse_rfc3339(str(run.get("startedAt")))).total_seconds())
    except (TypeError, ValueError):
        return "?"
    return f"{seconds // 60}m{seconds % 60:02d}s"


def _panel(run: Mapping[str, Any], now: datetime) -> Group:
    """The live view of a run in flight: a grid of its Job, steps, budget and activity."""
    steps, max_steps = int(run.get("step") or 0), int(run.get("maxSteps") or 1)
    cost, budget = _decimal(run.get("costUSD")), _decimal(run.get("budgetUSD"))
    grid = Table.grid(padding=(0, 2))
    grid.add_column(style="bold")
    grid.add_column()
    grid.add_column()
    grid.add_row(
        "run",
        Text(printable(f"{run.get('job')} (attempt {run.get('attempt', 0)})")),
        Text(f"{_elapsed(run, now)} elapsed"),
    )
    grid.add_row(
        "steps",
        ProgressBar(total=max_steps, completed=min(steps, max_steps), width=30),
        Text(f"{steps}/{max_steps}"),
    )
    grid.add_row(
        "budget",
        # The bar only draws the share; the amounts are shown as the operator wrote them.
        ProgressBar(total=float(budget) or 1.0, completed=float(min(cost, budget)), width=30),
        Text(printable(f"{run.get('costUSD')} of {run.get('budgetUSD')} USD")),
    )
    grid.add_row("now", Text(printable(run.get("activity") or "-")), Text(""))
    return Group(grid)


def follow(
    fetch: Fetch,
    *,
    out: TextIO,
    interactive: bool,
    wait: bool = True,
    interval: float = 1.0,
    sleep: Callable[[float], None] = time.sleep,
    clock: Callable[[], float] = time.monotonic,
    now: Callable[[], datetime] = lambda: datetime.now(UTC),
    on_waiting: Callable[[Mapping[str, Any]], None] | None = None,
    job_ended: Callable[[str], bool] | None = None,
) -> Followed:
    """Follow the schedule's run in flight (waiting for one to start when ``wait``) to its end:
    until status.lastRun names its Job with a result no retry follows (success, cancel, no
    budget) or ``job_ended(job)`` says the Job is over (finished or gone; without it: no retry
    has shown for ``RETRY_WAIT_SECONDS``), or nothing at all for ``RESULT_WAIT_SECONDS``."""
    started = _wait_for_a_run(fetch, wait, interval, sleep, on_waiting)
    if isinstance(started, Followed):
        return started
    body, first = started
    job = str(first.get("job"))
    view = _View(out, interactive, now)
    quiet_since: float | None = None  # when the Job's attempt was last seen in flight
    with view:
        while True:
            active = _active(body)
            if active is not None and active.get("job") == job:
                view.show(active)
                quiet_since = None
            else:
                quiet_since = clock() if quiet_since is None else quiet_since
                quiet = clock() - quiet_since
                last = (body.get("status") or {}).get("lastRun")
                if last is not None and last.get("job") == job:
                    over = job_ended(job) if job_ended is not None else quiet >= RETRY_WAIT_SECONDS
                    if last.get("result") in _NO_RETRY or over:
                        return Followed(job, last)
                elif quiet >= RESULT_WAIT_SECONDS:
                    return Followed(job, None)
            sleep(interval)
            fetched = fetch()
            if fetched is None:
                return Followed(job, None, gone=True)
            body = fetched


def _wait_for_a_run(
    fetch: Fetch,
    wait: bool,
    interval: float,
    sleep: Callable[[float], None],
    on_waiting: Callable[[Mapping[str, Any]], None] | None,
) -> tuple[Mapping[str, Any], Mapping[str, Any]] | Followed:
    """(the schedule, its run in flight), waiting for one to start when ``wait``; else how
    following ended (the schedule is gone, or nothing runs and ``wait`` is off)."""
    body = fetch()
    if body is None:
        return Followed(None, None, gone=True)
    active = _active(body)
    if active is not None:
        return body, active
    if not wait:
        return Followed(None, None)
    if on_waiting is not None:
        on_waiting(body)
    while active is None:
        sleep(interval)
        fetched = fetch()
        if fetched is None:
            return Followed(None, None, gone=True)
        body, active = fetched, _active(fetched)
    return body, active


# Results after which the Job is not retried: following ends at once.
_NO_RETRY = frozenset({"Succeeded", "Cancelled", "BudgetExceeded"})
# After a failed attempt the Job controller retries after 10 s, 20 s, ...: wait this long for
# the retry to show before calling the failure the run's end.
RETRY_WAIT_SECONDS = 30.0


def _active(body: Mapping[str, Any]) -> Mapping[str, Any] | None:
    active = (body.get("status") or {}).get("activeRun")
    return active if isinstance(active, Mapping) else None


class _View:
    """The run drawn live (a terminal) or one line per change (piped)."""

    def __init__(self, out: TextIO, interactive: bool, now: Callable[[], datetime]) -> None:
        self.out = out
        self.now = now
        self.live = (
            Live(console=Console(file=out, force_terminal=True), auto_refresh=False)
            if interactive
            else None
        )
        self.last_line = ""

    def __enter__(self) -> _View:
        if self.live is not None:
            self.live.__enter__()
        return self

    def __exit__(self, *exc: Any) -> None:
        if self.live is not None:
            self.live.__exit__(*exc)

    def show(self, run: Mapping[str, Any]) -> None:
        if self.live is not None:
            self.live.update(_panel(run, self.now()), refresh=True)
            return
        text = line(run)
        if text != self.last_line:
            print(text, file=self.out, flush=True)
            self.last_line = text
