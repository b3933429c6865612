"""``nocturne-runner``: one agent run of one AgentSchedule, inside a Job's pod.

Reads the task the operator rendered, runs the agent under its budget, records the attempt in
PostgreSQL (RUNNING at start, cost while running, final status at the end), writes a small JSON
summary to the termination log for the operator, and exits with a code ``podFailurePolicy`` reads.
SIGTERM (deadline or deletion) records TIMED_OUT or CANCELLED with the cost so far.
"""

from __future__ import annotations

import logging
import signal
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from types import FrameType
from typing import Any, TypeVar

from agent_runner import exitcodes
from agent_runner.agent import RunResult, run_agent
from agent_runner.budget import Budget, per_run_limit
from agent_runner.config import ConfigError, RunnerEnv, TaskDocument, load_env, load_task
from agent_runner.history import (
    ExecutionKey,
    ExecutionStatus,
    History,
    HistoryError,
    PriorSpend,
    month_start,
)
from agent_runner.prices import load_price_table
from agent_runner.providers import make_provider
from agent_runner.summary import Summary, write_termination_message
from agent_runner.tools import build_tools

log = logging.getLogger("nocturne.runner")
T = TypeVar("T")

# Leave time to record the result before the Job's deadline kills the pod.
_DEADLINE_MARGIN = timedelta(seconds=10)
_STATUS = {
    "succeeded": ExecutionStatus.SUCCEEDED,
    "failed": ExecutionStatus.FAILED,
    "budget_exceeded": ExecutionStatus.BUDGET_EXCEEDED,
    "timed_out": ExecutionStatus.TIMED_OUT,
}


class Terminated(BaseException):
    """SIGTERM arrived: the Job's deadline passed or the pod is being deleted."""


@dataclass
class Attempt:
    """What this attempt has recorded so far (for the summary and the SIGTERM path)."""

    env: RunnerEnv | None = None
    task: TaskDocument | None = None
    history: History | None = None
    execution_id: int | None = None
    budget: Budget | None = None
    attempt: int | None = None
    started_at: datetime = field(default_factory=lambda: datetime.now(UTC))
    started_monotonic: float = field(default_factory=time.monotonic)


def main() -> int:
    """Run one attempt and return the process exit code."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    signal.signal(signal.SIGTERM, _on_sigterm)
    state = Attempt()
    try:
        return _run(state)
    except Terminated:
        return _terminated(state)
    except ConfigError as exc:
        log.error("configuration error: %s", exc)  # noqa: TRY400 - no traceback for bad config
        _finish_failed(state, ExecutionStatus.FAILED, f"configuration error: {exc}")
        return exitcodes.CONFIG_ERROR


def _on_sigterm(_signum: int, _frame: FrameType | None) -> None:
    raise Terminated


def _run(state: Attempt) -> int:
    env = state.env = load_env()
    task = state.task = load_task(env.task_file)
    price = load_price_table(env.price_table).lookup(task.agent.provider, task.agent.model)
    provider = make_provider(task.agent, api_key=env.llm_api_key)
    try:
        state.history = _connect(env)
        schedule = task.schedule
        monthly = task.budget.max_monthly_usd is not None
        prior = _db(
            state,
            "read the earlier spend",
            None,
            lambda h: h.prior_spend(
                schedule.namespace,
                schedule.name,
                env.job_uid,
                env.pod_uid,
                month_start=month_start(state.started_at, task.time_zone) if monthly else None,
            ),
        )
        if prior is None:
            prior = PriorSpend(Decimal(0), Decimal(0), None, attempts=0)
        else:
            state.attempt = prior.attempts
        budget = state.budget = Budget(
            # per_run_limit ignores what a cap the task does not set would count.
            per_run_limit(
                task.budget,
                spent_by_other_jobs=prior.other_jobs,
                spent_this_month_by_other_jobs=max(
                    Decimal(0), prior.other_jobs_since_month_start or Decimal(0)
                ),
            ),
            price,
            spent_before=prior.this_job_other_attempts,
        )
        if state.attempt is not None:
            attempt = state.attempt
            state.execution_id = _db(
                state,
                "record the start",
                None,
                lambda h: h.start(
                    _key(env, task, attempt),
                    model=task.agent.model,
                    provider=task.agent.provider,
                    started_at=state.started_at,
                ),
            )
        # Written at once: if the pod dies before the end, the operator still learns our row.
        _write_summary(state, "RUNNING")
        saved = _db(
            state,
            "load the previous state",
            None,
            lambda h: h.load_state(schedule.namespace, schedule.name, task.task.state_key or ""),
        )
        if budget.remaining <= 0:
            result = _no_budget_left()
        else:
            result = run_agent(
                task,
                provider=provider,
                budget=budget,
                tools=build_tools(task.agent, allow_private=env.web_fetch_allow_private),
                deadline=state.started_monotonic
                + task.timeout_seconds
                - _DEADLINE_MARGIN.total_seconds(),
                previous_state=saved.state if saved else None,
                previous_output=saved.output if saved else None,
                on_usage=lambda cost, i, o: _progress(state, cost, i, o),
            )
    finally:
        provider.close()
    _record(state, result)
    return result.exit_code


def _db(state: Attempt, what: str, default: T, call: Callable[[History], T]) -> T:
    """Best effort: on the first database failure the run goes on without history and reports
    through its termination summary; the operator writes the row once the database is back."""
    if state.history is None:
        return default
    try:
        return call(state.history)
    except HistoryError as exc:
        log.warning(
            "history unavailable (%s); the run continues and reports through its "
            "termination summary: %s",
            what,
            exc,
        )
        state.history.close()
        state.history = None
        return default


def _connect(env: RunnerEnv) -> History | None:
    """The history store (connections open lazily), or None when its URL is unusable."""
    try:
        return History.connect(env.database_url.get_secret_value())
    except HistoryError as exc:
        log.warning("history unavailable, running without it: %s", exc)
        return None


def _no_budget_left() -> RunResult:
    return RunResult(
        status="budget_exceeded",
        output=None,
        alert=False,
        alert_reason=None,
        state=None,
        cost=Decimal(0),
        input_tokens=0,
        output_tokens=0,
        steps=0,
        error="no budget left for this run",
        exit_code=exitcodes.BUDGET_EXHAUSTED,
    )


def _key(env: RunnerEnv, task: TaskDocument, attempt: int) -> ExecutionKey:
    return ExecutionKey(
        namespace=task.schedule.namespace,
        schedule_name=task.schedule.name,
        schedule_uid=task.schedule.uid,
        job_name=env.job_name,
        job_uid=env.job_uid,
        pod_uid=env.pod_uid,
        attempt=attempt,
        manual_request=env.manual_request,
    )


def _progress(state: Attempt, cost: Decimal, input_tokens: int, output_tokens: int) -> None:
    execution_id = state.execution_id
    if execution_id is not None:
        _db(
            state,
            "record progress",
            None,
            lambda h: h.record_progress(
                execution_id, cost_usd=cost, input_tokens=input_tokens, output_tokens=output_tokens
            ),
        )


def _record(state: Attempt, result: RunResult) -> None:
    status = _STATUS[result.status]
    written = False
    history, task = state.history, state.task
    if history is not None and state.execution_id is not None and task is not None:
        try:
            history.finish(
                state.execution_id,
                status=status,
                completed_at=datetime.now(UTC),
                cost_usd=result.cost,
                input_tokens=result.input_tokens,
                output_tokens=result.output_tokens,
                output=result.output,
                error=result.error,
                alert=result.alert,
                alert_reason=result.alert_reason,
                metadata={
                    "steps": result.steps,
                    "refusals": [r.as_dict() for r in result.refusals],
                },
            )
            if status is ExecutionStatus.SUCCEEDED and result.state is not None:
                history.save_state(
                    task.schedule.namespace,
                    task.schedule.name,
                    task.task.state_key or "",
                    state=result.state,
                    output=result.output,
                    execution_id=state.execution_id,
                )
            written = True
        except HistoryError as exc:
            log.warning("could not record the result in history: %s", exc)
    _write_summary(state, status.value, result=result, history_written=written)
    log.info(
        "run %s: cost %s USD, %s+%s tokens, %s steps",
        status.value,
        result.cost,
        result.input_tokens,
        result.output_tokens,
        result.steps,
    )


def _terminated(state: Attempt) -> int:
    """SIGTERM: TIMED_OUT when the run's time is up, else CANCELLED; keep the cost so far."""
    task = state.task
    elapsed = time.monotonic() - state.started_monotonic
    timed_out = task is not None and elapsed >= task.timeout_seconds - 2 * _DEADLINE_MARGIN.seconds
    status = ExecutionStatus.TIMED_OUT if timed_out else ExecutionStatus.CANCELLED
    _finish_failed(
        state, status, "terminated by SIGTERM" + (" at the deadline" if timed_out else "")
    )
    return 128 + signal.SIGTERM


def _finish_failed(state: Attempt, status: ExecutionStatus, error: str) -> None:
    budget = state.budget
    cost = budget.committed if budget is not None else Decimal(0)
    written = False
    if state.history is not None and state.execution_id is not None:
        try:
            state.history.finish(
                state.execution_id,
                status=status,
                completed_at=datetime.now(UTC),
                cost_usd=cost,
                input_tokens=0,
                output_tokens=0,
                error=error,
            )
            written = True
        except HistoryError as exc:
            log.warning("could not record the %s result: %s", status.value, exc)
    _write_summary(state, status.value, cost=cost, error=error, history_written=written)


def _write_summary(
    state: Attempt,
    status: str,
    *,
    result: RunResult | None = None,
    cost: Decimal | None = None,
    error: str | None = None,
    history_written: bool = False,
) -> None:
    fields: dict[str, Any] = {
        "executionId": state.execution_id,
        "status": status,
        "costUSD": result.cost if result else (cost or Decimal(0)),
        "attempt": state.attempt,
        "startedAt": state.started_at,
        "historyWritten": history_written,
    }
    if state.task is not None:
        fields.update(model=state.task.agent.model, provider=state.task.agent.provider)
    if status != "RUNNING":
        fields["completedAt"] = datetime.now(UTC)
    if result is not None:
        fields.update(
            inputTokens=result.input_tokens,
            outputTokens=result.output_tokens,
            alert=result.alert,
            alertReason=result.alert_reason,
            error=result.error,
            outputPreview=result.output,
        )
    elif error is not None:
        fields["error"] = error
    path = state.env.termination_log if state.env is not None else None
    summary = Summary.model_validate(fields)
    if path is None:
        write_termination_message(summary)
    else:
        write_termination_message(summary, path)


if __name__ == "__main__":
    sys.exit(main())
