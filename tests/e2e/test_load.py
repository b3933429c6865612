"""Many schedules created at once on the real control plane (issue 18): each creation is audited
once, status is written once or twice per schedule and not again while nothing changes, and
CronJobs and Jobs that are not ours never reach the operator."""

from __future__ import annotations

import json
from collections import Counter

import pytest
import sqlalchemy as sa

from e2e.conftest import operator_process
from e2e.test_resilience import metric
from harness.kube import Cluster, Kubectl, wait_for
from harness.postgres import PostgresServer
from nocturne_operator.storage import upgrade

pytestmark = pytest.mark.e2e

SCHEDULES = 200
SWEEP_SECONDS = 3
FOREIGN = "not-nocturnes"


def database_sessions(url: str) -> int:
    """Sessions opened on the database so far (pg_stat_database, PostgreSQL 14+)."""
    engine = sa.create_engine(url, poolclass=sa.NullPool)
    with engine.connect() as conn:
        count = conn.execute(
            sa.text("SELECT sessions FROM pg_stat_database WHERE datname = current_database()")
        ).scalar_one()
    engine.dispose()
    return int(count)


def schedule(name: str) -> dict[str, object]:
    return {
        "apiVersion": "nocturne.dev/v1alpha1",
        "kind": "AgentSchedule",
        "metadata": {"name": name},
        "spec": {
            "schedule": "0 9 * * *",
            "timeZone": "Europe/Berlin",
            # Active (the next run is tomorrow at 09:00): the silent-stop watch runs too.
            "task": {"query": f"digest {name}"},
            "agent": {"model": "offline-demo", "provider": "offline"},
            "budget": {"maxPerRunUSD": "0.10"},
        },
    }


def ready_count(kubectl: Kubectl, namespace: str) -> int:
    ready = 0
    for obj in kubectl.items("asched", "-n", namespace):
        status = obj.get("status") or {}
        conds = {c["type"]: c["status"] for c in status.get("conditions", [])}
        current = status.get("observedGeneration") == obj["metadata"]["generation"]
        ready += conds.get("Ready") == "True" and current
    return ready


@pytest.mark.usefixtures("crds", "node")
def test_two_hundred_schedules_at_once_are_each_handled_once(
    cluster: Cluster, kubectl: Kubectl, solo_namespace: str, postgres: PostgresServer
) -> None:
    namespace = solo_namespace
    url = postgres.fresh_schema(namespace.replace("-", "_")[:60])
    upgrade(url)
    # Not ours: no managed-by label. The operator must never see them.
    foreign = {
        "apiVersion": "batch/v1",
        "kind": "CronJob",
        "metadata": {"name": FOREIGN},
        "spec": {
            "schedule": "0 9 * * *",
            "suspend": True,
            "jobTemplate": {
                "spec": {
                    "template": {
                        "spec": {
                            "restartPolicy": "Never",
                            "containers": [{"name": "c", "image": "busybox"}],
                        }
                    }
                }
            },
        },
    }
    kubectl.apply(namespace, foreign)
    sessions_before = database_sessions(url)
    with operator_process(
        cluster,
        database_url=url,
        watch_namespaces=namespace,
        extra_env={
            "NOCTURNE_RECONCILE_INTERVAL_SECONDS": str(SWEEP_SECONDS),
            "NOCTURNE_RESYNC_INTERVAL_SECONDS": str(SWEEP_SECONDS),
            "NOCTURNE_MAX_SCHEDULES_PER_NAMESPACE": str(SCHEDULES + 10),
            "NOCTURNE_LOG_LEVEL": "DEBUG",  # kopf then logs every event it receives
        },
        log_name=f"{namespace}-load",
    ) as operator:
        listing = {
            "apiVersion": "v1",
            "kind": "List",
            "items": [schedule(f"s{i:03d}") for i in range(SCHEDULES)],
        }
        kubectl("create", "-n", namespace, "-f", "-", stdin=json.dumps(listing))
        wait_for(
            lambda: ready_count(kubectl, namespace) == SCHEDULES,
            240,
            f"{SCHEDULES} schedules to be Ready",
        )
        cronjobs = kubectl.items("cronjobs", "-n", namespace)
        assert len(cronjobs) == SCHEDULES + 1  # ours and the foreign one, untouched
        # Each schedule's creation is in the audit trail once, whatever kopf did.
        engine = sa.create_engine(url, poolclass=sa.NullPool)
        with engine.connect() as conn:
            kinds = Counter(
                conn.execute(
                    sa.text("SELECT schedule_uid FROM schedule_events WHERE kind = 'created'")
                ).scalars()
            )
        engine.dispose()
        assert len(kinds) == SCHEDULES
        assert set(kinds.values()) == {1}, kinds.most_common(3)

        # Let the first sweeps pass, then nothing changes: no status write at all.
        wait_for(
            lambda: metric(operator, "nocturne_reconcile_duration_seconds_count") >= 3 * SCHEDULES,
            120,
            "the first sweeps",
        )
        settled = metric(operator, "nocturne_status_writes_total")
        print(f"{settled:.0f} status writes for {SCHEDULES} schedules")
        assert settled <= 2 * SCHEDULES, f"{settled} status writes for {SCHEDULES} schedules"
        reconciles = metric(operator, "nocturne_reconcile_duration_seconds_count")
        wait_for(
            lambda: (
                metric(operator, "nocturne_reconcile_duration_seconds_count")
                >= reconciles + 2 * SCHEDULES
            ),
            120,
            "two more sweeps over every schedule",
        )
        assert metric(operator, "nocturne_status_writes_total") == settled
        log = operator.log_text()
        sessions = database_sessions(url) - sessions_before
        print(f"{sessions} PostgreSQL sessions opened for {SCHEDULES} creates")
    # Server-side label selectors: kopf never received the foreign CronJob.
    assert FOREIGN not in log
    assert kubectl.json("cronjob", FOREIGN, "-n", namespace)["spec"]["suspend"] is True
