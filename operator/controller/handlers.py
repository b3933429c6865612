"""kopf wiring: every trigger calls the one ``reconcile``. Handlers return None; status is
written explicitly by ``reconcile`` into declared fields only.

What handlers and the operator-level loops share is one typed ``Memo``, given to ``kopf.run``
(``__main__``); settings are loaded when the operator starts, not when this module is imported.
kopf hands each index to a handler as the keyword argument named after it."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import ssl
import threading
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any, NamedTuple

import kopf
from aiohttp import web

from nocturne_operator.adapters import metrics
from nocturne_operator.adapters.kube import FIELD_MANAGER, Kube
from nocturne_operator.api.model import API_VERSION, GROUP, KIND, PLURAL, VERSION, AgentScheduleSpec
from nocturne_operator.controller import reconcile as rec
from nocturne_operator.notifications import notices, notify, outbox
from nocturne_operator.prices import PriceTable, load_price_table
from nocturne_operator.render import (
    LABEL_MANAGED_BY,
    LABEL_SCHEDULE,
    MANAGED_BY,
    RUN_RECORD_FINALIZER,
    RunApiEndpoint,
)
from nocturne_operator.runapi.auth import Authenticator
from nocturne_operator.runapi.server import make_app, serve
from nocturne_operator.runapi.tls import RunApiTls
from nocturne_operator.runs import verdicts as results
from nocturne_operator.schedule.validation import Peer
from nocturne_operator.settings import Settings
from nocturne_operator.storage import (
    EventKind,
    ExecutionRecord,
    ExecutionStatus,
    History,
    HistoryError,
    month_start,
)

_MANAGED = {LABEL_MANAGED_BY: MANAGED_BY}
# kopf's own executor for sync handlers.
WORKERS = 8
# Database calls run on kopf's workers and on asyncio's default executor (asyncio.to_thread:
# the sweep, the reaper, the run API), which has min(32, CPUs + 4) threads: one connection each.
DATABASE_POOL_SIZE = WORKERS + min(32, (os.cpu_count() or 1) + 4)
KOPF_PREFIX = f"kopf.{GROUP}"

ScheduleBodies = kopf.Index[tuple[str, str], dict[str, Any]]
SchedulePeers = kopf.Index[str, Peer]
FinishedJobs = kopf.Index[tuple[str, str], dict[str, Any]]
UnrecordedPods = kopf.Index[tuple[str, str], dict[str, Any]]


class Indexes(NamedTuple):
    """kopf's live indexes, typed. kopf passes each to every handler as the keyword argument
    named after its index function; handlers take them through ``**kwargs`` (kopf's handler
    protocols admit no extra required parameters) and read them here, once."""

    bodies: ScheduleBodies  # schedule_bodies
    peers: SchedulePeers  # schedules_by_namespace
    jobs: FinishedJobs  # finished_jobs
    pods: UnrecordedPods  # unrecorded_pods

    @classmethod
    def of(cls, kwargs: Mapping[str, Any]) -> Indexes:
        """The indexes among a handler's keyword arguments."""
        return cls(
            kwargs["schedule_bodies"],
            kwargs["schedules_by_namespace"],
            kwargs["finished_jobs"],
            kwargs["unrecorded_pods"],
        )


def tune(settings: kopf.OperatorSettings) -> None:
    """kopf's own bookkeeping lives under kopf.nocturne.dev; only warnings become Events; only
    our CronJobs, Jobs and pods are watched."""
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
    settings.execution.max_workers = WORKERS
    # Watch only the CronJobs, Jobs and pods we render (server-side label selectors): foreign
    # ones never reach the operator, its memory or its handlers' filters.
    for resource in (("batch", "cronjobs"), ("batch", "jobs"), ("", "pods")):
        settings.watching.label_selectors[resource] = f"{LABEL_MANAGED_BY}={MANAGED_BY}"
    # kopf waits this long for its own annotation patch to come back before it handles the
    # next event of an object; under load the default 5 s ran out and a creation was handled
    # twice (issue 18). The audit trail records a creation once whatever kopf does.
    settings.persistence.consistency_timeout = 30


@kopf.on.startup()
def configure(*, settings: kopf.OperatorSettings, memo: Memo, **_: Any) -> None:
    """kopf's settings (``tune``), then the clients, the price table and the notifier."""
    tune(settings)
    config = memo.settings
    memo.kube = Kube.connect()
    url = config.database_url
    memo.history = (
        History.connect(
            url.get_secret_value(), pool_size=config.database_pool_size or DATABASE_POOL_SIZE
        )
        if url is not None
        else None
    )
    memo.started_at = datetime.now(UTC)
    metrics.serve(config.metrics_port)
    # The price table lives only here: each run's grant carries its model's price.
    memo.prices = load_price_table(config.price_table_file)
    memo.notifier = _notifier(memo) if config.notifications_enabled else None


def _notifier(memo: Memo) -> notify.Notifier:
    """Notices are queued in PostgreSQL (an outbox that survives restarts), or in memory when
    the operator runs without a database."""
    history, kube, config = memo.history, memo.kube, memo.settings
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
        max_attempts=config.notification_max_attempts,
        retry_base=timedelta(seconds=config.notification_retry_base_seconds),
        retry_cap=timedelta(seconds=config.notification_retry_cap_seconds),
        timeout=config.notification_timeout_seconds,
        retention=timedelta(days=config.notification_retention_days),
        webhook_secrets=config.webhook_secrets,
        allow_private=config.webhook_allow_private,
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


@dataclass
class _ScheduleLocks:
    """One lock per schedule. Its reconciles come from kopf's handlers, Job and CronJob events
    and the sweep, on different threads; one at a time, none writes status from statistics
    older than those the previous one wrote (status went from 10 runs back to 8)."""

    _locks: dict[tuple[str, str], threading.Lock] = field(default_factory=dict)
    _guard: threading.Lock = field(default_factory=threading.Lock)

    def of(self, namespace: str, name: str) -> threading.Lock:
        """The schedule's lock."""
        with self._guard:
            return self._locks.setdefault((namespace, name), threading.Lock())

    def forget(self, namespace: str, name: str) -> None:
        """Drop a deleted schedule's lock."""
        with self._guard:
            self._locks.pop((namespace, name), None)


@dataclass(eq=False)
class Memo:
    """What every handler and loop of one operator process shares. kopf hands each object's
    handlers a shallow copy of the memo; this one's copy is itself, so what one handler sets
    (the indexes, the Job ledger) every loop sees. ``settings`` are loaded before kopf starts
    (``__main__``: bad settings end the process at once); fields without a default are set by
    the startup handlers before any other handler runs."""

    settings: Settings
    kube: Kube = field(init=False)
    prices: PriceTable = field(init=False)
    run_api: RunApiEndpoint = field(init=False)
    history: History | None = None
    notifier: notify.Notifier | None = None
    started_at: datetime = field(default_factory=lambda: datetime.now(UTC))
    jobs: _JobLedger = field(default_factory=_JobLedger)
    reconciling: _ScheduleLocks = field(default_factory=_ScheduleLocks)
    # kopf's live indexes, handed over by the first handler call (the sweep walks them).
    indexes: Indexes | None = None
    run_api_server: web.AppRunner | None = None
    run_api_renewal: asyncio.Task[None] | None = None
    sweeper: asyncio.Task[None] | None = None
    deliveries: asyncio.Task[None] | None = None

    def __copy__(self) -> Memo:
        return self


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


@kopf.index("", "v1", "pods", labels=_MANAGED)
def unrecorded_pods(
    *, namespace: str | None, labels: kopf.Labels, body: kopf.Body, **_: Any
) -> dict[tuple[str, str], dict[str, Any]] | None:
    """(namespace, schedule) -> finished runner pods still held by our finalizer: the sweep
    records those whose Job is gone (pruned or deleted while no operator ran)."""
    finalizers = (body.get("metadata") or {}).get("finalizers") or []
    if RUN_RECORD_FINALIZER not in finalizers or not results.pod_finished(body):
        return None
    return {(str(namespace), labels.get(LABEL_SCHEDULE, "")): dict(body)}


# A failed reconcile (apiserver hiccup, conflict) is retried after 15 s, not kopf's default 60 s.
@kopf.on.resume(GROUP, VERSION, PLURAL, backoff=15)
@kopf.on.create(GROUP, VERSION, PLURAL, backoff=15)
@kopf.on.update(GROUP, VERSION, PLURAL, backoff=15)
def schedule_changed(
    *,
    body: kopf.Body,
    memo: Memo,
    reason: str,
    **kwargs: Any,
) -> None:
    """Create, update (spec or annotations) and operator restart."""
    if reason in ("create", "update"):
        kind = EventKind.CREATED if reason == "create" else EventKind.UPDATED
        _audit(memo, body, kind, f"generation {body.get('metadata', {}).get('generation')}")
    indexes = Indexes.of(kwargs)
    if memo.indexes is None:  # the sweep walks kopf's live indexes; any handler hands them over
        memo.indexes = indexes
    _reconcile(dict(body), memo, indexes.peers)


@kopf.on.event(GROUP, VERSION, PLURAL)
def schedule_deleted(*, type: str, body: kopf.Body, memo: Memo, **_: Any) -> None:
    """Audit only, without a finalizer: deletion never waits for the operator (if it is down,
    the deletion is not audited, and nothing else is lost)."""
    if type == "DELETED":
        _audit(memo, body, EventKind.DELETED, "the AgentSchedule was deleted")
        namespace, name = str(body["metadata"]["namespace"]), str(body["metadata"]["name"])
        metrics.forget_schedule(namespace, name)
        memo.reconciling.forget(namespace, name)


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


def _audit(memo: Memo, obj: Mapping[str, Any], kind: EventKind, reason: str) -> None:
    """Append to the audit trail; never fails the handler (the database may be down)."""
    history = memo.history
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
async def start_run_api(*, memo: Memo, **_: Any) -> None:
    """Serve the run API (every replica does): runner pods get their budget grants here and
    report progress and results. Its CA is the operator's own, kept in a Secret."""
    kube, config = memo.kube, memo.settings
    tls = await asyncio.to_thread(RunApiTls.load_or_create, kube, config)
    memo.run_api = RunApiEndpoint(config.run_api_url, tls.ca_pem)
    context = tls.server_context()
    app = make_app(
        authenticator=Authenticator(kube),
        history=memo.history,
        prices=memo.prices,
        settings=config,
    )
    memo.run_api_server = await serve(app, config, tls, context=context)
    memo.run_api_renewal = asyncio.create_task(_renew_run_api_certificate(memo, tls, context))


# How often the serving certificate's expiry (and a CA another replica replaced) is checked.
RENEWAL_CHECK = timedelta(hours=6)


async def _renew_run_api_certificate(memo: Memo, tls: RunApiTls, context: ssl.SSLContext) -> None:
    """Re-read (and, near expiry, re-issue) the serving certificate now and then and serve the
    new one from the listening context: an operator that runs for a year keeps a valid one."""
    log = logging.getLogger(__name__)
    while True:
        await asyncio.sleep(RENEWAL_CHECK.total_seconds())
        try:
            fresh = await asyncio.to_thread(RunApiTls.load_or_create, memo.kube, memo.settings)
        except Exception:
            log.exception("run API: checking the serving certificate failed; retrying later")
            continue
        if fresh.cert == tls.cert:
            continue
        fresh.load_into(context)
        if fresh.ca_cert != tls.ca_cert:
            # Runners of Jobs created before trust the old CA: their reports fall back to
            # their summaries. New Jobs get the new bundle from the next reconcile.
            log.warning("run API: the CA changed; new Jobs get the new bundle")
            memo.run_api = RunApiEndpoint(memo.settings.run_api_url, fresh.ca_pem)
        log.info(
            "run API: now serving the certificate valid until %s", fresh.cert.not_valid_after_utc
        )
        tls = fresh


@kopf.on.cleanup()
async def stop_run_api(*, memo: Memo, **_: Any) -> None:
    """Stop listening; reports in flight finish first (aiohttp's graceful shutdown)."""
    if memo.run_api_renewal is not None:
        memo.run_api_renewal.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await memo.run_api_renewal
    if memo.run_api_server is not None:
        await memo.run_api_server.cleanup()


# Not a @kopf.timer: kopf puts a finalizer on every object a timer serves, so deleting a
# schedule would hang whenever the operator is down or uninstalled. One operator-level loop over
# the index does the same work and leaves deletion to garbage collection alone.
@kopf.on.startup()
async def start_sweeper(*, memo: Memo, **_: Any) -> None:
    """Start the periodic sweep: drift repair, fresh next runs, results left unrecorded."""
    memo.sweeper = asyncio.create_task(_sweep(memo))
    notifier = memo.notifier
    if notifier is not None:
        # Deliveries run on the operator's loop, apart from every handler: a slow or dead
        # webhook never holds up a reconcile.
        memo.deliveries = asyncio.create_task(notifier.run(asyncio.Event()))


@kopf.on.cleanup()
async def stop_sweeper(*, memo: Memo, **_: Any) -> None:
    """Stop the sweep and the deliveries with the operator."""
    for task in (memo.sweeper, memo.deliveries):
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task


async def _sweep(memo: Memo) -> None:
    log = logging.getLogger(__name__)
    while True:
        await asyncio.sleep(memo.settings.reconcile_interval_seconds)
        if memo.indexes is None:  # no schedule seen yet
            continue
        bodies, peers, jobs, pods = memo.indexes
        try:
            await asyncio.to_thread(_record_orphaned_pods, memo, bodies, pods)
        except Exception:
            log.exception("recording runner pods whose Job is gone failed")
        if memo.history is not None:
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


def _record_orphaned_pods(memo: Memo, bodies: ScheduleBodies, pods: UnrecordedPods) -> None:
    """Finished runner pods being deleted (their Job is gone) still carry their summary and our
    finalizer: record each attempt once, then let the pod go."""
    history = memo.history
    for (namespace, name), held in list(pods.items()):
        schedule = _owner(bodies, namespace, name)
        for pod in list(held):
            if not pod["metadata"].get("deletionTimestamp"):
                continue  # its Job is there: the Job's own path records it
            if history is None or schedule is None:  # nothing to record into, or for
                _release_pods(memo.kube, [pod])
                continue
            try:
                results.record_orphaned_pod(pod, schedule, history)
            except HistoryError as exc:
                logging.getLogger(__name__).warning(
                    "recording pod %s/%s deferred: %s", namespace, pod["metadata"]["name"], exc
                )
                continue
            _release_pods(memo.kube, [pod])


def _release_pods(kube: Kube, pods: Sequence[Mapping[str, Any]]) -> None:
    """Take our finalizer off recorded runner pods (they may go now)."""
    for pod in pods:
        meta = pod["metadata"]
        if RUN_RECORD_FINALIZER in (meta.get("finalizers") or []):
            kube.remove_finalizer("Pod", meta["namespace"], meta["name"], RUN_RECORD_FINALIZER)


# A RUNNING row younger than this may belong to a pod the API has not shown us yet.
REAP_AFTER = timedelta(minutes=2)


def _reap(memo: Memo, bodies: ScheduleBodies) -> None:
    """Finalise executions left RUNNING whose Job or pod is gone (one query, then one Job and
    one pod listing per schedule that has such rows)."""
    history, kube, ledger = memo.history, memo.kube, memo.jobs
    if history is None:
        return
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


def _owner(bodies: ScheduleBodies, namespace: str, name: str) -> dict[str, Any] | None:
    """The AgentSchedule from kopf's index (None when it is gone or not seen yet)."""
    return next(iter(bodies.get((namespace, name), [])), None)


def _periodic(
    schedule: dict[str, Any], memo: Memo, peers: SchedulePeers, jobs: FinishedJobs
) -> None:
    if memo.history is not None:
        meta = schedule["metadata"]
        for job in list(jobs.get((meta["namespace"], meta["name"]), [])):
            _record_job(job, schedule, memo)
    _reconcile_fresh(schedule, memo, peers)


def _reconcile_fresh(schedule: Mapping[str, Any], memo: Memo, peers: SchedulePeers) -> None:
    """Reconcile the schedule as the apiserver has it now: kopf's index may lag behind our own
    status writes, and a stale status would be written again for nothing."""
    meta = schedule["metadata"]
    fresh = memo.kube.get(KIND, meta["namespace"], meta["name"])
    if fresh is not None and fresh["metadata"].get("uid") == meta.get("uid"):
        _reconcile(fresh, memo, peers)


@kopf.on.event("batch", "v1", "cronjobs", labels=_MANAGED)
def cronjob_event(
    *,
    type: str,
    body: kopf.Body,
    namespace: str | None,
    name: str,
    labels: kopf.Labels,
    memo: Memo,
    **kwargs: Any,
) -> None:
    """A managed CronJob changed or vanished: repair it at once, or remove it if orphaned."""
    indexes = Indexes.of(kwargs)
    owner_name = labels.get(LABEL_SCHEDULE, "")
    owner = _owner(indexes.bodies, str(namespace), owner_name)
    kube = memo.kube
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
    _reconcile_fresh(owner, memo, indexes.peers)


@kopf.on.event("batch", "v1", "jobs", labels=_MANAGED)
def job_event(
    *,
    body: kopf.Body,
    namespace: str | None,
    name: str,
    labels: kopf.Labels,
    memo: Memo,
    **kwargs: Any,
) -> None:
    """A run finished: make sure its attempts are recorded, then refresh the owner's status."""
    if results.job_outcome(body) is None:
        return
    indexes = Indexes.of(kwargs)
    owner = _owner(indexes.bodies, str(namespace), labels.get(LABEL_SCHEDULE, ""))
    if owner is None:
        return
    _record_job(body, owner, memo)
    _reconcile_fresh(owner, memo, indexes.peers)


def _record_job(job: Mapping[str, Any], schedule: Mapping[str, Any], memo: Memo) -> None:
    """Record a finished Job's attempts once and queue its notices once; later events and
    sweeps skip it without any API or database call."""
    history = memo.history
    outcome = results.job_outcome(job)
    if outcome is None:
        return
    meta = job["metadata"]
    ledger = memo.jobs
    if history is None:  # nothing to record into: the pods need not wait for it
        if meta["uid"] not in ledger.notified:
            selector = f"batch.kubernetes.io/job-name={meta['name']}"
            _release_pods(memo.kube, memo.kube.list_objects("Pod", meta["namespace"], selector))
            ledger.notified.add(meta["uid"])
        return
    with ledger.claim(meta["uid"]) as mine:
        if not mine:
            return
        try:
            _record_and_notify(job, outcome, schedule, memo, history)
        except HistoryError as exc:
            # The sweep comes back to it: nothing is lost while the database is down.
            logging.getLogger(__name__).warning(
                "recording Job %s/%s deferred: %s", meta["namespace"], meta["name"], exc
            )


def _record_and_notify(
    job: Mapping[str, Any],
    outcome: results.JobOutcome,
    schedule: Mapping[str, Any],
    memo: Memo,
    history: History,
) -> None:
    """The work of ``_record_job`` for a claimed Job: one history read serves the metrics and
    the notices."""
    ledger = memo.jobs
    meta = job["metadata"]
    uid = meta["uid"]
    fresh = outcome.finished_at >= memo.started_at
    attempts: list[ExecutionRecord] | None = None
    if uid not in ledger.recorded:
        kube = memo.kube
        pods = kube.list_objects(
            "Pod", meta["namespace"], f"batch.kubernetes.io/job-name={meta['name']}"
        )
        results.record_finished_job(job, pods, schedule, history)
        _release_pods(kube, pods)
        attempts = history.for_job(uid, include_output=True)
        # Jobs that finished before this process started were counted by its predecessor.
        if fresh:
            _count_runs(attempts)
        ledger.recorded.add(uid)
    age = (datetime.now(UTC) - outcome.finished_at).total_seconds()
    if fresh or age <= memo.settings.notification_max_age_seconds:
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
    attempts: Sequence[ExecutionRecord], schedule: Mapping[str, Any], memo: Memo
) -> None:
    """Queue the notices of a finished Job's outcome (its last attempt)."""
    notifier = memo.notifier
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


def _reconcile(body: dict[str, Any], memo: Memo, index: SchedulePeers) -> None:
    meta = body["metadata"]
    with memo.reconciling.of(meta["namespace"], meta["name"]):
        _reconcile_held(body, memo, index)


def _reconcile_held(body: dict[str, Any], memo: Memo, index: SchedulePeers) -> None:
    meta = body["metadata"]
    peers = list(index.get(meta["namespace"], []))
    history = memo.history
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
        notifier = memo.notifier
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
        _post(memo.kube, obj, type_, reason, message)
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
                memo.settings,
                memo.kube,
                events=post,
                peers=peers,
                stats=stats,
                run_api=memo.run_api,
                # A model without a price would fail every run: refused up front instead.
                prices=memo.prices,
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
