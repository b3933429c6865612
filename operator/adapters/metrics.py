"""Prometheus metrics of the operator: ``nocturne_`` prefix, base units, ``_total`` counters,
``_usd`` money, labels bounded to namespace, schedule and result, label sets initialised at zero.

Counters count what this operator process observed; Prometheus handles restarts (rate() sees
the reset). Totals that must survive restarts live on the AgentSchedule status, from PostgreSQL.
"""

from __future__ import annotations

import itertools
import threading
import time
from collections.abc import Iterator
from datetime import datetime
from decimal import Decimal

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector

from agent_runner.contract import FINAL_OUTCOMES, RunOutcome
from nocturne_operator.api.model import NOTIFICATION_EVENTS

REGISTRY = CollectorRegistry(auto_describe=True)
RESULTS = tuple(outcome.metric for outcome in FINAL_OUTCOMES)
PHASES = ("Pending", "Active", "Suspended", "Invalid", "BudgetExhausted")

DURATION_BUCKETS = (1, 5, 15, 30, 60, 120, 300, 600, 1800, 3600, 7200, 21600, 86400)
RECONCILE_DURATION = Histogram(
    "nocturne_reconcile_duration_seconds",
    "Time of one reconcile of an AgentSchedule.",
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
    registry=REGISTRY,
)
RECONCILE_ERRORS = Counter(
    "nocturne_reconcile_errors", "Reconciles that raised an error.", registry=REGISTRY
)
STATUS_WRITES = Counter(
    "nocturne_status_writes",
    "Patches of an AgentSchedule's status (a reconcile writes only what changed).",
    registry=REGISTRY,
)
NOTIFICATIONS = Counter(
    "nocturne_notifications",
    "Webhook notifications by kind and result (sent, failed, suppressed by cooldown, retried).",
    ["kind", "result"],
    registry=REGISTRY,
)
# Both labels are closed sets (the AgentSchedule's notification kinds x delivery results).
for _kind in NOTIFICATION_EVENTS:
    for _result in ("sent", "failed", "suppressed", "retried"):
        NOTIFICATIONS.labels(_kind, _result)


KUBE_REQUESTS = Counter(
    "nocturne_kube_requests",
    "The operator's own requests to the Kubernetes API by verb, resource and status code "
    "(kopf's watches not counted): at idle it makes none.",
    ["verb", "resource", "code"],
    registry=REGISTRY,
)

PURGED_ROWS = Counter(
    "nocturne_purged_rows",
    "Rows the retention purge deleted, by table (a purged run's cost, tokens and outcome stay "
    "in its schedule's totals, schedule_purged_totals).",
    ["table"],
    registry=REGISTRY,
)
for _table in ("schedule_executions", "schedule_events"):
    PURGED_ROWS.labels(_table)

QUEUE_DEPTH = Gauge(
    "nocturne_reconcile_queue_depth",
    "AgentSchedules waiting for a reconcile (not counting those being reconciled).",
    registry=REGISTRY,
)


LEADER = Gauge(
    "nocturne_leader",
    "1 on the replica that holds the leader Lease (reconciles and sweeps), 0 on a standby: "
    "the replicas' sum is 1 in a healthy installation.",
    registry=REGISTRY,
)


class _Schedules(Collector):
    """``nocturne_schedules{phase}``: how many AgentSchedules are in each phase right now;
    ``nocturne_schedule_reconciled_timestamp_seconds{namespace,schedule}``: when each was last
    reconciled (every schedule is, at least once per resync interval, 1 h by default: an older one
    means a stuck operator)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._phases: dict[tuple[str, str], tuple[str, float]] = {}

    def set(self, namespace: str, name: str, phase: str) -> None:
        with self._lock:
            self._phases[(namespace, name)] = (phase, time.time())

    def forget(self, namespace: str, name: str) -> None:
        with self._lock:
            self._phases.pop((namespace, name), None)

    def clear(self) -> None:
        """This replica stopped leading: the leader reports schedules now (a standby's stale
        reconcile times would look like a stuck operator)."""
        with self._lock:
            self._phases.clear()

    def collect(self) -> Iterator[GaugeMetricFamily]:
        family = GaugeMetricFamily(
            "nocturne_schedules", "AgentSchedules by phase.", labels=["phase"]
        )
        with self._lock:
            entries = list(self._phases.items())
        phases = [phase for _, (phase, _) in entries]
        for phase in PHASES:
            family.add_metric([phase], phases.count(phase))
        yield family
        reconciled = GaugeMetricFamily(
            "nocturne_schedule_reconciled_timestamp_seconds",
            "When the AgentSchedule was last reconciled (Unix time).",
            labels=["namespace", "schedule"],
        )
        for (namespace, name), (_, at) in entries:
            reconciled.add_metric([namespace, name], at)
        yield reconciled


SCHEDULES = _Schedules()
REGISTRY.register(SCHEDULES)


class _Tally:
    """One schedule's run series, as plain numbers (a prometheus-client child per series
    cost about 10 KB per schedule: a third of the operator's memory per schedule)."""

    __slots__ = (
        "auto_pauses",
        "budget_exhausted",
        "cost",
        "duration_buckets",
        "duration_count",
        "duration_sum",
        "input_tokens",
        "output_tokens",
        "runs",
    )

    def __init__(self) -> None:
        self.runs = [0] * len(RESULTS)
        self.cost = 0.0
        self.input_tokens = 0
        self.output_tokens = 0
        self.duration_buckets = [0] * len(DURATION_BUCKETS)  # per bucket, not cumulative
        self.duration_sum = 0.0
        self.duration_count = 0
        self.budget_exhausted = 0
        self.auto_pauses = 0


class _PerSchedule(Collector):
    """The per-schedule series: runs by result, cost, tokens, run durations, budget holds and
    auto-pauses, by namespace and schedule, every one from zero."""

    def __init__(self) -> None:
        self.lock = threading.RLock()
        self._tallies: dict[tuple[str, str], _Tally] = {}

    def tally(self, namespace: str, name: str) -> _Tally:
        with self.lock:
            found = self._tallies.get((namespace, name))
            if found is None:
                found = self._tallies[(namespace, name)] = _Tally()
            return found

    def forget(self, namespace: str, name: str) -> None:
        with self.lock:
            self._tallies.pop((namespace, name), None)

    def collect(self) -> Iterator[Metric]:
        labels = ["namespace", "schedule"]
        runs = CounterMetricFamily(
            "nocturne_runs", "Finished run attempts by result.", labels=[*labels, "result"]
        )
        cost = CounterMetricFamily(
            "nocturne_run_cost_usd", "Cost of finished run attempts in USD.", labels=labels
        )
        tokens = CounterMetricFamily(
            "nocturne_tokens",
            "Model tokens of finished run attempts.",
            labels=[*labels, "direction"],
        )
        duration = HistogramMetricFamily(
            "nocturne_run_duration_seconds", "Wall time of finished run attempts.", labels=labels
        )
        exhausted = CounterMetricFamily(
            "nocturne_budget_exhausted",
            "Schedules suspended because maxTotalUSD was reached.",
            labels=labels,
        )
        pauses = CounterMetricFamily(
            "nocturne_auto_pauses", "Schedules paused after consecutive failures.", labels=labels
        )
        with self.lock:
            for (namespace, name), t in self._tallies.items():
                key = [namespace, name]
                for result, count in zip(RESULTS, t.runs, strict=True):
                    runs.add_metric([*key, result], count)
                cost.add_metric(key, t.cost)
                tokens.add_metric([*key, "input"], t.input_tokens)
                tokens.add_metric([*key, "output"], t.output_tokens)
                cumulative = list(itertools.accumulate(t.duration_buckets))
                buckets = [
                    (str(float(b)), n) for b, n in zip(DURATION_BUCKETS, cumulative, strict=True)
                ]
                duration.add_metric(key, [*buckets, ("+Inf", t.duration_count)], t.duration_sum)
                exhausted.add_metric(key, t.budget_exhausted)
                pauses.add_metric(key, t.auto_pauses)
        yield from (runs, cost, tokens, duration, exhausted, pauses)


PER_SCHEDULE = _PerSchedule()
REGISTRY.register(PER_SCHEDULE)


class _NamespaceBudgets(Collector):
    """``nocturne_namespace_budget_usd{namespace}``: a namespace's monthly cap from its
    AgentSchedulePolicy; ``nocturne_namespace_month_cost_usd{namespace}``: what its runs cost
    this month in the budget's zone, as the latest pass of one of its schedules read it."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._budgets: dict[str, tuple[Decimal, Decimal]] = {}

    def set(self, namespace: str, cap: Decimal, spent: Decimal) -> None:
        with self._lock:
            self._budgets[namespace] = (cap, spent)

    def forget(self, namespace: str) -> None:
        with self._lock:
            self._budgets.pop(namespace, None)

    def clear(self) -> None:
        """This replica stopped leading: the leader reports namespaces' spend now (a standby's
        would stay at what it last read, last month's included)."""
        with self._lock:
            self._budgets.clear()

    def collect(self) -> Iterator[GaugeMetricFamily]:
        cap = GaugeMetricFamily(
            "nocturne_namespace_budget_usd",
            "The namespace's monthly USD cap (AgentSchedulePolicy namespaceBudget).",
            labels=["namespace"],
        )
        spent = GaugeMetricFamily(
            "nocturne_namespace_month_cost_usd",
            "What the namespace's runs cost this month, in its budget's zone, in USD.",
            labels=["namespace"],
        )
        with self._lock:
            entries = sorted(self._budgets.items())
        for namespace, (amount, cost) in entries:
            cap.add_metric([namespace], float(amount))
            spent.add_metric([namespace], float(cost))
        yield cap
        yield spent


NAMESPACE_BUDGETS = _NamespaceBudgets()
REGISTRY.register(NAMESPACE_BUDGETS)


def observe_namespace_budget(namespace: str, cap: Decimal | None, spent: Decimal | None) -> None:
    """A pass read the namespace's budget: its series (none when it has no cap). A cost that
    could not be read leaves the last one."""
    if cap is None:
        NAMESPACE_BUDGETS.forget(namespace)
    elif spent is not None:
        NAMESPACE_BUDGETS.set(namespace, cap, spent)


def observe_schedule(namespace: str, name: str, phase: str) -> None:
    """Track the schedule's phase and when it was reconciled; the first time, its run series
    start at zero."""
    SCHEDULES.set(namespace, name, phase)
    PER_SCHEDULE.tally(namespace, name)


def forget_schedule(namespace: str, name: str) -> None:
    """A deleted schedule's series end (as kube-state-metrics ends a deleted object's)."""
    SCHEDULES.forget(namespace, name)
    PER_SCHEDULE.forget(namespace, name)


def count_budget_exhausted(namespace: str, name: str) -> None:
    with PER_SCHEDULE.lock:
        PER_SCHEDULE.tally(namespace, name).budget_exhausted += 1


def count_auto_pause(namespace: str, name: str) -> None:
    with PER_SCHEDULE.lock:
        PER_SCHEDULE.tally(namespace, name).auto_pauses += 1


def observe_run(
    namespace: str,
    name: str,
    *,
    result: RunOutcome,
    cost: Decimal,
    input_tokens: int,
    output_tokens: int,
    started: datetime,
    completed: datetime | None,
) -> None:
    """A finished attempt the operator saw finish."""
    with PER_SCHEDULE.lock:
        tally = PER_SCHEDULE.tally(namespace, name)
        tally.runs[RESULTS.index(result.metric)] += 1
        # Prometheus stores floats; the exact money lives in PostgreSQL.
        tally.cost += float(cost)
        tally.input_tokens += input_tokens
        tally.output_tokens += output_tokens
        if completed is not None:
            seconds = max(0.0, (completed - started).total_seconds())
            tally.duration_sum += seconds
            tally.duration_count += 1
            for i, bound in enumerate(DURATION_BUCKETS):
                if seconds <= bound:
                    tally.duration_buckets[i] += 1
                    break


def serve(port: int) -> None:
    """Serve /metrics on ``port`` (0 = off)."""
    if port:
        start_http_server(port, registry=REGISTRY)
