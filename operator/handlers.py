"""kopf wiring: every trigger calls the one ``reconcile``. Handlers return None; status is
written explicitly by ``reconcile`` into declared fields only."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any

import kopf

from nocturne_operator import metrics, notices, notify, outbox, results
from nocturne_operator import reconcile as rec
from nocturne_operator.api import API_VERSION, GROUP, KIND, PLURAL, VERSION, AgentScheduleSpec
from nocturne_operator.kube import FIELD_MANAGER, Kube
from nocturne_operator.prices import load_price_table
from nocturne_operator.render import LABEL_MANAGED_BY, LABEL_SCHEDULE, MANAGED_BY, RunApiEndpoint
from nocturne_operator.runapi.auth import Authenticator
from nocturne_operator.runapi.server import make_app, serve
from nocturne_operator.runapi.tls import RunApiTls
from nocturne_operator.settings import Settings, load_settings
from nocturne_operator.storage import (
    EventKind,
    ExecutionRecord,
    ExecutionStatus,
    History,
    HistoryError,
    month_start,
)
from nocturne_operator.validation import Peer

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
    # kopf hands each object's handlers a shallow copy of this memo: keys they set stay in
    # their copy, so what they hand to the operator-level loops goes through this one dict.
    memo["shared"] = {}
    memo["jobs"] = _JobLedger()
    metrics.serve(SETTINGS.metrics_port)
    # The price table lives only here: each run's grant carries its model's price.
    memo["prices"] = load_price_table(SETTINGS.price_table_file)
    memo["notifier"] = _notifier(memo) if SETTINGS.notifications_enabled else None


def _notifier(memo: Any) -> notify.Notifier:
    """Notices are queued in PostgreSQL (an outbox that survives restarts), or in memory when
    the operator runs without a database."""
    history: History | None = memo["history"]
    kube: Kube = memo["kube"]
    store: outbox.Store = (
        outbox.PostgresStore(history.engine) if history is not None else outbox.MemoryStore()
    )

    def outcome(delivery: notices.Delivery, result: str, detail: str) -> None:
        if result != "failed":
            return
        schedule = {
            "apiVersion": API_VERSION,
            "kind": KIND,
            "metadata": {
                "name": delivery.schedule_name,
                "namespace": delivery.namespace,
                "uid": delivery.schedule_uid,
            },
        }
        _post(
            kube,
            schedule,
            "Warning",
            "NotificationFailed",
            f"{delivery.kind} notification to the webhook in Secret {delivery.secret_name} "
            f"(key {delivery.secret_key}) failed after {delivery.attempts} attempt(s): {detail}",
        )

    return notify.Notifier(
        store,
        kube.secret_value,
        outcome,
        max_attempts=SETTINGS.notification_max_attempts,
        retry_base=timedelta(seconds=SETTINGS.notification_retry_base_seconds),
        retry_cap=timedelta(seconds=SETTINGS.notification_retry_cap_seconds),
        timeout=SETTINGS.notification_timeout_seconds,
        retention=timedelta(days=SETTINGS.notification_retention_days),
        webhook_secrets=SETTINGS.webhook_secrets,
        allow_private=SETTINGS.webhook_allow_private,
    )


@dataclass
class _JobLedger:
    """Finished Jobs this process has dealt with (Jobs are TTL-deleted after some days, so the
    sets stay small: one UID per run). The Job event handler and the sweep may meet on one
    Job: whoever claims it first does the work, the other skips it."""

    recorded: set[str] = field(default_factory=set)  # attempts recorded and counted
    notified: set[str] = field(default_factory=set)  # ... and notices queued
    _busy: set[str] = field(default_factory=set)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    @contextlib.contextmanager
    def claim(self, uid: str) -> Iterator[bool]:
        """True when the caller holds the Job until the block ends; False when it is done or
        someone else is at it."""
        with self._lock:
            mine = uid not in self.notified and uid not in self._busy
            if mine:
                self._busy.add(uid)
        try:
            yield mine
        finally:
            if mine:
                with self._lock:
                    self._busy.discard(uid)


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


@kopf.index("batch", "v1", "jobs", labels=_MANAGED)
def finished_jobs(
    *, namespace: str | None, labels: kopf.Labels, body: kopf.Body, **_: Any
) -> dict[tuple[str, str], dict[str, Any]] | None:
    """(namespace, schedule) -> its finished Jobs: the sweep finds what is left to record
    without listing Jobs for every schedule on every pass."""
    if results.job_outcome(body) is None:
        return None
    return {(str(namespace), labels.get(LABEL_SCHEDULE, "")): dict(body)}


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


@kopf.on.startup()
async def start_run_api(*, memo: Any, **_: Any) -> None:
    """Serve the run API (every replica does): runner pods get their budget grants here and
    report progress and results. Its CA is the operator's own, kept in a Secret."""
    kube: Kube = memo["kube"]
    tls = await asyncio.to_thread(RunApiTls.load_or_create, kube, SETTINGS)
    memo["run_api"] = RunApiEndpoint(SETTINGS.run_api_url, tls.ca_pem)
    app = make_app(
        authenticator=Authenticator(kube),
        history=memo["history"],
        prices=memo["prices"],
        settings=SETTINGS,
    )
    memo["run_api_server"] = await serve(app, SETTINGS, tls)


@kopf.on.cleanup()
async def stop_run_api(*, memo: Any, **_: Any) -> None:
    """Stop listening; reports in flight finish first (aiohttp's graceful shutdown)."""
    server = memo.get("run_api_server")
    if server is not None:
        await server.cleanup()


# Not a @kopf.timer: kopf puts a finalizer on every object a timer serves, so deleting a
# schedule would hang whenever the operator is down or uninstalled. One operator-level loop over
# the index does the same work and leaves deletion to garbage collection alone.
@kopf.on.startup()
async def start_sweeper(*, memo: Any, **_: Any) -> None:
    """Start the periodic sweep: drift repair, fresh next runs, results left unrecorded."""
    memo["sweeper"] = asyncio.create_task(_sweep(memo))
    notifier: notify.Notifier | None = memo.get("notifier")
    if notifier is not None:
        # Deliveries run on the operator's loop, apart from every handler: a slow or dead
        # webhook never holds up a reconcile.
        memo["deliveries"] = asyncio.create_task(notifier.run(asyncio.Event()))


@kopf.on.cleanup()
async def stop_sweeper(*, memo: Any, **_: Any) -> None:
    """Stop the sweep and the deliveries with the operator."""
    for name in ("sweeper", "deliveries"):
        task: asyncio.Task[None] | None = memo.get(name)
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task


async def _sweep(memo: Any) -> None:
    log = logging.getLogger(__name__)
    while True:
        await asyncio.sleep(SETTINGS.reconcile_interval_seconds)
        indexes = memo["shared"].get("indexes")
        if indexes is None:  # no schedule seen yet
            continue
        bodies, peers, jobs = indexes
        if memo["history"] is not None:
            try:
                await asyncio.to_thread(_reap, memo, bodies)
            except Exception:
                log.exception("reaping stuck executions failed")
        for key in list(bodies):
            for schedule in list(bodies.get(key, [])):
                try:
                    await asyncio.to_thread(_periodic, schedule, memo, peers, jobs)
                except Exception:
                    log.exception("periodic reconcile of %s/%s failed", *key)


# A RUNNING row younger than this may belong to a pod the API has not shown us yet.
REAP_AFTER = timedelta(minutes=2)


def _reap(memo: Any, bodies: kopf.Index[tuple[str, str], dict[str, Any]]) -> None:
    """Finalise executions left RUNNING whose Job or pod is gone (one query, then one Job and
    one pod listing per schedule that has such rows)."""
    history: History = memo["history"]
    kube: Kube = memo["kube"]
    ledger: _JobLedger = memo["jobs"]
    try:
        stuck = history.stuck_running(REAP_AFTER)
    except HistoryError as exc:
        logging.getLogger(__name__).warning("reaper skipped: %s", exc)
        return
    by_schedule: dict[tuple[str, str], list[ExecutionRecord]] = {}
    for row in stuck:
        by_schedule.setdefault((row.namespace, row.schedule_name), []).append(row)
    for (namespace, name), rows in by_schedule.items():
        selector = f"{LABEL_SCHEDULE}={name}"
        jobs = kube.list_objects("Job", namespace, selector)
        pods = kube.list_objects("Pod", namespace, selector)
        running_jobs = {j["metadata"]["uid"] for j in jobs if results.job_outcome(j) is None}
        reaped = results.reap(rows, jobs, pods, history, now=datetime.now(UTC))
        reaped_jobs = {row.job_uid for row, _ in reaped}
        schedule = _owner(bodies, namespace, name)
        for job in jobs:
            uid = job["metadata"]["uid"]
            if uid in reaped_jobs and uid not in running_jobs and schedule is not None:
                # Its last attempt only now has a final status: its notices are due now.
                ledger.notified.discard(uid)
                _record_job(job, schedule, memo)
        for row, status in reaped:
            if row.job_uid in running_jobs:
                continue  # counted with its Job's other attempts when the Job finishes
            metrics.observe_run(
                namespace,
                name,
                result=status.value.lower(),
                cost=row.cost_usd,
                input_tokens=row.input_tokens,
                output_tokens=row.output_tokens,
                started=row.started_at,
                completed=datetime.now(UTC),
            )


def _owner(
    bodies: kopf.Index[tuple[str, str], dict[str, Any]], namespace: str, name: str
) -> dict[str, Any] | None:
    """The AgentSchedule from kopf's index (None when it is gone or not seen yet)."""
    return next(iter(bodies.get((namespace, name), [])), None)


def _periodic(
    schedule: dict[str, Any],
    memo: Any,
    peers: kopf.Index[str, Peer],
    jobs: kopf.Index[tuple[str, str], dict[str, Any]],
) -> None:
    if memo["history"] is not None:
        meta = schedule["metadata"]
        for job in list(jobs.get((meta["namespace"], meta["name"]), [])):
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
    owner = _owner(kwargs["schedule_bodies"], str(namespace), owner_name)
    kube: Kube = memo["kube"]
    if owner is None:
        if type != "DELETED" and kube.delete("CronJob", str(namespace), name):
            _post(
                kube,
                body,
                "Warning",
                "OrphanRemoved",
                f"no AgentSchedule {owner_name!r} owns this CronJob; deleted",
            )
        return
    _reconcile(owner, memo, kwargs["schedules_by_namespace"])


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
    owner = _owner(kwargs["schedule_bodies"], str(namespace), labels.get(LABEL_SCHEDULE, ""))
    if owner is None:
        return
    _record_job(body, owner, memo)
    _reconcile(owner, memo, kwargs["schedules_by_namespace"])


def _record_job(job: Mapping[str, Any], schedule: Mapping[str, Any], memo: Any) -> None:
    """Record a finished Job's attempts once and queue its notices once; later events and
    sweeps skip it without any API or database call."""
    history: History | None = memo["history"]
    outcome = results.job_outcome(job)
    if history is None or outcome is None:
        return
    meta = job["metadata"]
    ledger: _JobLedger = memo["jobs"]
    with ledger.claim(meta["uid"]) as mine:
        if not mine:
            return
        try:
            _record_and_notify(job, outcome, schedule, memo)
        except HistoryError as exc:
            # The sweep comes back to it: nothing is lost while the database is down.
            logging.getLogger(__name__).warning(
                "recording Job %s/%s deferred: %s", meta["namespace"], meta["name"], exc
            )


def _record_and_notify(
    job: Mapping[str, Any], outcome: results.JobOutcome, schedule: Mapping[str, Any], memo: Any
) -> None:
    """The work of ``_record_job`` for a claimed Job: one history read serves the metrics and
    the notices."""
    history: History = memo["history"]
    ledger: _JobLedger = memo["jobs"]
    meta = job["metadata"]
    uid = meta["uid"]
    fresh = outcome.finished_at >= memo["started_at"]
    attempts: list[ExecutionRecord] | None = None
    if uid not in ledger.recorded:
        kube: Kube = memo["kube"]
        pods = kube.list_objects(
            "Pod", meta["namespace"], f"batch.kubernetes.io/job-name={meta['name']}"
        )
        results.record_finished_job(job, pods, schedule, history)
        attempts = history.for_job(uid, include_output=True)
        # Jobs that finished before this process started were counted by its predecessor.
        if fresh:
            _count_runs(attempts)
        ledger.recorded.add(uid)
    age = (datetime.now(UTC) - outcome.finished_at).total_seconds()
    if fresh or age <= SETTINGS.notification_max_age_seconds:
        # The outbox dedupes per Job: a predecessor's notices are not queued again.
        if attempts is None:
            attempts = history.for_job(uid, include_output=True)
        _notify_run(attempts, schedule, memo)
    ledger.notified.add(uid)


def _target(schedule: Mapping[str, Any]) -> notices.Target | None:
    """The schedule's webhook target, or None (no notifications asked for, or a spec that
    does not validate: it gets no notices until it does)."""
    try:
        spec = AgentScheduleSpec.model_validate(schedule.get("spec") or {})
    except ValueError:
        return None
    return notices.Target.from_spec(spec.notifications)


def _subject(schedule: Mapping[str, Any]) -> notices.NoticeSubject:
    meta = schedule["metadata"]
    return notices.NoticeSubject(meta["namespace"], meta["name"], meta["uid"])


def _notify_run(
    attempts: Sequence[ExecutionRecord], schedule: Mapping[str, Any], memo: Any
) -> None:
    """Queue the notices of a finished Job's outcome (its last attempt)."""
    notifier: notify.Notifier | None = memo["notifier"]
    target = _target(schedule)
    if notifier is None or target is None:
        return
    if not attempts or any(r.status is ExecutionStatus.RUNNING for r in attempts):
        return  # an attempt without its result yet: the reaper finalises it, then notifies
    last = max(attempts, key=lambda r: (r.attempt, r.started_at))
    run = notices.RunInfo(
        job=last.job_name,
        job_uid=last.job_uid,
        result=rec.RESULT_NAMES[last.status],
        cost_usd=sum((r.cost_usd for r in attempts), Decimal(0)),
        started_at=min(r.started_at for r in attempts),
        completed_at=last.completed_at,
        output=last.output,
        error=last.error,
        alert=last.alert,
        alert_reason=last.alert_reason,
    )
    notifier.run_finished(_subject(schedule), target, run, now=datetime.now(UTC))


def _count_runs(attempts: Sequence[ExecutionRecord]) -> None:
    """Feed the run metrics with a finished Job's attempts."""
    for row in attempts:
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
    shared: dict[str, Any] = memo["shared"]
    if "indexes" not in shared:
        shared["indexes"] = (
            kwargs["schedule_bodies"],
            kwargs["schedules_by_namespace"],
            kwargs["finished_jobs"],
        )


def _reconcile(body: dict[str, Any], memo: Any, index: kopf.Index[str, Peer]) -> None:
    meta = body["metadata"]
    peers = list(index.get(meta["namespace"], []))
    history: History | None = memo["history"]
    now = datetime.now(UTC)  # one clock for the month's cost and the month it is labelled with
    stats = None
    if history is not None:
        since = rec.failures_counted_since(body.get("status") or {})
        try:
            stats = history.run_stats(
                meta["namespace"],
                meta["name"],
                # A re-created schedule is a new one: its streak and totals start clean.
                schedule_uid=meta["uid"],
                failures_since=since,
                month_start=_month_start(body, now),
            )
        except HistoryError as exc:
            # Keep reconciling (drift repair must not depend on the database); results and
            # holds stay as last recorded on status.
            logging.getLogger(__name__).warning("run results unavailable: %s", exc)

    def notice(kind: str, key: str, message: str) -> None:
        notifier: notify.Notifier | None = memo["notifier"]
        target = _target(body)
        if notifier is None or target is None:
            return
        try:  # the notifier wakes its delivery loop itself
            notifier.schedule_event(
                _subject(body), target, notices.Kind(kind), key=key, message=message, now=now
            )
        except HistoryError as exc:  # never fail a reconcile over a notice
            logging.getLogger(__name__).warning("%s notice not queued: %s", kind, exc)

    def post(obj: Mapping[str, Any], type_: str, reason: str, message: str) -> None:
        _post(memo["kube"], obj, type_, reason, message)
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
                run_api=memo["run_api"],
                notices=notice,
                now=now,
            )
        except Exception:
            metrics.RECONCILE_ERRORS.inc()
            raise
    metrics.observe_schedule(meta["namespace"], meta["name"], phase)


def _month_start(body: Mapping[str, Any], now: datetime) -> datetime | None:
    """This month's start in the schedule's zone (None for a zone validation will reject)."""
    try:
        return month_start(now, str((body.get("spec") or {}).get("timeZone", "UTC")))
    except ValueError:
        return None


def _post(kube: Kube, obj: Mapping[str, Any], type_: str, reason: str, message: str) -> None:
    """Post an Event through the API (from handlers, the sweep and the delivery loop alike);
    a failure is logged, never raised: an Event is worth less than the reconcile around it."""
    try:
        kube.post_event(obj, type_, reason, message)
    except Exception as exc:  # any API or transport error
        meta = obj.get("metadata") or {}
        logging.getLogger(__name__).warning(
            "Event %s on %s/%s not posted: %s", reason, meta.get("namespace"), meta.get("name"), exc
        )
