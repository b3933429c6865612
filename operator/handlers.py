"""kopf wiring: every trigger calls the one ``reconcile``. Handlers return None; status is
written explicitly by ``reconcile`` into declared fields only."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any

import kopf

from agent_runner.history import EventKind, ExecutionStatus, History, HistoryError, month_start
from nocturne_operator import metrics, results
from nocturne_operator import reconcile as rec
from nocturne_operator.api import GROUP, KIND, PLURAL, VERSION
from nocturne_operator.kube import FIELD_MANAGER, Kube
from nocturne_operator.render import LABEL_MANAGED_BY, LABEL_SCHEDULE, MANAGED_BY
from nocturne_operator.settings import Settings, load_settings
from nocturne_operator.validation import Peer

# Loaded at import: kopf needs the timer interval when the decorators run.
SETTINGS: Settings = load_settings()
_MANAGED = {LABEL_MANAGED_BY: MANAGED_BY}
KOPF_PREFIX = f"kopf.{GROUP}"


@kopf.on.startup()
def configure(*, settings: kopf.OperatorSettings, memo: Any, **_: Any) -> None:
    """kopf's own bookkeeping lives under kopf.nocturne.dev; only warnings become Events."""
    # Not plain nocturne.dev: kopf ignores every annotation under its storage prefix when it
    # diffs objects, and users' run-now / suspend-reason annotations live under nocturne.dev.
    settings.persistence.progress_storage = kopf.AnnotationsProgressStorage(prefix=KOPF_PREFIX)
    settings.persistence.diffbase_storage = kopf.AnnotationsDiffBaseStorage(
        prefix=KOPF_PREFIX, key="last-handled-configuration"
    )
    settings.persistence.finalizer = f"{KOPF_PREFIX}/finalizer"
    settings.posting.level = logging.WARNING
    # A watch that silently hangs would stop drift repair: reconnect periodically.
    settings.watching.server_timeout = 270
    settings.watching.client_timeout = 300
    settings.execution.max_workers = 8
    memo["kube"] = Kube.connect()
    url = SETTINGS.database_url
    memo["history"] = History.connect(url.get_secret_value()) if url is not None else None
    memo["started_at"] = datetime.now(UTC)
    # Job UIDs whose attempts are recorded and counted (Jobs are TTL-deleted after some days,
    # so this stays small: one UID per run).
    memo["recorded_jobs"] = set()
    metrics.serve(SETTINGS.metrics_port)
    prices = SETTINGS.price_table_file
    memo["prices"] = prices.read_text() if prices is not None else None


@kopf.index(GROUP, VERSION, PLURAL)
def schedules_by_namespace(
    *, namespace: str | None, name: str, meta: kopf.Meta, **_: Any
) -> dict[str, Peer]:
    """Namespace -> its AgentSchedules, for the quota."""
    return {str(namespace): Peer(name, str(meta.get("creationTimestamp", "")))}


@kopf.index(GROUP, VERSION, PLURAL)
def schedule_bodies(
    *, namespace: str | None, name: str, body: kopf.Body, **_: Any
) -> dict[tuple[str, str], dict[str, Any]]:
    """(namespace, name) -> the AgentSchedule, to reconcile an owner from its CronJob's events."""
    return {(str(namespace), name): dict(body)}


# kopf injects indexes as keyword arguments named after them; they arrive through **kwargs so the
# handlers keep kopf's handler signatures.


# A failed reconcile (apiserver hiccup, conflict) is retried after 15 s, not kopf's default 60 s.
@kopf.on.resume(GROUP, VERSION, PLURAL, backoff=15)
@kopf.on.create(GROUP, VERSION, PLURAL, backoff=15)
@kopf.on.update(GROUP, VERSION, PLURAL, backoff=15)
def schedule_changed(*, body: kopf.Body, memo: Any, reason: str, **kwargs: Any) -> None:
    """Create, update (spec or annotations) and operator restart."""
    if reason in ("create", "update"):
        kind = EventKind.CREATED if reason == "create" else EventKind.UPDATED
        _audit(memo, body, kind, f"generation {body.get('metadata', {}).get('generation')}")
    _remember_indexes(memo, kwargs)
    _reconcile(dict(body), memo, kwargs["schedules_by_namespace"])


@kopf.on.event(GROUP, VERSION, PLURAL)
def schedule_deleted(*, type: str, body: kopf.Body, memo: Any, **_: Any) -> None:
    """Audit only, without a finalizer: deletion never waits for the operator (if it is down,
    the deletion is not audited, and nothing else is lost)."""
    if type == "DELETED":
        _audit(memo, body, EventKind.DELETED, "the AgentSchedule was deleted")
        metrics.forget_schedule(str(body["metadata"]["namespace"]), str(body["metadata"]["name"]))


# Event reasons the reconciler posts that also belong in the audit trail.
_AUDITED = {
    "Paused": EventKind.PAUSED,
    "Resumed": EventKind.RESUMED,
    "AutoPaused": EventKind.AUTO_PAUSED,
    "BudgetExhausted": EventKind.BUDGET_EXHAUSTED,
    "DriftRepaired": EventKind.DRIFT_REPAIRED,
    "SilentStop": EventKind.SILENT_STOP,
    "BudgetAvailable": EventKind.BUDGET_RESET,
    "RunNow": EventKind.RUN_REQUESTED,
    "VerificationRun": EventKind.RUN_REQUESTED,
}


def _audit(memo: Any, obj: Mapping[str, Any], kind: EventKind, reason: str) -> None:
    """Append to the audit trail; never fails the handler (the database may be down)."""
    history: History | None = memo["history"]
    if history is None:
        return
    meta = obj.get("metadata") or {}
    try:
        history.record_event(
            meta.get("namespace", ""),
            meta.get("name", ""),
            kind,
            reason=reason,
            actor=_last_writer(meta),
            schedule_uid=meta.get("uid"),
        )
    except HistoryError as exc:
        logging.getLogger(__name__).warning("audit event %s not recorded: %s", kind, exc)


def _last_writer(meta: Mapping[str, Any]) -> str | None:
    """The field manager that wrote the object last (kubectl, argocd-controller, ...), not
    counting the operator's own bookkeeping writes."""
    ours = {"kopf", FIELD_MANAGER}
    entries = [
        e
        for e in meta.get("managedFields") or []
        if e.get("manager") and e.get("manager") not in ours and e.get("subresource") != "status"
    ]
    if not entries:
        return None
    latest = max(entries, key=lambda e: e.get("time") or "")
    return str(latest["manager"])


# Not a @kopf.timer: kopf puts a finalizer on every object a timer serves, so deleting a
# schedule would hang whenever the operator is down or uninstalled. One operator-level loop over
# the index does the same work and leaves deletion to garbage collection alone.
@kopf.on.startup()
async def start_sweeper(*, memo: Any, **_: Any) -> None:
    """Start the periodic sweep: drift repair, fresh next runs, results left unrecorded."""
    memo["sweeper"] = asyncio.create_task(_sweep(memo))


@kopf.on.cleanup()
async def stop_sweeper(*, memo: Any, **_: Any) -> None:
    """Stop the sweep with the operator."""
    task: asyncio.Task[None] | None = memo.get("sweeper")
    if task is not None:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


async def _sweep(memo: Any) -> None:
    log = logging.getLogger(__name__)
    while True:
        await asyncio.sleep(SETTINGS.reconcile_interval_seconds)
        indexes = memo.get("indexes")
        if indexes is None:  # no schedule seen yet
            continue
        bodies, peers = indexes
        for key in list(bodies):
            for schedule in list(bodies.get(key, [])):
                try:
                    await asyncio.to_thread(_periodic, schedule, memo, peers)
                except Exception:
                    log.exception("periodic reconcile of %s/%s failed", *key)


def _periodic(schedule: dict[str, Any], memo: Any, peers: kopf.Index[str, Peer]) -> None:
    if memo["history"] is not None:
        kube: Kube = memo["kube"]
        meta = schedule["metadata"]
        jobs = kube.list_objects("Job", meta["namespace"], f"{LABEL_SCHEDULE}={meta['name']}")
        for job in jobs:
            _record_job(job, schedule, memo)
    fresh = memo["kube"].get(KIND, schedule["metadata"]["namespace"], schedule["metadata"]["name"])
    if fresh is not None:  # the index may lag behind our own status writes
        _reconcile(fresh, memo, peers)


@kopf.on.event("batch", "v1", "cronjobs", labels=_MANAGED)
def cronjob_event(
    *,
    type: str,
    body: kopf.Body,
    namespace: str | None,
    name: str,
    labels: kopf.Labels,
    memo: Any,
    **kwargs: Any,
) -> None:
    """A managed CronJob changed or vanished: repair it at once, or remove it if orphaned."""
    owner_name = labels.get(LABEL_SCHEDULE, "")
    bodies: kopf.Index[tuple[str, str], dict[str, Any]] = kwargs["schedule_bodies"]
    owners = list(bodies.get((str(namespace), owner_name), []))
    kube: Kube = memo["kube"]
    if not owners:
        if type != "DELETED" and kube.delete("CronJob", str(namespace), name):
            kopf.event(
                body,
                type="Warning",
                reason="OrphanRemoved",
                message=f"no AgentSchedule {owner_name!r} owns this CronJob; deleted",
            )
        return
    _reconcile(owners[0], memo, kwargs["schedules_by_namespace"])


@kopf.on.event("batch", "v1", "jobs", labels=_MANAGED)
def job_event(
    *,
    body: kopf.Body,
    namespace: str | None,
    name: str,
    labels: kopf.Labels,
    memo: Any,
    **kwargs: Any,
) -> None:
    """A run finished: make sure its attempts are recorded, then refresh the owner's status."""
    if results.job_outcome(body) is None:
        return
    bodies: kopf.Index[tuple[str, str], dict[str, Any]] = kwargs["schedule_bodies"]
    owners = list(bodies.get((str(namespace), labels.get(LABEL_SCHEDULE, "")), []))
    if not owners:
        return
    _record_job(body, owners[0], memo)
    _reconcile(owners[0], memo, kwargs["schedules_by_namespace"])


def _record_job(job: Mapping[str, Any], schedule: Mapping[str, Any], memo: Any) -> None:
    """Record a finished Job's attempts once; later events and sweeps skip it without any
    API or database call."""
    history: History | None = memo["history"]
    outcome = results.job_outcome(job)
    meta = job["metadata"]
    done: set[str] = memo["recorded_jobs"]
    if history is None or outcome is None or meta["uid"] in done:
        return
    kube: Kube = memo["kube"]
    pods = kube.list_objects(
        "Pod", meta["namespace"], f"batch.kubernetes.io/job-name={meta['name']}"
    )
    try:
        results.record_finished_job(job, pods, schedule, history)
        # Jobs that finished before this process started were counted by its predecessor.
        if outcome.finished_at >= memo["started_at"]:
            _count_runs(meta["uid"], history)
    except HistoryError as exc:
        # The sweep comes back to it: nothing is lost while the database is down.
        logging.getLogger(__name__).warning(
            "recording Job %s/%s deferred: %s", meta["namespace"], meta["name"], exc
        )
        return
    done.add(meta["uid"])


def _count_runs(job_uid: str, history: History) -> None:
    """Feed the run metrics with a finished Job's attempts."""
    for row in history.for_job(job_uid):
        if row.status is not ExecutionStatus.RUNNING:
            metrics.observe_run(
                row.namespace,
                row.schedule_name,
                result=row.status.value.lower(),
                cost=row.cost_usd,
                input_tokens=row.input_tokens,
                output_tokens=row.output_tokens,
                started=row.started_at,
                completed=row.completed_at,
            )


def _remember_indexes(memo: Any, kwargs: Mapping[str, Any]) -> None:
    """The sweep walks kopf's live indexes; any handler call can hand them over."""
    if "indexes" not in memo:
        memo["indexes"] = (kwargs["schedule_bodies"], kwargs["schedules_by_namespace"])


def _reconcile(body: dict[str, Any], memo: Any, index: kopf.Index[str, Peer]) -> None:
    meta = body["metadata"]
    peers = list(index.get(meta["namespace"], []))
    history: History | None = memo["history"]
    stats = None
    if history is not None:
        since = rec.failures_counted_since(body.get("status") or {})
        try:
            stats = history.run_stats(
                meta["namespace"],
                meta["name"],
                failures_since=since,
                month_start=_month_start(body),
            )
        except HistoryError as exc:
            # Keep reconciling (drift repair must not depend on the database); results and
            # holds stay as last recorded on status.
            logging.getLogger(__name__).warning("run results unavailable: %s", exc)

    def post(obj: Mapping[str, Any], type_: str, reason: str, message: str) -> None:
        _post(obj, type_, reason, message)
        if reason == "AutoPaused":
            metrics.AUTO_PAUSES.labels(meta["namespace"], meta["name"]).inc()
        elif reason == "BudgetExhausted":
            metrics.BUDGET_EXHAUSTED.labels(meta["namespace"], meta["name"]).inc()
        if reason in _AUDITED:
            _audit(memo, obj, _AUDITED[reason], message)

    with metrics.RECONCILE_DURATION.time():
        try:
            phase = rec.reconcile(
                body,
                SETTINGS,
                memo["kube"],
                events=post,
                peers=peers,
                stats=stats,
                prices=memo["prices"],
            )
        except Exception:
            metrics.RECONCILE_ERRORS.inc()
            raise
    metrics.observe_schedule(meta["namespace"], meta["name"], phase)


def _month_start(body: Mapping[str, Any]) -> datetime | None:
    """This month's start in the schedule's zone (None for a zone validation will reject)."""
    try:
        return month_start(datetime.now(UTC), str((body.get("spec") or {}).get("timeZone", "UTC")))
    except ValueError:
        return None


def _post(obj: Mapping[str, Any], type_: str, reason: str, message: str) -> None:
    kopf.event(kopf.Body(obj), type=type_, reason=reason, message=message[:1024])  # type: ignore[arg-type]
