"""Runs people can follow (issue 14), on the real cluster with the local model: a multi-step run
shows on status.activeRun and in `kubectl get asched` while it runs, `nocturne watch` follows it
to its end and prints its output, and a runner killed mid-run has its Job's retry resume from
the last checkpoint instead of paying for the steps again."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from collections.abc import Callable
from dataclasses import replace
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest

from agent_runner.contract import RunOutcome
from e2e.schedules import nocturne_cli, run_now, status_of
from e2e.test_resilience import (
    NAME,
    apply,
    history_schema,
    job_for,
    manifest,
    prepare_namespace,
    solo_operator,
    wait_for_succeeded,
)
from harness.kube import Cluster, Kubectl, wait_for
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
from nocturne_operator.storage import ExecutionRecord, History

pytestmark = pytest.mark.e2e

OUTPUT = "# Prices\n\n- Pro: 20 USD\n- Team: 50 USD"


def slowed(answer: Callable[[Recorded], Reply], seconds: float) -> Callable[[Recorded], Reply]:
    return lambda request: replace(answer(request), delay=seconds)


def steps(site: ScriptedServer, delay: float = 0.0) -> list[Callable[[Recorded], Reply]]:
    """One whole run: three pages fetched one step at a time, then the answer."""
    fetch = [
        openai_reply(calls=[Call("web_fetch", {"url": f"{site.url}/{page}"}, id=f"c-{page}")])
        for page in ("pro", "team", "enterprise")
    ]
    finish = openai_reply(calls=[Call("finish", {"output": OUTPUT, "alert": False})])
    return [slowed(answer, delay) for answer in (*fetch, finish)]


def site_pages(site: ScriptedServer, hang: dict[str, float]) -> None:
    site.route("/pro", html_page("<p>Pro: 20 USD</p>"))
    site.route("/team", html_page("<p>Team: 50 USD</p>"))
    # The third page can be made to hang: the runner is killed while it waits for it.
    site.route(
        "/enterprise",
        lambda _request: replace(html_page("<p>Enterprise: ask</p>"), delay=hang["seconds"]),
    )


def runs(url: str, namespace: str) -> list[ExecutionRecord]:
    with History.connect(url) as history:
        return history.runs(namespace, NAME, include_output=True)


def watch_process(cluster: Cluster, namespace: str, url: str) -> subprocess.Popen[str]:
    """`nocturne watch` as users run it, piped (one line per change), in the background."""
    env = {
        **os.environ,
        "PYTHONSAFEPATH": "1",
        "KUBECONFIG": str(cluster.kubeconfig),
        "NOCTURNE_DATABASE_URL": url,
    }
    command = ["watch", NAME, "-n", namespace, "--interval", "0.5"]
    return subprocess.Popen(
        [sys.executable, "-m", "nocturne_operator.cli.main", *command],
        env=env,
        cwd="/",
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


@pytest.mark.usefixtures("crds", "node")
def test_watch_follows_a_multi_step_run_to_its_end_and_prints_its_output(
    cluster: Cluster, kubectl: Kubectl, solo_namespace: str, postgres: PostgresServer
) -> None:
    namespace = solo_namespace
    url = history_schema(postgres, namespace)
    prepare_namespace(kubectl, namespace, url)
    with ScriptedServer() as site:
        site_pages(site, {"seconds": 0.0})
        # Each model answer comes 3 s late: the run takes about 12 s, status refreshes every 5.
        site.script(OPENAI_PATH, *steps(site, delay=3.0))
        with solo_operator(cluster, namespace, url, "watch", site):
            apply(kubectl, namespace, manifest(site, agent={"tools": ["web_fetch"]}))
            watcher = watch_process(cluster, namespace, url)
            try:
                run_now(kubectl, namespace, "followed", NAME)
                active = wait_for(
                    lambda: status_of(kubectl, namespace, NAME).get("activeRun"),
                    60,
                    "status.activeRun",
                )
                assert active["maxSteps"] == 10
                assert active["budgetUSD"] == "0.50"
                # kubectl shows the run in flight in its Running column.
                table = wait_for(
                    lambda: (
                        text
                        if "USD" in (text := kubectl("get", "asched", NAME, "-n", namespace))
                        else None
                    ),
                    30,
                    "the Running column",
                )
                assert "RUNNING" in table.splitlines()[0]
                assert "of 0.50 USD" in table.splitlines()[1]
                out, err = watcher.communicate(timeout=120)
            finally:
                if watcher.poll() is None:
                    watcher.kill()
                    watcher.wait()
            assert watcher.returncode == 0, out + err
            wait_for(
                lambda: "activeRun" not in status_of(kubectl, namespace, NAME),
                30,
                "status.activeRun to go once the run ended",
            )
    lines = out.splitlines()
    progress = [line for line in lines if " | step " in line]
    steps_seen = [int(line.split(" | step ")[1].split("/")[0]) for line in progress]
    assert steps_seen == sorted(steps_seen), progress  # never backwards
    assert steps_seen[-1] >= 2, progress  # it saw the run move, not just its start
    assert any("web_fetch 127.0.0.1" in line or "model call" in line for line in progress)
    # Piped, the run's output closes stdout, as `nocturne show` prints it.
    assert out.rstrip().endswith(OUTPUT), out
    assert "Succeeded" in err


def kill_runner(job_uid: str) -> int:
    """SIGKILL the runner process(es) of a Job, as an OOM kill would: found by the Job UID in
    their environment (the downward API puts it there). How many were killed."""
    needle = f"NOCTURNE_JOB_UID={job_uid}".encode()
    killed = 0
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            environ = (entry / "environ").read_bytes()
        except OSError:
            continue
        if needle in environ.split(b"\0"):
            try:
                os.kill(int(entry.name), signal.SIGKILL)
            except ProcessLookupError:
                continue
            killed += 1
    return killed


def conversation(request: Recorded) -> list[Any]:
    """The messages of a model call but the system prompt (its clock differs between runs)."""
    messages: list[Any] = request.json()["messages"]
    return messages[1:]


@pytest.mark.usefixtures("crds", "node")
def test_a_killed_runners_retry_resumes_from_its_checkpoint(
    cluster: Cluster, kubectl: Kubectl, solo_namespace: str, postgres: PostgresServer
) -> None:
    """The proof: an uninterrupted run first, for comparison; then a run whose runner is
    killed (SIGKILL) during its third step, after two completed, paid steps. The Job's retry
    resumes from step 3: it does not call the model for steps 1 and 2 again, the run costs less
    than two whole runs, and its output is the uninterrupted run's."""
    namespace = solo_namespace
    url = history_schema(postgres, namespace)
    prepare_namespace(kubectl, namespace, url)
    hang = {"seconds": 0.0}
    with ScriptedServer() as site:
        site_pages(site, hang)
        whole, interrupted = steps(site), steps(site)
        # The killed attempt makes calls 1-3 (its third step's fetch hangs); the retry 3 and 4.
        site.script(OPENAI_PATH, *whole, *interrupted[:3], *interrupted[2:])
        with solo_operator(cluster, namespace, url, "resume", site):
            apply(kubectl, namespace, manifest(site, agent={"tools": ["web_fetch"]}, retries=1))
            run_now(kubectl, namespace, "whole", NAME)
            wait_for_succeeded(kubectl, namespace, 1, 90, "the uninterrupted run")
            calls_whole = list(site.requests_to(OPENAI_PATH))
            assert len(calls_whole) == 4

            hang["seconds"] = 60.0
            run_now(kubectl, namespace, "killed", NAME)
            wait_for(lambda: len(site.requests_to("/enterprise")) == 2, 90, "step 3's fetch")
            job = wait_for(lambda: job_for(kubectl, namespace, "killed"), 30, "the Job")
            hang["seconds"] = 0.0  # the retry's fetch of the page answers at once
            assert kill_runner(job["metadata"]["uid"]) >= 1
            wait_for_succeeded(kubectl, namespace, 2, 120, "the resumed run")
            status = status_of(kubectl, namespace, NAME)
            shown = nocturne_cli(
                cluster, "show", NAME, job["metadata"]["name"], "-n", namespace, database_url=url
            )

    calls = site.requests_to(OPENAI_PATH)[4:]
    killed_calls, retry_calls = calls[:3], calls[3:]
    assert len(retry_calls) == 2, "the retry called the model for steps 3 and 4 only"
    # The retry's first call is step 3 of the same conversation: steps 1 and 2 and their page
    # texts came from the checkpoint, word for word the uninterrupted run's third call.
    assert conversation(retry_calls[0]) == conversation(killed_calls[2])
    assert conversation(retry_calls[0]) == conversation(calls_whole[2])
    attempts = sorted(
        (r for r in runs(url, namespace) if r.job_name == job["metadata"]["name"]),
        key=lambda r: r.attempt,
    )
    assert [(a.attempt, a.status) for a in attempts] == [
        (0, RunOutcome.FAILED),  # killed: recorded before its retry got a grant
        (1, RunOutcome.SUCCEEDED),
    ]
    assert attempts[1].output == OUTPUT  # the uninterrupted run's output
    assert attempts[1].metadata.get("resumedFromStep") == 2
    [uninterrupted] = [r for r in runs(url, namespace) if r.job_name != attempts[0].job_name]
    assert uninterrupted.output == OUTPUT
    resumed_cost = sum((a.cost_usd for a in attempts), Decimal(0))
    assert resumed_cost < 2 * uninterrupted.cost_usd, (resumed_cost, uninterrupted.cost_usd)
    assert status["lastRun"]["result"] == "Succeeded"
    assert (status["runs"]["succeeded"], status["runs"]["failed"]) == (2, 0)
    assert shown.returncode == 0, shown.stderr
    assert "resumed from the checkpoint after step 2" in shown.stderr
    assert shown.stdout.strip() == OUTPUT
