"""Prometheus metrics of the operator: ``nocturne_`` prefix, base units, ``_total`` counters,
``_usd`` money, labels bounded to namespace, schedule and result, label sets initialised at zero.

Counters count what this operator process observed; Prometheus handles restarts (rate() sees
the reset). Totals that must survive restarts live on the AgentSchedule status, from PostgreSQL.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from datetime import datetime
from decimal import Decimal

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from agent_runner.contract import FINAL_OUTCOMES, RunOutcome
from nocturne_operator.api.model import NOTIFICATION_EVENTS

REGISTRY = CollectorRegistry(auto_describe=True)
RESULTS = tuple(outcome.metric for outcome in FINAL_OUTCOMES)
PHASES = ("Pending", "Active", "Suspended", "Invalid", "BudgetExhausted")

RUNS = Counter(
    "nocturne_runs",
    "Finished run attempts by result.",
    ["namespace", "schedule", "result"],
    registry=REGISTRY,
)
COST = Counter(
    "nocturne_run_cost_usd",
    "Cost of finished run attempts in USD.",
    ["namespace", "schedule"],
    registry=REGISTRY,
)
TOKENS = Counter(
    "nocturne_tokens",
    "Model tokens of finished run attempts.",
    ["namespace", "schedule", "direction"],
    registry=REGISTRY,
)
DURATION = Histogram(
    "nocturne_run_duration_seconds",
    "Wall time of finished run attempts.",
    ["namespace", "schedule"],
    buckets=(1, 5, 15, 30, 60, 120, 300, 600, 1800, 3600, 7200, 21600, 86400),
    registry=REGISTRY,
)
BUDGET_EXHAUSTED = Counter(
    "nocturne_budget_exhausted",
    "Schedules suspended because maxTotalUSD was reached.",
    ["namespace", "schedule"],
    registry=REGISTRY,
)
AUTO_PAUSES = Counter(
    "nocturne_auto_pauses",
    "Schedules paused after consecutive failures.",
    ["namespace", "schedule"],
    registry=REGISTRY,
)
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


QUEUE_DEPTH = Gauge(
    "nocturne_reconcile_queue_depth",
    "AgentSchedules waiting for a reconcile (not counting those being reconciled).",
    registry=REGISTRY,
)


class _Schedules(Collector):
    """``nocturne_schedules{phase}``: how many AgentSchedules are in each phase right now;
    ``nocturne_schedule_reconciled_timestamp_seconds{namespace,schedule}``: when each was last
    reconciled (every schedule is, each sweep interval: an old one means a stuck operator)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._phases: dict[tuple[str, str], tuple[str, float]] = {}

    def set(self, namespace: str, name: str, phase: str) -> None:
        with self._lock:
            self._phases[(namespace, name)] = (phase, time.time())

    def forget(self, namespace: str, name: str) -> None:
        with self._lock:
            self._phases.pop((namespace, name), None)

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
_known: set[tuple[str, str]] = set()
_known_lock = threading.Lock()


def observe_schedule(namespace: str, name: str, phase: str) -> None:
    """Track the schedule's phase; the first time, create its label sets at zero."""
    SCHEDULES.set(namespace, name, phase)
    with _known_lock:
        if (namespace, name) in _known:
            return
        _known.add((namespace, name))
    for result in RESULTS:
        RUNS.labels(namespace, name, result)
    COST.labels(namespace, name)
    for direction in ("input", "output"):
        TOKENS.labels(namespace, name, direction)
    DURATION.labels(namespace, name)
    BUDGET_EXHAUSTED.labels(namespace, name)
    AUTO_PAUSES.labels(namespace, name)


def forget_schedule(namespace: str, name: str) -> None:
    """A deleted schedule leaves the phase gauge; its counters stay until restart."""
    SCHEDULES.forget(namespace, name)


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
    RUNS.labels(namespace, name, result.metric).inc()
    # prometheus-client stores floats; the exact money lives in PostgreSQL.
    COST.labels(namespace, name).inc(float(cost))
    TOKENS.labels(namespace, name, "input").inc(input_tokens)
    TOKENS.labels(namespace, name, "output").inc(output_tokens)
    if completed is not None:
        DURATION.labels(namespace, name).observe(max(0.0, (completed - started).total_seconds()))


def serve(port: int) -> None:
    """Serve /metrics on ``port`` (0 = off)."""
    if port:
        start_http_server(port, registry=REGISTRY)
