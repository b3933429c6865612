"""Runs as users meet them (issue 14): the scheduled path, and cancel. The path users take: nobody
asks for a run; the CronJob controller fires the AgentSchedule's CronJob at its slot, the real
node runs the runner image, the run reports through the operator's run API and reaches history and
status. Its own operator (minimum interval lowered to one minute for the test, the default
resync of an hour: passes come from events and the schedule's own timer, issue 13) over its own
namespace."""

from __future__ import annotations

from decimal import Decimal
from typing import Any

import pytest

from agent_runner.contract import RunOutcome
from e2e.conftest import Model
from e2e.schedules import nocturne_cli, run_now, status_of
from e2e.test_resilience import (
    NAME,
    apply,
    history_schema,
    manifest,
    prepare_namespace,
    solo_operator,
)
from harness.kube import Cluster, Kubectl, wait_for
from harness.postgres import PostgresServer
from integration.llm_server import OPENAI_PATH, ScriptedServer
from nocturne_operator.api.timestamps import parse_rfc3339
from nocturne_operator.render import cronjob_name
from nocturne_operator.storage import History

pytestmark = pytest.mark.e2e


@pytest.mark.usefixtures("crds", "node")
def test_the_cronjob_controller_fires_a_schedule_and_its_run_reaches_history_and_status(
    cluster: Cluster,
    kubectl: Kubectl,
    solo_namespace: str,
    postgres: PostgresServer,
    model: tuple[Model, ScriptedServer],
) -> None:
    namespace = solo_namespace
    _, site = model
    url = history_schema(postgres, namespace)
    prepare_namespace(kubectl, namespace, url)
    # The default sweep and resync: the slot's pass comes from events and the timer.
    with solo_operator(
        cluster, namespace, url, "scheduled", site, settings={"NOCTURNE_MIN_INTERVAL_MINUTES": "1"}
    ):
        uid = apply(kubectl, namespace, manifest(site, schedule="* * * * *", suspend=False))
        first_slot = parse_rfc3339(status_of(kubectl, namespace, NAME)["nextRunAt"])

        status = wait_for(
            lambda: (
                (s := status_of(kubectl, namespace, NAME)).get("lastRun", {}).get("result")
                == "Succeeded"
                and s
            ),
            180,
            "a run the CronJob controller started to succeed and reach status",
        )
        job_name = status["lastRun"]["job"]
        [job] = [
            j for j in kubectl.items("jobs", "-n", namespace) if j["metadata"]["name"] == job_name
        ]
        # Made by the CronJob controller at a slot: owned by our CronJob, not a run-now.
        [owner] = job["metadata"]["ownerReferences"]
        assert (owner["kind"], owner["name"]) == ("CronJob", cronjob_name(NAME))
        assert "cronjob.kubernetes.io/instantiate" not in job["metadata"].get("annotations", {})
        assert "batch.kubernetes.io/cronjob-scheduled-timestamp" in job["metadata"]["annotations"]

        with History.connect(url) as history:
            [row] = [r for r in history.runs(namespace, NAME) if r.job_name == job_name]
        assert (row.status, row.schedule_uid, row.manual_request) == (
            RunOutcome.SUCCEEDED,
            uid,
            None,
        )
        assert row.cost_usd > 0
        assert status["runs"]["succeeded"] >= 1
        assert Decimal(status["totalCostUSD"]) >= row.cost_usd
        # The slot that fired is behind: the next runs moved on.
        assert parse_rfc3339(status["nextRunAt"]) > first_slot


@pytest.mark.usefixtures("crds", "node")
def test_cancel_stops_the_active_run_which_ends_cancelled_and_is_audited(
    cluster: Cluster,
    kubectl: Kubectl,
    solo_namespace: str,
    postgres: PostgresServer,
    model: tuple[Model, ScriptedServer],
) -> None:
    """`nocturne cancel`: the operator deletes the running Job (foreground), the runner gets
    SIGTERM and reports CANCELLED; an Event and an audit row say who; no failure is counted;
    cancelling again changes nothing."""
    namespace = solo_namespace
    answers, site = model
    answers.delay = 60  # the model's answer is still coming when the run is cancelled
    url = history_schema(postgres, namespace)
    prepare_namespace(kubectl, namespace, url)
    # The default sweep (a minute): the cancelled pod is recorded at its own event.
    with solo_operator(cluster, namespace, url, "cancel", site, settings={}):
        apply(kubectl, namespace, manifest(site))
        run_now(kubectl, namespace, "slow", NAME)

        def rows() -> list[Any]:
            with History.connect(url) as history:
                return history.runs(namespace, NAME)

        [running] = wait_for(rows, 60, "the run to start")
        assert running.status is RunOutcome.RUNNING
        wait_for(lambda: site.requests_to(OPENAI_PATH), 30, "the model call in flight")
        cancel = nocturne_cli(cluster, "cancel", NAME, "-n", namespace)
        assert cancel.returncode == 0, cancel.stdout + cancel.stderr
        assert f"Job {running.job_name} to be cancelled" in cancel.stdout

        [ended] = wait_for(
            lambda: [r for r in rows() if r.status is RunOutcome.CANCELLED],
            60,
            "the run to end CANCELLED",
        )
        assert ended.id == running.id
        [event] = wait_for(
            lambda: [
                e
                for e in kubectl.items("events", "-n", namespace)
                if e.get("reason") == "RunCancelled"
            ],
            30,
            "the RunCancelled Event",
        )
        assert f"Job {running.job_name} deleted" in event["message"]
        with History.connect(url) as history:
            [audited] = [e for e in history.events(namespace, NAME) if e.kind == "run_cancelled"]
        assert audited.actor  # who asked: the CLI's field manager
        status = wait_for(
            lambda: (s := status_of(kubectl, namespace, NAME)).get("lastRun") and s,
            30,
            "the cancelled run on status",
        )
        assert status["lastRun"]["result"] == "Cancelled"
        assert (status["runs"]["failed"], status["consecutiveFailures"]) == (0, 0)
        again = nocturne_cli(cluster, "cancel", NAME, "-n", namespace)
        assert again.returncode == 0
        assert "has no active run; nothing changed" in again.stdout
