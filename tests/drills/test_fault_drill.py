"""The fault drill (issue 12): 30 schedules in one namespace, each asked again and again to run now,
some on the offline provider and some paying the local OpenAI-compatible model under budgets tight
enough that caps are reached; meanwhile a driver SIGKILLs the operator every 20 s (a new one starts
at once on the same run API port), restarts the kube-apiserver twice, stops PostgreSQL for 15 s and
SIGKILLs runner containers. Once everything is back and the sweep and the reaper have run, the
invariants in ``drills.invariants`` must hold; the table of faults and invariants is printed.

Reproducible: the fault timeline is fixed, the choices (which schedule runs next, which runner
dies) come from a seeded generator, and every wait is on a condition."""

from __future__ import annotations

import json
import random
import re
import threading
import time
from collections import Counter, defaultdict
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from decimal import Decimal
from typing import Any

import pytest

from drills.faults import (
    APISERVER_RESTART,
    FAULT_KINDS,
    OPERATOR_KILL,
    POSTGRES_OUTAGE,
    RUNNER_KILL,
    FaultLog,
    Operators,
    kill_runner,
    restart_apiserver,
)
from drills.invariants import (
    SeenJob,
    Verdict,
    each_finished_job_once,
    load_rows,
    nothing_running,
    operator_logs_clean,
    report_table,
    scan_logs,
    status_equals_history,
    status_mismatches,
    within_caps,
)
from e2e.conftest import OperatorProcess, operator_process
from e2e.schedules import condition, finished, run_now
from harness.controlplane import free_ports
from harness.kube import Cluster, Kubectl, wait_for
from harness.node import Node
from harness.postgres import PostgresServer
from integration.llm_server import OPENAI_PATH, Recorded, Reply, ScriptedServer, openai_reply
from nocturne_operator.prices import load_price_table
from nocturne_operator.runs.recorder import REAP_AFTER

pytestmark = [pytest.mark.drill, pytest.mark.e2e]

SEED = 20261202
FAULT_WINDOW = 150.0  # seconds of load under faults
SWEEP_SECONDS = 2
MAX_IN_FLIGHT = 6  # runs asked for at once (the CI machine has two CPUs)
UNANSWERED_AFTER = 150.0  # a run-now request without a finished Job this long is lost
API_KEY_SECRET = "llm-api-key"  # noqa: S105 - a Secret's name, not a secret
PAID_MODEL = "gpt-4o"  # dear enough that a few runs reach a cap
OFFLINE, PAID, CAPPED = "offline", "paid", "capped"
# 12 offline, 10 paid with room, 8 paid under a total cap that one run exhausts.
MIX = (OFFLINE,) * 12 + (PAID,) * 10 + (CAPPED,) * 8
BUDGETS = {
    OFFLINE: {"maxPerRunUSD": "0.10"},
    PAID: {"maxPerRunUSD": "0.05"},
    # A call needs a grant of about 0.0086 USD (its input bound counts a token per byte, plus
    # 64 output tokens) and costs about 0.0015: one run fits, the next finds the cap reached.
    CAPPED: {"maxPerRunUSD": "0.0095", "maxTotalUSD": "0.0095"},
}


POSTGRES_DOWN_SECONDS = 15.0
POSTGRES_BACK = "PostgreSQL started again"  # the end of an outage, not a fault of its own


def timeline() -> list[tuple[float, str]]:
    """When each fault begins, in seconds from the start of the load; fixed, so every drill
    injects the same faults in the same order."""
    events = [(float(t), OPERATOR_KILL) for t in range(20, int(FAULT_WINDOW), 20)]
    events += [(50.0, APISERVER_RESTART), (110.0, APISERVER_RESTART)]
    # Two events, so the operator killed at 80 s starts while PostgreSQL is down.
    events += [(75.0, POSTGRES_OUTAGE), (75.0 + POSTGRES_DOWN_SECONDS, POSTGRES_BACK)]
    events += [(float(t), RUNNER_KILL) for t in range(12, int(FAULT_WINDOW), 10)]
    return sorted(events)


def schedule_name(index: int) -> str:
    return f"drill-{MIX[index]}-{index:02d}"


def manifest(name: str, kind: str, model_url: str) -> dict[str, Any]:
    """A suspended schedule (only run-now starts its runs) that retries nothing: one pod per Job."""
    agent: dict[str, Any] = {"model": "offline-demo", "provider": "offline"}
    if kind != OFFLINE:
        agent = {
            "model": PAID_MODEL,
            "provider": "openai",
            "baseURL": model_url,
            "apiKeySecretRef": {"name": API_KEY_SECRET, "key": "key"},
        }
    return {
        "apiVersion": "nocturne.dev/v1alpha1",
        "kind": "AgentSchedule",
        "metadata": {"name": name},
        "spec": {
            "schedule": "0 9 * * *",
            "timeZone": "UTC",
            "suspend": True,
            # The name in the query lets the model server bill each call to its schedule.
            "task": {"query": f"Summarise the night's news for {name}"},
            "agent": agent,
            "budget": BUDGETS[kind],
            "timeoutSeconds": 60,
            "retries": 0,
        },
    }


@dataclass
class BillingModel:
    """The local model: answers every call and keeps what each one billed, per schedule (named
    in the query), at the price table's price."""

    names: tuple[str, ...]
    billed: dict[str, Decimal] = field(default_factory=lambda: defaultdict(Decimal))
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def __post_init__(self) -> None:
        price = load_price_table().lookup("openai", PAID_MODEL)
        self._in, self._out = price.input_usd_per_token, price.output_usd_per_token
        self._name = re.compile("|".join(re.escape(n) for n in sorted(self.names, key=len)[::-1]))

    def __call__(self, request: Recorded) -> Reply:
        reply = openai_reply("Three stories today.")(request)
        usage = reply.json["usage"]
        found = self._name.search(request.body.decode(errors="replace"))
        cost = self._in * usage["prompt_tokens"] + self._out * usage["completion_tokens"]
        with self._lock:
            self.billed[found.group(0) if found else "?"] += cost
        return reply


@pytest.fixture
def billing_model() -> Iterator[tuple[BillingModel, ScriptedServer]]:
    model = BillingModel(tuple(schedule_name(i) for i in range(len(MIX))))
    with ScriptedServer() as site:
        site.route(OPENAI_PATH, model, method="POST")
        yield model, site


class Load:
    """Asks the schedules to run now, at most ``MAX_IN_FLIGHT`` at once, each again once its last
    Job finished; and keeps every finished Job it sees. Rides out an absent apiserver."""

    def __init__(self, kubectl: Kubectl, namespace: str, rng: random.Random) -> None:
        self.kubectl, self.namespace, self.rng = kubectl, namespace, rng
        self.jobs: dict[str, SeenJob] = {}
        self.waiting: dict[str, tuple[str, float]] = {}  # schedule -> (request, asked at)
        self.asked = 0
        self.unanswered: list[str] = []
        self.draining = threading.Event()
        self.stopped = threading.Event()
        self.error: BaseException | None = None
        self._sequence: Counter[str] = Counter()
        self._thread = threading.Thread(target=self._run, name="drill-load", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def observe(self) -> list[dict[str, Any]] | None:
        """Every Job of the namespace now (None while the apiserver is away); finished ones are
        kept in ``jobs``."""
        out = self.kubectl("get", "jobs", "-n", self.namespace, "-o", "json", check=False)
        if not out:
            return None
        items: list[dict[str, Any]] = json.loads(out)["items"]
        for job in items:
            outcome = finished(job)
            meta = job["metadata"]
            if outcome and meta["uid"] not in self.jobs:
                self.jobs[meta["uid"]] = SeenJob(
                    meta["uid"],
                    meta["name"],
                    meta.get("labels", {}).get("nocturne.dev/schedule", "?"),
                    meta.get("annotations", {}).get("nocturne.dev/manual-request"),
                    outcome,
                )
        return items

    def _run(self) -> None:
        try:
            while not self.stopped.is_set():
                if self.observe() is not None:
                    self._step()
                time.sleep(1.0)
        except BaseException as exc:  # handed to the test, which fails with it
            self.error = exc

    def _step(self) -> None:
        answered = {(j.schedule, j.request) for j in self.jobs.values()}
        now = time.monotonic()
        for name, (request, since) in list(self.waiting.items()):
            if (name, request) in answered:
                del self.waiting[name]
            elif now - since > UNANSWERED_AFTER:
                self.unanswered.append(f"{name}: run-now {request!r}")
                del self.waiting[name]
        if self.draining.is_set():
            return
        idle = [schedule_name(i) for i in range(len(MIX)) if schedule_name(i) not in self.waiting]
        self.rng.shuffle(idle)
        for name in idle[: max(0, MAX_IN_FLIGHT - len(self.waiting))]:
            self._sequence[name] += 1
            request = f"r{self._sequence[name]:03d}"
            try:
                run_now(self.kubectl, self.namespace, request, name)
            except AssertionError:
                self._sequence[name] -= 1  # the apiserver went away: ask again next time
                return
            self.waiting[name] = (request, time.monotonic())
            self.asked += 1

    def drain(self, timeout: float) -> None:
        """Ask for nothing more; wait until every request has its finished Job (or is lost)."""
        self.draining.set()
        wait_for(lambda: not self.waiting or self.error, timeout, "the last runs to finish")

    def stop(self) -> None:
        self.stopped.set()
        self._thread.join(30)
        if self.error is not None:
            raise self.error


def drive(
    faults: FaultLog,
    *,
    operators: Operators,
    cluster: Cluster,
    postgres: PostgresServer,
    kubectl: Kubectl,
    namespace: str,
    node: Node,
    rng: random.Random,
) -> None:
    """Inject the timeline's faults, each at its time (in this thread, one after another)."""
    assert cluster.local is not None
    killed: set[str] = set()
    for at, kind in timeline():
        time.sleep(max(0.0, faults.started + at - time.monotonic()))
        began = time.monotonic()
        if kind == OPERATOR_KILL:
            pid = operators.kill()
            faults.injected(kind, began, f"pid {pid}; {operators.current.log.name} serving")
        elif kind == APISERVER_RESTART:
            took = restart_apiserver(cluster.local)
            faults.injected(kind, began, f"back after {took:.1f} s")
        elif kind == POSTGRES_OUTAGE:
            postgres.stop()
            faults.injected(kind, began, f"for {POSTGRES_DOWN_SECONDS:.0f} s")
        elif kind == POSTGRES_BACK:
            postgres.start()
        elif kind == RUNNER_KILL:
            # A runner may be starting up at that moment: try a few times within 5 s.
            deadline = time.monotonic() + 5.0
            pod = None
            while pod is None and time.monotonic() < deadline:
                pod = kill_runner(kubectl, namespace, node, rng, killed)
                time.sleep(0 if pod else 0.5)
            if pod is not None:
                killed.add(pod)
                faults.injected(kind, began, pod)


def all_ready(kubectl: Kubectl, namespace: str) -> bool:
    """Every schedule of the drill is Ready for its current generation."""
    found = schedules(kubectl, namespace)
    return len(found) == len(MIX) and all(
        (cond := condition(o, "Ready")) is not None
        and cond["status"] == "True"
        and o.get("status", {}).get("observedGeneration") == o["metadata"]["generation"]
        for o in found
    )


def all_jobs_finished(load: Load) -> bool:
    jobs = load.observe()
    return jobs is not None and all(finished(j) for j in jobs)


@pytest.mark.usefixtures("crds")
def test_fault_drill(  # noqa: PLR0917 - the fixtures it needs
    cluster: Cluster,
    kubectl: Kubectl,
    node: Node | None,
    solo_namespace: str,
    private_postgres: PostgresServer,
    billing_model: tuple[BillingModel, ScriptedServer],
    capsys: pytest.CaptureFixture[str],
) -> None:
    if cluster.local is None or node is None:
        pytest.skip("the drill restarts the local control plane's kube-apiserver")
    namespace, url = solo_namespace, private_postgres.url
    model, site = billing_model
    rng = random.Random(SEED)  # noqa: S311 - reproducible choices, not secrets
    began = time.monotonic()
    kubectl.create_secret(namespace, API_KEY_SECRET, key="sk-e2e-drill")
    [run_api_port] = free_ports(1)  # every incarnation serves the run API where Jobs expect it

    def incarnation(number: int) -> AbstractContextManager[OperatorProcess]:
        return operator_process(
            cluster,
            database_url=url,
            watch_namespaces=namespace,
            extra_env={
                "NOCTURNE_RECONCILE_INTERVAL_SECONDS": str(SWEEP_SECONDS),
                "NOCTURNE_RESYNC_INTERVAL_SECONDS": str(SWEEP_SECONDS),
                "NOCTURNE_LLM_SECRETS": json.dumps([API_KEY_SECRET]),
                "NOCTURNE_LLM_BASE_URLS": json.dumps([f"{site.url}/v1"]),
                # Keep every finished Job: the drill compares them all with history.
                "NOCTURNE_SUCCESSFUL_JOBS_HISTORY_LIMIT": "100",
                "NOCTURNE_FAILED_JOBS_HISTORY_LIMIT": "100",
            },
            log_name=f"{namespace}-operator-{number:02d}",
            reports=[],
            run_api_port=run_api_port,
        )

    operators = Operators(incarnation)
    try:
        operators.up()
        for i in range(len(MIX)):
            kubectl.apply(namespace, manifest(schedule_name(i), MIX[i], f"{site.url}/v1"))
        wait_for(lambda: all_ready(kubectl, namespace), 120, "every schedule to be Ready")

        load = Load(kubectl, namespace, rng)
        faults = FaultLog()
        load.start()
        try:
            drive(
                faults,
                operators=operators,
                cluster=cluster,
                postgres=private_postgres,
                kubectl=kubectl,
                namespace=namespace,
                node=node,
                rng=rng,
            )
            wait_for(
                lambda: time.monotonic() - faults.started >= FAULT_WINDOW, FAULT_WINDOW, "load"
            )
            load.drain(UNANSWERED_AFTER + 30)
        finally:
            load.stop()
        # Settled: operator, apiserver and PostgreSQL up. Every Job ends (its deadline is 60 s),
        # the sweep records what the run API missed and the reaper finalises what is left.
        wait_for(lambda: all_jobs_finished(load), 120, "every Job to finish")
        reaped_by = REAP_AFTER.total_seconds() + 10 * SWEEP_SECONDS
        reaped = _wait_quietly(
            lambda: not any(r.status == "RUNNING" for r in load_rows(url)), reaped_by
        )
        _wait_quietly(
            lambda: not status_mismatches(schedules(kubectl, namespace), load_rows(url)), 30
        )
        load.observe()
    finally:
        operators.close()
    rows, objects = load_rows(url), schedules(kubectl, namespace)
    findings = scan_logs(operators.logs)
    verdicts = [
        each_finished_job_once(load.jobs, rows),
        status_equals_history(objects, rows),
        within_caps(objects, rows),
        nothing_running(rows),
        operator_logs_clean(findings, operators.unexpected_exits, len(operators.logs)),
    ]
    elapsed = time.monotonic() - began
    report = "\n".join(
        [
            report_table({k: faults.counts[k] for k in FAULT_KINDS}, verdicts),
            "",
            *summary(
                load,
                rows=rows,
                model=model,
                objects=objects,
                transient=findings.transient,
                reaped=reaped,
                elapsed=elapsed,
            ),
            "",
            "fault timeline:",
            *faults.lines,
        ]
    )
    with capsys.disabled():
        print(f"\n--- fault drill ---\n{report}\n")
    (cluster.state_dir / f"{namespace}-drill-report.md").write_text(report + "\n")
    assert all(faults.counts[k] > 0 for k in FAULT_KINDS), f"a fault was never injected:\n{report}"
    capped = [o for o in objects if o["metadata"]["name"].startswith(f"drill-{CAPPED}")]
    assert any(_hit_cap(o, rows) for o in capped), f"no schedule reached its cap:\n{report}"
    violated = [v for v in verdicts if not v.held]
    assert not violated, "\n\n".join(_evidence(v) for v in violated) + f"\n\n{report}"


def _wait_quietly(condition: Callable[[], bool], timeout: float) -> bool:
    """Wait for ``condition``; False (not an error) on timeout: the invariants report it."""
    try:
        wait_for(condition, timeout, "the system to settle", interval=1.0)
    except AssertionError:
        return False
    return True


def schedules(kubectl: Kubectl, namespace: str) -> list[dict[str, Any]]:
    return kubectl.items("agentschedules", "-n", namespace)


def _hit_cap(schedule: dict[str, Any], rows: list[Any]) -> bool:
    uid = schedule["metadata"]["uid"]
    return any(r.schedule_uid == uid and r.status == "BUDGET_EXCEEDED" for r in rows)


def _evidence(verdict: Verdict) -> str:
    return f"VIOLATED: {verdict.invariant}\n" + "\n".join(f"  - {e}" for e in verdict.evidence)


def summary(
    load: Load,
    *,
    rows: list[Any],
    model: BillingModel,
    objects: list[dict[str, Any]],
    transient: Counter[str],
    reaped: bool,
    elapsed: float,
) -> list[str]:
    """What the drill ran, for the report (not invariants)."""
    by_status = Counter(r.status for r in rows)
    recorded: dict[str, Decimal] = defaultdict(Decimal)
    for row in rows:
        recorded[row.schedule_name] += row.cost_usd
    billed = sum(model.billed.values(), Decimal(0))
    capped = sum(_hit_cap(o, rows) for o in objects)
    lines = [
        f"run-now requests: {load.asked}, finished Jobs: {len(load.jobs)}, "
        f"unanswered: {len(load.unanswered)} {load.unanswered[:5]}",
        "rows by status: " + ", ".join(f"{k} {v}" for k, v in sorted(by_status.items())),
        f"schedules that reached a cap (BUDGET_EXCEEDED rows): {capped}",
        f"model calls billed by the local server: {billed:.6f} USD; recorded in history: "
        f"{sum(recorded.values(), Decimal(0)):.6f} USD",
        "handled transient errors in operator logs: "
        + (", ".join(f"{k} {v}" for k, v in sorted(transient.items())) or "none"),
        f"reaper settled every row: {'yes' if reaped else 'no'}",
        f"drill took {elapsed:.0f} s",
    ]
    over = [
        f"{name} billed {cost:.6f} recorded {recorded[name]:.6f}"
        for name, cost in sorted(model.billed.items())
        if cost > recorded[name]
    ]
    if over:
        lines.append("billed beyond what history recorded: " + "; ".join(over))
    return lines
