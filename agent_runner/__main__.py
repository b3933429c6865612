"""``nocturne-runner``: one agent run of one AgentSchedule, inside a Job's pod.

Reads the task snapshot its Job carries, asks the operator's run API for a budget grant, runs the
agent within it (reporting the cost after every model call and what it is doing, checkpointing
the conversation after every completed step; a retry of the Job resumes from the last
checkpoint the grant hands back), reports the final record, writes a
small JSON summary to the termination log (the operator's fallback record when the final report
did not get through), and exits with a code ``podFailurePolicy`` reads.

No grant, no spend: without one (409, or the run API unreachable) no provider is called.
SIGTERM (deadline or deletion) reports TIMED_OUT or CANCELLED with the cost so far.
The runner holds no database credentials and no Kubernetes token (DESIGN.md §1).
"""

from __future__ import annotations

import logging
import signal
import sys
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from types import FrameType
from typing import Any

from pydantic import ValidationError

from agent_runner import exitcodes
from agent_runner.agent import RunResult, run_agent
from agent_runner.budget import Budget
from agent_runner.config import ConfigError, RunnerEnv, TaskDocument, load_env, parse_task
from agent_runner.contract import (
    FINISH_ALERT_REASON_MAX_CHARS,
    FINISH_ERROR_MAX_CHARS,
    FINISH_OUTPUT_MAX_CHARS,
    Checkpoint,
    CheckpointReport,
    FinishReport,
    Grant,
    ProgressReport,
    RunOutcome,
    RunRef,
    StartRequest,
    describe_validation_error,
    quantize_usd,
    usd_text,
)
from agent_runner.providers import make_provider
from agent_runner.runapi import (
    NoGrantError,
    RunApiClient,
    RunApiError,
    RunApiRefusedError,
)
from agent_runner.summary import Summary, write_termination_message
from agent_runner.tools import build_tools

log = logging.getLogger("nocturne.runner")

# Leave time to report the result before the Job's deadline kills the pod.
_DEADLINE_MARGIN = timedelta(seconds=10)
# The final report may take most of that margin (its retries included) ...
_FINISH_DEADLINE = 8.0
# ... but after SIGTERM the kubelet's grace period is running: one quick try, then the summary.
_TERMINATED_FINISH_DEADLINE = 2.0
# Progress is best effort and must not eat the run's time.
_PROGRESS_DEADLINE = 3.0
# The report before a call (what it may cost) is shorter still, and skipped while reports fail:
# an unreachable run API costs a call at most this, not two progress deadlines.
_RESERVE_DEADLINE = 1.0


class Terminated(BaseException):
    """SIGTERM arrived: the Job's deadline passed or the pod is being deleted."""


@dataclass
class Attempt:
    """What this attempt knows so far (for the reports, the summary and the SIGTERM path)."""

    env: RunnerEnv | None = None
    task: TaskDocument | None = None
    client: RunApiClient | None = None
    run: RunRef | None = None
    grant: Grant | None = None
    budget: Budget | None = None
    model_calls: int = 0
    reports_failing: bool = False  # the last progress report was not delivered
    started_at: datetime = field(default_factory=lambda: datetime.now(UTC))
    started_monotonic: float = field(default_factory=time.monotonic)


def main() -> int:
    """Run one attempt and return the process exit code."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    # httpx logs every request at INFO; the runner logs what matters itself.
    logging.getLogger("httpx").setLevel(logging.WARNING)
    signal.signal(signal.SIGTERM, _on_sigterm)
    state = Attempt()
    try:
        return _run(state)
    except Terminated:
        return _terminated(state)
    except ConfigError as exc:
        log.error("configuration error: %s", exc)  # noqa: TRY400 - no traceback for bad config
        _finish_failed(state, RunOutcome.FAILED, f"configuration error: {exc}")
        return exitcodes.CONFIG_ERROR
    except Exception as exc:
        # A bug: still release the grant and leave a record, then let the Job retry.
        log.exception("the runner failed")
        _finish_failed(state, RunOutcome.FAILED, f"runner error: {type(exc).__name__}: {exc}")
        return exitcodes.TRANSIENT
    finally:
        if state.client is not None:
            state.client.close()


def _on_sigterm(_signum: int, _frame: FrameType | None) -> None:
    raise Terminated


def _run(state: Attempt) -> int:
    env = state.env = load_env()
    task = state.task = parse_task(env.task)
    run = state.run = _run_ref(env, task)
    # Everything that can be refused for configuration is checked before the grant: a run that
    # cannot start must not hold a reservation.
    tools = build_tools(task.agent, allow_private=env.web_fetch_allow_private)
    provider = make_provider(task.agent, api_key=env.llm_api_key)
    try:
        try:
            client = state.client = RunApiClient(env.run_api_url, env.run_api_ca, env.token_file)
            grant = state.grant = client.start(StartRequest(run=run, started_at=state.started_at))
        except RunApiError as exc:
            return _no_grant(state, exc)
        log.info(
            "budget grant: execution %s, attempt %s, %s USD",
            grant.execution_id,
            grant.attempt,
            usd_text(grant.limit_usd),
        )
        # The grant already nets out this Job's earlier attempts and every other reservation.
        budget = state.budget = Budget(grant.limit_usd, grant.price)
        # Written at once: if the pod dies before the end, the operator still learns our row.
        _write_summary(state, RunOutcome.RUNNING)
        previous = grant.previous
        previous_state = previous.state if previous is not None else None
        if grant.resume is not None:
            state.model_calls = grant.resume.step
        if budget.remaining <= 0:
            result = _no_budget_left()
        else:
            result = run_agent(
                task,
                provider=provider,
                budget=budget,
                tools=tools,
                deadline=state.started_monotonic
                + task.timeout_seconds
                - _DEADLINE_MARGIN.total_seconds(),
                previous_state=previous_state if isinstance(previous_state, dict) else None,
                previous_output=previous.output if previous is not None else None,
                on_usage=lambda cost, i, o: _progress(state, cost, i, o),
                on_reserve=lambda reserved, doing: _announce(state, budget, reserved, doing),
                on_activity=lambda doing: _announce(state, budget, Decimal(0), doing),
                on_checkpoint=lambda checkpoint: _checkpoint(state, checkpoint),
                resume=grant.resume,
            )
    finally:
        provider.close()
    _record(state, result)
    return result.exit_code


def _run_ref(env: RunnerEnv, task: TaskDocument) -> RunRef:
    try:
        return RunRef(
            namespace=task.schedule.namespace,
            schedule=task.schedule.name,
            schedule_uid=task.schedule.uid,
            job_uid=env.job_uid,
            pod_uid=env.pod_uid,
        )
    except ValidationError as exc:
        raise ConfigError(f"run reference: {describe_validation_error(exc)}") from None


def _no_grant(state: Attempt, exc: RunApiError) -> int:
    """No grant, no spend: say why in the summary and exit without calling the provider."""
    if isinstance(exc, NoGrantError):
        status, code = RunOutcome.BUDGET_EXCEEDED, exitcodes.BUDGET_EXHAUSTED
        error = f"no budget grant: {exc.reason}: {exc.message}"
    elif isinstance(exc, RunApiRefusedError):
        status, code = RunOutcome.FAILED, exitcodes.CONFIG_ERROR
        error = f"no budget grant: run API refused: {exc}"
    else:  # RunApiUnavailableError: the Job retries within backoffLimit, spending nothing
        status, code = RunOutcome.FAILED, exitcodes.TRANSIENT
        error = f"no budget grant: run API unavailable: {exc}"
    log.error("%s; nothing was spent", error)
    _write_summary(state, status, error=error)
    return code


def _no_budget_left() -> RunResult:
    return RunResult(
        status=RunOutcome.BUDGET_EXCEEDED,
        output=None,
        alert=False,
        alert_reason=None,
        state=None,
        cost=Decimal(0),
        input_tokens=0,
        output_tokens=0,
        steps=0,
        error="no budget left for this run (the grant is 0 USD)",
        exit_code=exitcodes.BUDGET_EXHAUSTED,
    )


def _progress(state: Attempt, cost: Decimal, input_tokens: int, output_tokens: int) -> None:
    """After a model call: its settled cost, nothing in flight."""
    state.model_calls += 1
    _report(
        state, cost, input_tokens, output_tokens, reserved=Decimal(0), deadline=_PROGRESS_DEADLINE
    )


def _announce(state: Attempt, budget: Budget, reserved: Decimal, activity: str) -> None:
    """Before a model call (what it may cost: charged if the pod is killed during it) or a
    tool call: what the run does now. Skipped while reports fail; the report after the next
    call tries again."""
    if state.reports_failing:
        return
    _report(
        state,
        budget.spent,
        budget.input_tokens,
        budget.output_tokens,
        reserved=reserved,
        deadline=_RESERVE_DEADLINE,
        activity=activity,
    )


def _checkpoint(state: Attempt, checkpoint: Checkpoint) -> None:
    """After a completed step: keep the conversation for a retry of the Job. Best effort: a
    lost or oversized checkpoint costs a retry the steps since the one before."""
    if state.client is None or state.run is None or state.grant is None:
        return
    try:
        report = CheckpointReport(
            run=state.run, execution_id=state.grant.execution_id, checkpoint=checkpoint
        )
    except ValidationError as exc:
        log.warning(
            "checkpoint after step %d not kept: %s",
            checkpoint.step,
            describe_validation_error(exc, secret_fields=frozenset({"checkpoint"})),
        )
        return
    try:
        state.client.checkpoint(report, deadline=_PROGRESS_DEADLINE)
    except RunApiError as exc:
        log.warning("checkpoint after step %d not delivered: %s", checkpoint.step, exc)


def _report(
    state: Attempt,
    cost: Decimal,
    input_tokens: int,
    output_tokens: int,
    *,
    reserved: Decimal,
    deadline: float,
    activity: str | None = None,
) -> None:
    """Best effort: the grant is reserved already, so a lost report costs only freshness (and,
    before a call, the charge of that call should the pod be killed during it)."""
    if state.client is None or state.run is None or state.grant is None:
        return
    try:
        state.client.progress(
            ProgressReport(
                run=state.run,
                execution_id=state.grant.execution_id,
                cost_usd=quantize_usd(cost),
                reserved_usd=quantize_usd(reserved),
                input_tokens=input_tokens,
                output_tokens=output_tokens,
                steps=min(state.model_calls, 10_000),
                activity=activity[:200] if activity else None,
            ),
            deadline=deadline,
        )
    except RunApiError as exc:
        state.reports_failing = True
        log.warning("progress report not delivered; the run goes on: %s", exc)
    else:
        state.reports_failing = False


def _finish(state: Attempt, deadline: float, /, **fields: Any) -> bool:
    """Send the final report; True if the operator recorded it."""
    if state.client is None or state.run is None or state.grant is None:
        return False
    try:
        report = FinishReport(
            run=state.run,
            execution_id=state.grant.execution_id,
            completed_at=datetime.now(UTC),
            **fields,
        )
        state.client.finish(report, deadline=deadline)
    except (RunApiError, ValidationError) as exc:
        log.warning("final report not delivered; the termination summary is the fallback: %s", exc)
        return False
    return True


def _record(state: Attempt, result: RunResult) -> None:
    status = result.status
    written = _finish(
        state,
        _FINISH_DEADLINE,
        status=status,
        cost_usd=quantize_usd(result.cost),
        input_tokens=result.input_tokens,
        output_tokens=result.output_tokens,
        output=_clip(result.output, FINISH_OUTPUT_MAX_CHARS),
        error=_clip(result.error, FINISH_ERROR_MAX_CHARS),
        alert=result.alert,
        alert_reason=_clip(result.alert_reason, FINISH_ALERT_REASON_MAX_CHARS),
        metadata=_metadata(result),
        state=result.state if status is RunOutcome.SUCCEEDED else None,
    )
    _write_summary(state, status, result=result, history_written=written)
    log.info(
        "run %s: cost %s USD, %s+%s tokens, %s steps",
        status,
        usd_text(result.cost),
        result.input_tokens,
        result.output_tokens,
        result.steps,
    )


def _metadata(result: RunResult) -> dict[str, Any]:
    """What a person reads about the run's steps (``nocturne show``)."""
    metadata: dict[str, Any] = {
        "steps": result.steps,
        "refusals": [r.as_dict() for r in result.refusals],
        "toolCalls": [c.model_dump(mode="json", exclude_none=True) for c in result.tool_calls],
    }
    if result.resumed_from is not None:
        metadata["resumedFromStep"] = result.resumed_from
    return metadata


def _terminated(state: Attempt) -> int:
    """SIGTERM: TIMED_OUT when the run's time is up, else CANCELLED; keep the cost so far."""
    signal.signal(signal.SIGTERM, signal.SIG_IGN)  # one report, even if a second TERM comes
    task = state.task
    elapsed = time.monotonic() - state.started_monotonic
    timed_out = task is not None and elapsed >= task.timeout_seconds - 2 * _DEADLINE_MARGIN.seconds
    status = RunOutcome.TIMED_OUT if timed_out else RunOutcome.CANCELLED
    _finish_failed(
        state,
        status,
        "terminated by SIGTERM" + (" at the deadline" if timed_out else ""),
        deadline=_TERMINATED_FINISH_DEADLINE,
    )
    return 128 + signal.SIGTERM


def _finish_failed(
    state: Attempt, status: RunOutcome, error: str, *, deadline: float = _FINISH_DEADLINE
) -> None:
    """Report an attempt that ended without a result, at its worst-case cost so far (the
    provider may bill a call that was in flight)."""
    budget = state.budget
    cost = quantize_usd(budget.committed) if budget is not None else Decimal(0)
    tokens = (budget.input_tokens, budget.output_tokens) if budget is not None else (0, 0)
    written = _finish(
        state,
        deadline,
        status=status,
        cost_usd=cost,
        input_tokens=tokens[0],
        output_tokens=tokens[1],
        error=_clip(error, FINISH_ERROR_MAX_CHARS),
    )
    _write_summary(
        state,
        status,
        cost=cost,
        tokens=tokens,
        error=error,
        history_written=written,
    )


def _clip(text: str | None, limit: int) -> str | None:
    if text is None or len(text) <= limit:
        return text
    return text[: limit - 1] + "…"


def _write_summary(
    state: Attempt,
    status: RunOutcome,
    *,
    result: RunResult | None = None,
    cost: Decimal | None = None,
    tokens: tuple[int, int] = (0, 0),
    error: str | None = None,
    history_written: bool = False,
) -> None:
    grant = state.grant
    fields: dict[str, Any] = {
        "executionId": grant.execution_id if grant is not None else None,
        "status": status,
        "costUSD": result.cost if result else (cost or Decimal(0)),
        "inputTokens": tokens[0],
        "outputTokens": tokens[1],
        "attempt": grant.attempt if grant is not None else None,
        "startedAt": state.started_at,
        "historyWritten": history_written,
    }
    if state.task is not None:
        fields.update(model=state.task.agent.model, provider=state.task.agent.provider)
    if status.final:
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
    summary = Summary.model_validate(fields)
    if state.env is None:
        write_termination_message(summary)
    else:
        write_termination_message(summary, state.env.termination_log)


if __name__ == "__main__":
    sys.exit(main())
