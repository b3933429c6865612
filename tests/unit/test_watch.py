"""``nocturne watch`` (issue 14): following status.activeRun to the run's end, from a sequence
of AgentSchedule bodies as the apiserver would return them one read after another."""

from __future__ import annotations

import io
from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any

from nocturne_operator.cli.watch import RETRY_WAIT_SECONDS, Followed, follow, line

NOW = datetime(2026, 12, 3, 9, 0, 30, tzinfo=UTC)


def active(step: int, cost: str, activity: str, job: str = "digest-1") -> dict[str, Any]:
    return {
        "job": job,
        "attempt": 0,
        "startedAt": "2026-12-03T09:00:00Z",
        "step": step,
        "maxSteps": 8,
        "costUSD": cost,
        "budgetUSD": "0.50",
        "activity": activity,
        "summary": f"step {step}/8, {cost} of 0.50 USD",
    }


def body(run: dict[str, Any] | None = None, last: dict[str, Any] | None = None) -> dict[str, Any]:
    status: dict[str, Any] = {"nextRunLocal": "2026-12-04 09:00 JST"}
    if run is not None:
        status["activeRun"] = run
    if last is not None:
        status["lastRun"] = last
    return {"metadata": {"name": "digest"}, "status": status}


class Reads:
    """The bodies the apiserver returns, one per read; the last one repeats. A clock that
    moves one interval per sleep."""

    def __init__(self, *bodies: Mapping[str, Any] | None) -> None:
        self.bodies = list(bodies)
        self.reads = 0
        self.time = 0.0

    def fetch(self) -> Mapping[str, Any] | None:
        self.reads += 1
        return self.bodies.pop(0) if len(self.bodies) > 1 else self.bodies[0]

    def sleep(self, seconds: float) -> None:
        self.time += seconds

    def clock(self) -> float:
        return self.time


def run_follow(reads: Reads, **kwargs: Any) -> tuple[Followed, str]:
    out = io.StringIO()
    followed = follow(
        reads.fetch,
        out=out,
        interactive=kwargs.pop("interactive", False),
        sleep=reads.sleep,
        clock=reads.clock,
        now=lambda: NOW,
        **kwargs,
    )
    return followed, out.getvalue()


SUCCEEDED = {"job": "digest-1", "result": "Succeeded", "costUSD": "0.03"}


def test_piped_it_prints_one_line_per_change_and_ends_with_the_result() -> None:
    waited: list[Mapping[str, Any]] = []
    reads = Reads(
        body(),
        body(active(0, "0.00", "starting")),
        body(active(1, "0.01", "web_fetch news.test")),
        body(active(1, "0.01", "web_fetch news.test")),  # unchanged: no new line
        body(active(2, "0.03", "model call 3/8")),
        body(None),  # the run ended; its result is not on status yet
        body(None, SUCCEEDED),
    )
    followed, out = run_follow(reads, on_waiting=waited.append)
    assert followed == Followed("digest-1", SUCCEEDED)
    assert len(waited) == 1
    assert out.splitlines() == [
        "digest-1 attempt 0 | step 0/8 | 0.00 of 0.50 USD | starting",
        "digest-1 attempt 0 | step 1/8 | 0.01 of 0.50 USD | web_fetch news.test",
        "digest-1 attempt 0 | step 2/8 | 0.03 of 0.50 USD | model call 3/8",
    ]


def test_a_failed_attempt_is_the_end_only_when_no_retry_shows() -> None:
    failed = {"job": "digest-1", "result": "Failed", "costUSD": "0.01"}
    retry = active(2, "0.02", "resuming after step 2") | {"attempt": 1}
    reads = Reads(
        body(active(2, "0.01", "model call 3/8")),
        body(None, failed),  # attempt 0 died; the Job retries after 10 s
        *[body(None, failed)] * 10,
        body(retry, failed),
        body(None, SUCCEEDED),
    )
    followed, out = run_follow(reads)
    assert followed.last_run == SUCCEEDED
    assert "digest-1 attempt 1 | step 2/8 | 0.02 of 0.50 USD | resuming after step 2" in out
    # With no retry, the failure is the end after RETRY_WAIT_SECONDS.
    reads = Reads(body(active(2, "0.01", "x")), body(None, failed))
    followed, _ = run_follow(reads)
    assert followed.last_run == failed
    assert reads.time >= RETRY_WAIT_SECONDS


def test_no_wait_and_a_schedule_that_goes_away() -> None:
    assert run_follow(Reads(body()), wait=False)[0] == Followed(None, None)
    assert run_follow(Reads(None))[0] == Followed(None, None, gone=True)
    followed, _ = run_follow(Reads(body(active(1, "0", "x")), None))
    assert followed == Followed("digest-1", None, gone=True)


def test_another_runs_start_does_not_hide_the_followed_runs_end() -> None:
    reads = Reads(
        body(active(1, "0.01", "x")),
        body(active(0, "0", "starting", job="digest-2"), SUCCEEDED),
    )
    assert run_follow(reads)[0] == Followed("digest-1", SUCCEEDED)


def test_texts_from_status_reach_the_terminal_escaped() -> None:
    hostile = active(1, "0.01", "web_fetch \x1b]0;pwned\x07 evil.test")
    assert "\x1b" not in line(hostile)
    assert "\\x1b]0;pwned\\x07" in line(hostile)
    # Drawn live (a terminal), the activity is escaped too; the bars are rich's.
    _, out = run_follow(Reads(body(hostile), body(None, SUCCEEDED)), interactive=True)
    assert "pwned" in out
    assert "\x1b]0;pwned" not in out
    assert "1/8" in out
    assert "0.01 of 0.50 USD" in out


def test_with_the_job_to_ask_a_failed_attempt_is_the_end_only_when_the_job_is() -> None:
    failed = {"job": "digest-1", "result": "Failed", "costUSD": "0.01"}
    asked: list[str] = []
    over = [False]

    def job_ended(job: str) -> bool:
        asked.append(job)
        return over[0]

    # A long backoff: no retry for minutes, the Job still active; then it fails for good.
    reads = Reads(body(active(2, "0.01", "x")), *[body(None, failed)] * 200)
    original_sleep = reads.sleep

    def sleep(seconds: float) -> None:
        original_sleep(seconds)
        over[0] = reads.time >= 120  # the Job's last attempt failed two minutes later

    reads.sleep = sleep  # type: ignore[method-assign]
    followed, _ = run_follow(reads, job_ended=job_ended)
    assert followed.last_run == failed
    assert reads.time >= 120 > RETRY_WAIT_SECONDS  # not ended at the 30 s fallback
    assert set(asked) == {"digest-1"}
