"""Memory across runs, wired end to end (issue 14): the competitor monitor runs twice on the
real cluster; the first run saves what it saw, the page changes, and the second run receives the
first's output and state through the operator's grant and reports the change. The model is the
local OpenAI-compatible server, the page a local site."""

from __future__ import annotations

import json

import pytest

from e2e.schedules import run_now, status_of
from e2e.test_resilience import (
    NAME,
    apply,
    history_schema,
    manifest,
    prepare_namespace,
    solo_operator,
    wait_for_succeeded,
)
from harness.kube import Cluster, Kubectl
from harness.postgres import PostgresServer
from integration.llm_server import (
    OPENAI_PATH,
    Call,
    Recorded,
    Reply,
    ScriptedServer,
    html_page,
    openai_reply,
)
from nocturne_operator.storage import History

pytestmark = pytest.mark.e2e
STATE_KEY = "competitor-prices"


@pytest.mark.usefixtures("crds", "node")
def test_the_second_run_receives_the_first_runs_state_and_reports_the_change(
    cluster: Cluster, kubectl: Kubectl, solo_namespace: str, postgres: PostgresServer
) -> None:
    namespace = solo_namespace
    price = {"pro": "10"}

    def pricing(_request: Recorded) -> Reply:
        return html_page(f"<h1>Pricing</h1><p>Pro plan: {price['pro']} USD a month</p>")

    with ScriptedServer() as site:
        page = f"{site.url}/pricing"
        site.route("/pricing", pricing)
        site.script(
            OPENAI_PATH,
            openai_reply(calls=[Call("web_fetch", {"url": page})]),
            openai_reply(
                calls=[
                    Call(
                        "finish",
                        {"output": "Pro plan: 10 USD (first check).", "state": {"pro": "10"}},
                    )
                ]
            ),
            openai_reply(calls=[Call("web_fetch", {"url": page})]),
            openai_reply(
                calls=[
                    Call(
                        "finish",
                        {
                            "output": "The Pro plan went from 10 to 12 USD a month.",
                            "alert": True,
                            "alert_reason": "a competitor raised a price",
                            "state": {"pro": "12"},
                        },
                    )
                ]
            ),
        )
        url = history_schema(postgres, namespace)
        prepare_namespace(kubectl, namespace, url)
        with solo_operator(cluster, namespace, url, "memory", site):
            body = manifest(
                site,
                task={
                    "query": "Report price changes since the last check.",
                    "stateKey": STATE_KEY,
                    "context": {"pages": [page]},
                },
                agent={"tools": ["web_fetch"], "maxSteps": 4},
            )
            uid = apply(kubectl, namespace, body)
            run_now(kubectl, namespace, "first", NAME)
            wait_for_succeeded(kubectl, namespace, 1, 90, "the first check")
            price["pro"] = "12"
            run_now(kubectl, namespace, "second", NAME)
            wait_for_succeeded(kubectl, namespace, 2, 90, "the second check")
            status = status_of(kubectl, namespace, NAME)

        calls = site.requests_to(OPENAI_PATH)
        assert len(calls) == 4, [c.json() for c in calls]
        first_prompt = json.dumps(calls[0].json()["messages"])
        second_prompt = json.dumps(calls[2].json()["messages"])
        assert "there is no previous output or state" in first_prompt
        # The second run's first call carries what the first left: its output and its state.
        assert "Pro plan: 10 USD (first check)." in second_prompt
        assert json.dumps('{"pro": "10"}')[1:-1] in second_prompt
        # ... and the page it fetched says 12.
        assert "Pro plan: 12 USD a month" in json.dumps(calls[3].json()["messages"])

    with History.connect(url) as history:
        newest, oldest = history.runs(namespace, NAME, include_output=True)
        saved = history.load_state(namespace, NAME, STATE_KEY, schedule_uid=uid)
    assert oldest.output == "Pro plan: 10 USD (first check)."
    assert (newest.output, newest.alert, newest.alert_reason) == (
        "The Pro plan went from 10 to 12 USD a month.",
        True,
        "a competitor raised a price",
    )
    assert saved is not None
    assert saved.state == {"pro": "12"}
    assert status["lastRun"]["result"] == "Succeeded"
