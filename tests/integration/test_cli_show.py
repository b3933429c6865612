"""`nocturne show` (issue 14): one run as people read it, piped as the digest alone, and as
JSON for scripts; hostile output never reaches a terminal as control sequences."""

from __future__ import annotations

import json
import sys
import uuid
from datetime import UTC, datetime, timedelta
from decimal import Decimal

import pytest

from agent_runner.contract import RunOutcome
from harness.postgres import PostgresServer
from nocturne_operator.cli.main import main
from nocturne_operator.storage import ExecutionKey, History, upgrade

pytestmark = pytest.mark.integration
T0 = datetime(2026, 12, 2, 0, 0, 3, tzinfo=UTC)
DIGEST = "# AI news, 2 December\n\n- Model A ships\n\t- with tools\n- Lab B raises \x1b]0;pwned\x07"


@pytest.fixture
def url(postgres: PostgresServer) -> str:
    url = postgres.fresh_schema(f"show_{uuid.uuid4().hex[:8]}")
    upgrade(url)
    with History.connect(url) as history:
        run(history, "digest-29400000", 0, RunOutcome.FAILED, error="provider said no\nstack")
        run(history, "digest-29400000", 1, RunOutcome.SUCCEEDED, output="yesterday's digest")
        run(
            history,
            "digest-29401440",
            0,
            RunOutcome.SUCCEEDED,
            output=DIGEST,
            alert=True,
            metadata={
                "steps": 3,
                "refusals": [
                    {"tool": "send_email", "reason": "not allowed", "detail": "to ceo", "step": 2}
                ],
                "toolCalls": [
                    {"step": 1, "tool": "web_fetch", "target": "news.test", "ok": True},
                    {"step": 2, "tool": "send_email", "ok": False},
                    {"step": 2, "tool": "web_fetch\x1b[31m", "target": "lab-b.test", "ok": True},
                    "not an object",
                ],
                "resumedFromStep": 1,
            },
            later=timedelta(days=1),
        )
    return url


def run(
    history: History,
    job: str,
    attempt: int,
    status: RunOutcome,
    *,
    output: str | None = None,
    error: str | None = None,
    alert: bool = False,
    metadata: dict[str, object] | None = None,
    later: timedelta = timedelta(0),
) -> None:
    key = ExecutionKey("research", "digest", "uid-1", job, f"uid-{job}", f"pod-{attempt}", attempt)
    started = T0 + later + timedelta(minutes=attempt)
    run_id = history.start(key, model="gpt-4o-mini", provider="openai", started_at=started)
    history.finish(
        run_id,
        status=status,
        completed_at=started + timedelta(seconds=42),
        cost_usd=Decimal("0.0123"),
        input_tokens=1234,
        output_tokens=567,
        output=output,
        error=error,
        alert=alert,
        alert_reason="Lab B raised" if alert else None,
        metadata=metadata,
    )


def show(capsys: pytest.CaptureFixture[str], url: str, *args: str) -> tuple[int, str, str]:
    """``nocturne show digest [RUN] [-o json]`` (RUN right after the name, as users type it)."""
    code = main(["show", "digest", *args, "-n", "research", "--database-url", url])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_piped_the_newest_run_is_its_output_alone(
    url: str, capsys: pytest.CaptureFixture[str]
) -> None:
    code, out, err = show(capsys, url)
    assert code == 0
    # The digest as written, lines and tabs kept, a terminal escape shown, never sent.
    assert out == DIGEST.replace("\x1b", "\\x1b").replace("\x07", "\\x07") + "\n"
    assert err.splitlines() == [
        "research/digest: Job digest-29401440, attempt 0 (scheduled)",
        "Succeeded: started 2026-12-03 00:00:03 UTC, took 42.0 s",
        "cost 0.0123 USD; tokens 1,234 in, 567 out; model gpt-4o-mini (openai); 3 steps",
        "alert: Lab B raised",
        "resumed from the checkpoint after step 1 (earlier attempt)",
        "tool calls:",
        "  step 1: web_fetch news.test",
        "  step 2: send_email (failed)",
        "  step 2: web_fetch\\x1b[31m lab-b.test",  # the runner's word: shown, not obeyed
        "refused operations:",
        "  step 2: send_email: not allowed (to ceo)",
    ]


def test_a_job_shows_its_newest_attempt_and_a_run_id_that_very_run(
    url: str, capsys: pytest.CaptureFixture[str]
) -> None:
    code, out, err = show(capsys, url, "digest-29400000")
    assert (code, out) == (0, "yesterday's digest\n")
    assert "attempt 1" in err
    code, out, _ = show(capsys, url, "digest-29400000", "-o", "json")
    first = json.loads(out)
    code, out, err = show(capsys, url, str(first["id"] - 1))
    assert code == 0
    assert out == ""
    assert "error: provider said no" in err
    assert "(no output)" in err


def test_json_has_everything_and_unknown_runs_are_named(
    url: str, capsys: pytest.CaptureFixture[str]
) -> None:
    code, out, _ = show(capsys, url, "-o", "json")
    assert code == 0
    doc = json.loads(out)
    assert (doc["namespace"], doc["schedule"], doc["job"], doc["status"]) == (
        "research",
        "digest",
        "digest-29401440",
        "SUCCEEDED",
    )
    assert doc["output"] == DIGEST  # JSON escapes it itself
    assert (doc["alert"], doc["alertReason"], doc["steps"]) == (True, "Lab B raised", 3)
    assert doc["refusals"] == [
        {"tool": "send_email", "reason": "not allowed", "detail": "to ceo", "step": 2}
    ]
    assert [c["tool"] for c in doc["toolCalls"]] == ["web_fetch", "send_email", "web_fetch\x1b[31m"]
    assert doc["resumedFromStep"] == 1
    for missing in ("digest-1", "999999"):
        code, out, _ = show(capsys, url, missing)
        assert code == 1
        assert f"research/digest has no run '{missing}' in history" in out
    assert main(["show", "other", "-n", "research", "--database-url", url]) == 1


def test_in_a_terminal_the_output_is_rendered_after_the_run(
    url: str, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(sys.stdout, "isatty", lambda: True)
    code, out, err = show(capsys, url)
    assert (code, err) == (0, "")
    lines = out.splitlines()
    assert lines[0] == "research/digest: Job digest-29401440, attempt 0 (scheduled)"
    assert "refused operations:" in lines
    rendered = out.split("  step 2: send_email: not allowed (to ceo)\n", 1)[1]
    assert "AI news, 2 December" in rendered
    assert "# AI news" not in rendered  # a heading, not markdown source
    assert "Model A ships" in rendered
    # The output's escape (set the window title) is shown as text, never sent; rich's own
    # styling (CSI sequences) is all the terminal gets.
    assert "\x1b]" not in out
    assert "\x07" not in out
    assert "\\x1b]0;pwned" in out
