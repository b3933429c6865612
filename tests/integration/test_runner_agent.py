"""Whole agent runs: the offline provider with real web fetches, and real provider clients against
the local wire-protocol server doing tool-call round trips under a hard budget."""

from __future__ import annotations

import ipaddress
import json
import random
import re
import time
from collections.abc import Iterator
from decimal import Decimal
from typing import Any

import pytest
from pydantic import SecretStr

from agent_runner.agent import RunResult, run_agent
from agent_runner.budget import Budget
from agent_runner.config import TaskDocument, parse_task
from agent_runner.contract import Checkpoint, RunOutcome
from agent_runner.exitcodes import BUDGET_EXHAUSTED, CONFIG_ERROR, SUCCEEDED
from agent_runner.providers import Provider, RetryPolicy, make_provider
from agent_runner.providers.offline import LABEL
from agent_runner.tools import WebFetcher, build_tools
from agent_runner.tools.registry import REASON_NOT_ALLOWED
from integration.llm_server import (
    ANTHROPIC_PATH,
    OPENAI_PATH,
    Call,
    Reply,
    ScriptedServer,
    anthropic_reply,
    error_reply,
    html_page,
    openai_reply,
    running,
)
from nocturne_operator.prices import load_price_table

pytestmark = pytest.mark.integration

KEY = SecretStr("sk-test-agent-0123456789abcdefghijkl")
PRICES = load_price_table()


@pytest.fixture
def server() -> Iterator[ScriptedServer]:
    yield from running()


def task(server: ScriptedServer, **agent: Any) -> TaskDocument:
    provider = agent.pop("provider", "openai")
    model = {"openai": "gpt-4o-mini", "anthropic": "claude-sonnet-4-0"}.get(
        provider, "offline-demo"
    )
    base_url = {"openai": f"{server.url}/v1", "anthropic": server.url}.get(provider, "")
    return parse_task(
        {
            "version": 1,
            "schedule": {"namespace": "research", "name": "competitor-monitor", "uid": "u-1"},
            "task": {
                "query": "Check the pricing page and report changes since the last check.",
                "context": {"pages": [f"{server.url}/pricing"]},
                "stateKey": "competitor-prices",
            },
            "agent": {
                "model": model,
                "provider": provider,
                "baseURL": base_url,
                "tools": agent.pop("tools", ["web_fetch"]),
                "allowRestrictedOperations": agent.pop("allow", []),
                "maxSteps": agent.pop("max_steps", 6),
            },
            "budget": {"maxPerRunUSD": agent.pop("limit", "0.05")},
            "timeoutSeconds": 60,
            "timeZone": "Europe/Berlin",
        }
    )


def execute(
    doc: TaskDocument,
    *,
    spent_before: Decimal = Decimal(0),
    usage_log: list[Decimal] | None = None,
    timeout: float = 20,
    **kwargs: Any,
) -> tuple[RunResult, Budget]:
    price = PRICES.lookup(doc.agent.provider, doc.agent.model)
    budget = Budget(doc.budget.max_per_run_usd, price, spent_before=spent_before)
    provider: Provider = make_provider(
        doc.agent,
        api_key=KEY,
        retry=RetryPolicy(max_attempts=3, base_delay=0.01, max_delay=0.02),
        rng=random.Random(1),  # noqa: S311 - seeded, reproducible
    )
    fetcher = WebFetcher(allow_networks=[ipaddress.ip_network("127.0.0.1/32")])
    try:
        result = run_agent(
            doc,
            provider=provider,
            budget=budget,
            tools=build_tools(doc.agent, fetcher=fetcher),
            deadline=time.monotonic() + timeout,
            on_usage=(lambda cost, *_: usage_log.append(cost)) if usage_log is not None else None,
            **kwargs,
        )
    finally:
        provider.close()
    assert spent_before + result.cost <= doc.budget.max_per_run_usd or result.status == (
        RunOutcome.BUDGET_EXCEEDED
    )
    return result, budget


def test_offline_run_fetches_remembers_and_alerts_on_change(server: ScriptedServer) -> None:
    server.route("/pricing", html_page("<p>Pro plan: 20 USD</p>"))
    doc = task(server, provider="offline")
    first, _ = execute(doc)
    assert first.status is RunOutcome.SUCCEEDED
    assert first.exit_code == SUCCEEDED
    assert first.output is not None
    assert first.output.startswith(LABEL)
    assert "first check" in first.output
    assert first.alert is False
    assert first.cost == 0
    assert first.steps == 2
    assert first.state is not None
    assert first.state["runs"] == 1

    same, _ = execute(doc, previous_state=first.state, previous_output=first.output)
    assert same.alert is False
    assert "unchanged since the previous run" in str(same.output)
    assert f"Previous run: {LABEL}" in str(same.output)

    server.route("/pricing", html_page("<p>Pro plan: 25 USD</p>"))
    changed, _ = execute(doc, previous_state=same.state, previous_output=same.output)
    assert changed.alert is True
    assert changed.alert_reason == f"content changed: {server.url}/pricing"
    assert changed.state is not None
    assert changed.state["runs"] == 3
    assert len(server.requests_to("/pricing")) == 3


def test_openai_tool_call_round_trip_under_budget(server: ScriptedServer) -> None:
    server.route("/pricing", html_page("<h1>Pricing</h1><p>Pro plan: 25 USD</p>"))
    server.script(
        OPENAI_PATH,
        openai_reply(calls=[Call("web_fetch", {"url": f"{server.url}/pricing"}, id="c1")]),
        openai_reply(
            calls=[
                Call(
                    "finish",
                    {
                        "output": "Pro went from 20 to 25 USD.",
                        "alert": True,
                        "alert_reason": "Pro plan price rose 25%",
                        "state": {"pro": "25"},
                    },
                    id="c2",
                )
            ]
        ),
    )
    usage_log: list[Decimal] = []
    doc = task(server)
    result, budget = execute(doc, previous_state={"pro": "20"}, usage_log=usage_log)
    assert result.status is RunOutcome.SUCCEEDED
    assert (result.output, result.alert, result.state) == (
        "Pro went from 20 to 25 USD.",
        True,
        {"pro": "25"},
    )
    assert result.alert_reason == "Pro plan price rose 25%"
    assert result.steps == 2
    assert result.cost > 0
    assert result.cost <= doc.budget.max_per_run_usd
    assert usage_log == sorted(usage_log)
    assert usage_log[-1] == result.cost == budget.spent
    first, second = (r.json() for r in server.requests_to(OPENAI_PATH))
    assert '<previous_state>\n{"pro": "20"}\n</previous_state>' in first["messages"][0]["content"]
    assert [t["function"]["name"] for t in first["tools"]] == ["web_fetch", "finish"]
    tool_reply = second["messages"][-1]
    assert tool_reply["role"] == "tool"
    assert tool_reply["tool_call_id"] == "c1"
    assert "Pro plan: 25 USD" in tool_reply["content"]
    # Each request's output limit was sized from what remained of the budget.
    assert second["max_tokens"] <= first["max_tokens"]


def test_anthropic_round_trip(server: ScriptedServer) -> None:
    server.route("/pricing", html_page("<p>Pro plan: 25 USD</p>"))
    server.script(
        ANTHROPIC_PATH,
        anthropic_reply("Fetching.", [Call("web_fetch", {"url": f"{server.url}/pricing"})]),
        anthropic_reply("Pro costs 25 USD now."),
    )
    doc = task(server, provider="anthropic", limit="0.50")
    result, _ = execute(doc)
    assert (result.status, result.output, result.steps) == (
        RunOutcome.SUCCEEDED,
        "Pro costs 25 USD now.",
        2,
    )
    second = server.requests_to(ANTHROPIC_PATH)[1].json()
    assert second["messages"][-1]["content"][0]["type"] == "tool_result"
    assert "Pro plan: 25 USD" in second["messages"][-1]["content"][0]["content"]


def test_run_that_hits_its_budget(server: ScriptedServer) -> None:
    """Every call reports its whole reservation as usage; the run stops when no call fits, at or
    below the limit — never above."""

    def spend_everything(request: Any) -> Reply:
        body = request.json()
        reply = openai_reply(
            calls=[Call("web_fetch", {"url": f"{server.url}/pricing"})],
            usage={"prompt_tokens": len(request.body), "completion_tokens": body["max_tokens"]},
        )
        return reply(request)

    server.route("/pricing", html_page("<p>x</p>"))
    server.script(OPENAI_PATH, *[spend_everything for _ in range(6)])
    doc = task(server, limit="0.01")
    result, budget = execute(doc)
    assert result.status is RunOutcome.BUDGET_EXCEEDED
    assert result.exit_code == BUDGET_EXHAUSTED
    assert result.cost <= Decimal("0.01")
    assert budget.remaining < Decimal("0.01") / 10
    assert 1 <= result.steps < 6


def test_retry_attempt_continues_the_same_budget(server: ScriptedServer) -> None:
    server.script(OPENAI_PATH, openai_reply("never sent"))
    doc = task(server, limit="0.05")
    result, _ = execute(doc, spent_before=Decimal("0.0499"))
    assert result.status is RunOutcome.BUDGET_EXCEEDED
    assert result.steps == 0
    assert server.requests_to(OPENAI_PATH) == []


def test_refused_restricted_operation_is_reported(server: ScriptedServer) -> None:
    server.script(
        OPENAI_PATH,
        openai_reply(
            calls=[Call("send_email", {"to": "boss@corp.test", "subject": "x", "body": "y"})]
        ),
        openai_reply(calls=[Call("finish", {"output": "Would have e-mailed.", "alert": False})]),
    )
    result, _ = execute(task(server))
    assert result.status is RunOutcome.SUCCEEDED
    (refusal,) = result.refusals
    assert (refusal.tool, refusal.reason) == ("send_email", REASON_NOT_ALLOWED)
    tool_reply = server.requests_to(OPENAI_PATH)[1].json()["messages"][-1]
    assert tool_reply["content"].startswith("Refused: send_email is a restricted operation")


def test_ssrf_attempt_by_the_model_is_refused_and_recorded(server: ScriptedServer) -> None:
    server.script(
        OPENAI_PATH,
        openai_reply(
            calls=[Call("web_fetch", {"url": "http://169.254.169.254/latest/meta-data/"})]
        ),
        openai_reply("Could not read the metadata service."),
    )
    result, _ = execute(task(server))
    assert result.status is RunOutcome.SUCCEEDED
    assert [r.tool for r in result.refusals] == ["web_fetch"]
    # The address guard names the metadata endpoint (older wording: "link-local").
    assert re.search(r"metadata endpoint|link-local", result.refusals[0].detail)


def test_malformed_usage_is_charged_at_the_reservation(server: ScriptedServer) -> None:
    server.script(OPENAI_PATH, openai_reply("answer", usage={"prompt_tokens": -3}))
    result, budget = execute(task(server))
    assert result.status is RunOutcome.SUCCEEDED
    first = server.requests_to(OPENAI_PATH)[0].json()
    assert result.output_tokens == first["max_tokens"]
    assert result.cost == budget.spent > 0


def test_provider_over_reporting_stops_the_run(server: ScriptedServer) -> None:
    server.script(
        OPENAI_PATH,
        openai_reply("x", usage={"prompt_tokens": 10, "completion_tokens": 10_000_000}),
    )
    result, _ = execute(task(server, limit="1.00"))
    assert result.status is RunOutcome.BUDGET_EXCEEDED
    assert "beyond the call's reservation" in str(result.error)
    # Recorded as reported (rounded up to the micro-dollar), not hidden.
    assert result.cost == Decimal("6.000002")


def test_bad_key_mid_run_is_a_config_error(server: ScriptedServer) -> None:
    server.script(OPENAI_PATH, error_reply(401, "invalid api key"))
    result, _ = execute(task(server))
    assert (result.status, result.exit_code, result.cost) == (
        RunOutcome.FAILED,
        CONFIG_ERROR,
        Decimal(0),
    )
    assert KEY.get_secret_value() not in str(result.error)


def test_lost_response_then_deadline(server: ScriptedServer) -> None:
    server.script(OPENAI_PATH, Reply(delay=1.0, json={}), Reply(delay=1.0, json={}))
    result, budget = execute(task(server), timeout=0.5)
    assert result.status is RunOutcome.TIMED_OUT
    assert result.cost > 0  # the lost call may have been billed: charged at its reservation
    assert result.cost == budget.spent


def test_gateway_error_is_charged_at_its_reservation_before_the_retry(
    server: ScriptedServer,
) -> None:
    server.script(
        OPENAI_PATH,
        error_reply(504, "gateway timeout"),
        openai_reply(calls=[Call("finish", {"output": "done", "alert": False})]),
    )
    usage_log: list[Decimal] = []
    result, budget = execute(task(server), usage_log=usage_log, sleep=lambda seconds: None)
    assert (result.status, result.steps) == (RunOutcome.SUCCEEDED, 2)
    first, _ = server.requests_to(OPENAI_PATH)
    charged, total = usage_log
    # The 504 is recorded at its reservation (usage unknown): its whole output limit included.
    assert charged >= budget.price.output_usd_per_token * first.json()["max_tokens"]
    assert total > charged  # and the retry's reported usage on top
    assert result.cost == budget.spent
    assert budget.reserved == 0


def test_state_round_trips_through_json(server: ScriptedServer) -> None:
    state = {"prices": {"pro": "25", "team": "99"}, "seen": ["a", "b"], "note": "ü€"}
    server.script(
        OPENAI_PATH,
        openai_reply(calls=[Call("finish", {"output": "ok", "alert": False, "state": state})]),
    )
    result, _ = execute(task(server))
    assert json.loads(json.dumps(result.state)) == state


# ---- checkpoints and resume ------------------------------------------------------------------


def _three_steps(server: ScriptedServer, provider: str) -> list[Any]:
    """Two paid tool rounds, then the answer: the script of one whole run."""
    reply = openai_reply if provider == "openai" else anthropic_reply
    return [
        reply(None, [Call("web_fetch", {"url": f"{server.url}/pricing"}, id="c1")]),
        reply(None, [Call("web_fetch", {"url": f"{server.url}/plans?token=x"}, id="c2")]),
        reply(None, [Call("finish", {"output": "Pro 20 USD, Team 50 USD", "alert": False})]),
    ]


@pytest.mark.parametrize("provider", ["openai", "anthropic"])
def test_a_retry_resumes_from_the_checkpoint_and_pays_only_the_remaining_steps(
    server: ScriptedServer, provider: str
) -> None:
    path = OPENAI_PATH if provider == "openai" else ANTHROPIC_PATH
    server.route("/pricing", html_page("<p>Pro plan: 20 USD</p>"))
    server.route("/plans", html_page("<p>Team plan: 50 USD</p>"))
    doc = task(server, provider=provider)
    # The uninterrupted run, for comparison.
    server.script(path, *_three_steps(server, provider))
    whole, _ = execute(doc)
    assert (whole.status, whole.steps) == (RunOutcome.SUCCEEDED, 3)
    uninterrupted = server.requests_to(path)
    # The interrupted one: checkpoints after steps 1 and 2, then the pod "dies" (the third call
    # fails for good and the attempt ends: only its checkpoints matter here).
    checkpoints: list[Checkpoint] = []
    server.script(path, *_three_steps(server, provider)[:2], error_reply(400))
    first, _ = execute(doc, on_checkpoint=checkpoints.append)
    assert first.status is RunOutcome.FAILED
    assert [c.step for c in checkpoints] == [1, 2]
    last = checkpoints[-1]
    assert last.cost_usd == first.cost  # every paid call of the attempt is in it
    assert [(c.tool, c.target, c.ok) for c in last.tool_calls] == [
        ("web_fetch", "127.0.0.1", True),
        ("web_fetch", "127.0.0.1", True),  # the host only: no path, no query string
    ]
    # The retry: a new process gets the checkpoint back over the wire (JSON) and resumes.
    resumed = Checkpoint.model_validate_json(last.model_dump_json())
    calls_before = len(server.requests_to(path))
    server.script(path, _three_steps(server, provider)[2])
    retry, _ = execute(doc, resume=resumed)
    assert retry.status is RunOutcome.SUCCEEDED
    assert retry.output == whole.output
    assert (retry.steps, retry.resumed_from) == (3, 2)
    retry_calls = server.requests_to(path)[calls_before:]
    assert len(retry_calls) == 1  # steps 1 and 2 were not paid again

    # The one call the retry made is the uninterrupted run's third call, word for word but
    # for the system prompt's clock, and the reservation (max_tokens) that follows the budget.
    def conversation(request: Any) -> Any:
        body = request.json()
        return body.get("messages")[1:] if provider == "openai" else body.get("messages")

    assert conversation(retry_calls[0]) == conversation(uninterrupted[2])
    assert retry.cost < whole.cost  # only the last step
    assert len(retry.tool_calls) == 2


def test_a_step_whose_tool_failed_is_checkpointed_as_failed(server: ScriptedServer) -> None:
    server.script(
        OPENAI_PATH,
        openai_reply(None, [Call("web_fetch", {"url": "http://10.0.0.1/admin"}, id="c1")]),
        openai_reply("done"),
    )
    checkpoints: list[Checkpoint] = []
    activities: list[str] = []
    result, _ = execute(
        task(server), on_checkpoint=checkpoints.append, on_activity=activities.append
    )
    assert result.status is RunOutcome.SUCCEEDED
    [checkpoint] = checkpoints
    [brief] = checkpoint.tool_calls
    assert (brief.tool, brief.target, brief.ok) == ("web_fetch", "10.0.0.1", False)
    assert activities == ["web_fetch 10.0.0.1"]
