"""kopf wiring: every trigger calls the one ``reconcile``. Handlers return None; status is
written explicitly by ``reconcile`` into declared fields only.

What handlers and the operator-level loops share is one typed ``Memo``, given to ``kopf.run``
(``__main__``); settings are loaded when the operator starts, not when this module is imported.
kopf hands each index to a handler as the keyword argument named after it."""

from __future__ import annotations

import asyncio
import contextlib
import copy
import logging
import os
import ssl
from collections.abc import Iterable
from datetime import UTC, datetime, timedelta
from typing import Any

import kopf

from nocturne_operator.adapters import metrics
from nocturne_operator.adapters.kube import Kube
from nocturne_operator.api.model import API_VERSION, GROUP, KIND, PLURAL, VERSION
from nocturne_operator.api.policy import POLICY_PLURAL
from nocturne_operator.controller import admission, leadership, policies, relay
from nocturne_operator.controller.cache import Change, Packed
from nocturne_operator.controller.memo import Indexes, Memo
from nocturne_operator.controller.schedules import (
    audit,
    not_run_yet,
    post_event,
    read_stats_ahead,
    reconcile_key,
    trimmed,
)
from nocturne_operator.controller.sweep import sweep
from nocturne_operator.controller.workers import Workers
from nocturne_operator.notifications import notices, notify, outbox
from nocturne_operator.prices import load_price_table
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
from nocturne_operator.runs import verdicts
from nocturne_operator.runs.recorder import Recorder
from nocturne_operator.runsapi import server as runs_server
from nocturne_operator.runsapi.auth import AccessReviews, FrontProxy
from nocturne_operator.runsapi.changes import RunChanges
from nocturne_operator.schedule.policy import Policy
from nocturne_operator.schedule.validation import Peer
from nocturne_operator.storage import EventKind, History

_MANAGED = {LABEL_MANAGED_BY: MANAGED_BY}
# kopf's own executor for sync handlers (audit rows, recording finished Jobs).
WORKERS = 8
# The threads that reconcile schedules off the queue.
RECONCILE_WORKERS = 8
# Database calls run on kopf's workers, the reconcile workers and asyncio's default executor
# (asyncio.to_thread: the sweep, the reaper, the run API), which has min(32, CPUs + 4)
# threads: one connection each.
DATABASE_POOL_SIZE = WORKERS + RECONCILE_WORKERS + min(32, (os.cpu_count() or 1) + 4)
KOPF_PREFIX = f"kopf.{GROUP}"


class NoDiffBase(kopf.DiffBaseStorage):
    """No essence kept or compared: every handler only watches, and kopf's default storage
    deep-copied every object of every event (schedules, CronJobs, Jobs, pods) to diff it for
    change handlers there are none of (8 % of a restart's samples at 1,000 schedules)."""

    def build(
        self, *, body: kopf.Body, extra_fields: Iterable[Any] | None = None
    ) -> kopf.BodyEssence:
        return kopf.BodyEssence()

    def fetch(self, *, body: kopf.Body) -> kopf.BodyEssence | None:
        return None

    def store(self, *, body: kopf.Body, patch: kopf.Patch, essence: kopf.BodyEssence) -> None:
        return None


def tune(settings: kopf.OperatorSettings) -> None:
    """Only warnings become Events; only our CronJobs, Jobs and pods are watched. Every
    handler is a watching one (``kopf.on.event``), so kopf writes no bookkeeping of its own
    on any object and compares no essences (``NoDiffBase``); its storage is still named under
    kopf.nocturne.dev, never plain nocturne.dev, where users' run-now / suspend-reason
    annotations live."""
    settings.persistence.progress_storage = kopf.AnnotationsProgressStorage(prefix=KOPF_PREFIX)
    settings.persistence.diffbase_storage = NoDiffBase()
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


@kopf.on.startup()
def configure(*, settings: kopf.OperatorSettings, memo: Memo, **_: Any) -> None:
    """kopf's settings (``tune``), then the clients, the price table and the notifier."""
    tune(settings)
    config = memo.settings
    memo.kube = Kube.connect()
    memo.kube.on_write = memo.unseen.wrote
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
    memo.recorder = Recorder(
        memo.kube,
        memo.history,
        memo.notifier,
        memo.started_at,
        timedelta(seconds=config.notification_max_age_seconds),
    )
    memo.workers = Workers(memo.queue, lambda key: reconcile_key(key, memo), RECONCILE_WORKERS)
    memo.workers.start(paused=True)
    # A standby's queue keeps what events name until it leads: nothing waits on it meanwhile.
    metrics.QUEUE_DEPTH.set_function(lambda: len(memo.queue) if memo.leading() else 0)
    # Two replicas (issue 15): the workers wait until this one holds the Lease; what only the
    # leader writes is refused the moment it no longer does.
    memo.elector = leadership.elect(memo)
    memo.kube.may_write = memo.leading
    memo.elector.start()


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
        post_event(
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


@kopf.index(GROUP, VERSION, PLURAL)
def schedules_by_namespace(
    *, namespace: str | None, name: str, meta: kopf.Meta, **_: Any
) -> dict[str, Peer]:
    """Namespace -> its AgentSchedules, for the quota."""
    return {str(namespace): Peer(name, str(meta.get("creationTimestamp", "")))}


@kopf.index(GROUP, VERSION, PLURAL)
def schedule_bodies(
    *, namespace: str | None, name: str, body: kopf.Body, **_: Any
) -> dict[tuple[str, str], Packed]:
    """(namespace, name) -> the AgentSchedule: what the workers reconcile."""
    return {(str(namespace), name): Packed(trimmed(body))}


@kopf.index("batch", "v1", "cronjobs", labels=_MANAGED)
def schedule_cronjobs(
    *, namespace: str | None, labels: kopf.Labels, body: kopf.Body, **_: Any
) -> dict[tuple[str, str], Packed]:
    """(namespace, schedule) -> its CronJob: what the workers compare with its rendering."""
    return {(str(namespace), labels.get(LABEL_SCHEDULE, "")): Packed(trimmed(body))}


@kopf.index("batch", "v1", "jobs", labels=_MANAGED)
def finished_jobs(
    *, namespace: str | None, labels: kopf.Labels, body: kopf.Body, **_: Any
) -> dict[tuple[str, str], Packed] | None:
    """(namespace, schedule) -> its finished Jobs: a pass finds what is left to record
    without listing Jobs."""
    if verdicts.job_outcome(body) is None:
        return None
    return {(str(namespace), labels.get(LABEL_SCHEDULE, "")): Packed(trimmed(body))}


@kopf.index("", "v1", "pods", labels=_MANAGED)
def unrecorded_pods(
    *, namespace: str | None, labels: kopf.Labels, body: kopf.Body, **_: Any
) -> dict[tuple[str, str], Packed] | None:
    """(namespace, schedule) -> finished runner pods still held by our finalizer: the sweep
    records those whose Job is gone (pruned or deleted while no operator ran)."""
    finalizers = (body.get("metadata") or {}).get("finalizers") or []
    if RUN_RECORD_FINALIZER not in finalizers or not verdicts.pod_finished(body):
        return None
    return {(str(namespace), labels.get(LABEL_SCHEDULE, "")): Packed(trimmed(body))}


@kopf.index(GROUP, VERSION, POLICY_PLURAL)
def schedule_policies(*, name: str, spec: kopf.Spec, **_: Any) -> dict[str, Policy]:
    """Name -> the AgentSchedulePolicy as read (a broken one carries its errors)."""
    return {name: Policy.parse(name, dict(spec))}


@kopf.index("", "v1", "namespaces")
def namespace_labels(*, name: str, labels: kopf.Labels, **_: Any) -> dict[str, dict[str, str]]:
    """Namespace -> its labels: which policies select it."""
    return {name: dict(labels)}


def _indexes(memo: Memo, kwargs: dict[str, Any]) -> Indexes:
    """The indexes among a handler's arguments. The first handler call hands them over to the
    workers and the sweep, and queues every schedule for the first pass: kopf calls no handler
    before each index has its initial listing."""
    indexes = Indexes.of(kwargs)
    if memo.indexes is None:
        keys = set(indexes.bodies)
        memo.listed_at_start = frozenset(keys)
        memo.indexes = indexes
        read_stats_ahead(memo, [b for k in keys if (b := indexes.owner(*k)) is not None])
        if memo.workers is not None:
            memo.workers.first_pass.begin(keys)
        for key in keys:  # behind what events name: a schedule created meanwhile goes first
            memo.queue.add_after(key, 0)
        if memo.leading():  # else the replica taking the lead writes them
            policies.sync_budgets(memo, indexes)
    return indexes


@kopf.on.event(GROUP, VERSION, PLURAL)
def schedule_event(*, type: str | None, body: kopf.Body, memo: Memo, **kwargs: Any) -> None:
    """Any event of an AgentSchedule (the initial listing too): audit a creation, a new
    generation or a deletion, and queue the schedule for a pass unless only its status changed
    (our own writes) or the first pass, running, covers it (an event of the initial listing).
    No finalizer: deletion never waits for the operator (if it is down, the deletion is not
    audited, and nothing else is lost)."""
    _indexes(memo, kwargs)
    meta = body["metadata"]
    namespace, name, uid = str(meta["namespace"]), str(meta["name"]), str(meta["uid"])
    deleted = type == "DELETED"
    memo.unseen.seen(KIND, namespace, name, None if deleted else meta.get("resourceVersion"))
    if deleted:
        audit(memo, body, EventKind.DELETED, "the AgentSchedule was deleted")
        metrics.forget_schedule(namespace, name)
        memo.changes.forget(uid)
        memo.queue.forget((namespace, name))
        memo.recorder.stats.forget(uid)
        return
    change = memo.changes.of(body)
    if change is not Change.NONE and not meta.get("deletionTimestamp"):
        if change is not Change.RESUMED:
            # A change by someone is a moment to read the run statistics afresh (rows written
            # by another process, or by hand, reach status now rather than after the cache's
            # TTL). Not a resume: this process read them all at its start (read_stats_ahead).
            memo.recorder.stats.invalidate(uid)
        key = (namespace, name)
        if change is Change.CREATED and key not in memo.listed_at_start:
            not_run_yet(memo, body)
        if type is not None or not memo.in_first_pass(key):  # else queued by _indexes
            memo.queue.add(key)
    # Audited after the schedule was queued: its pass need not wait for the row. A creation
    # is audited once whoever writes it (the database keeps one row): every replica does,
    # so none is missed while the lead changes hands; a new generation by the leader.
    if change is Change.CREATED or (change is Change.UPDATED and memo.leading()):
        kind = EventKind.CREATED if change is Change.CREATED else EventKind.UPDATED
        audit(memo, body, kind, f"generation {meta.get('generation')}")


@kopf.on.event(GROUP, VERSION, POLICY_PLURAL)
def policy_event(*, type: str | None, body: kopf.Body, memo: Memo, **kwargs: Any) -> None:
    """An AgentSchedulePolicy listed, changed or deleted: a pass for every schedule (which
    namespaces it selected before is not known), the namespace budgets the grants read, then
    its status -- the leader writes both (issue 15); a failed status write loses nothing else."""
    indexes = _indexes(memo, kwargs)
    name = str(body["metadata"]["name"])
    leading = memo.leading()
    if type == "DELETED":
        memo.policy_bodies.pop(name, None)
    else:
        memo.policy_bodies[name] = copy.deepcopy(dict(body))
    if type is not None:  # not the initial listing: the first pass covers every schedule
        policies.queue_all(memo, indexes)
        if leading:
            policies.sync_budgets(memo, indexes)
    if leading and type != "DELETED":
        policies.refresh_statuses(memo, indexes)


@kopf.on.event("", "v1", "namespaces")
def namespace_event(*, type: str | None, name: str, memo: Memo, **kwargs: Any) -> None:
    """A namespace created, relabelled or deleted: the policies that select it may differ."""
    indexes = _indexes(memo, kwargs)
    if type is None:  # the initial listing: the first pass covers every schedule
        return
    if type == "DELETED":
        metrics.NAMESPACE_BUDGETS.forget(name)
    if memo.serves(name):
        policies.queue_namespace(memo, indexes, name)
    if not memo.leading():  # a replica taking the lead brings every policy in line
        return
    if memo.serves(name):
        policies.sync_budgets(memo, indexes)
    policies.refresh_statuses(memo, indexes)  # how many namespaces each selects


@kopf.on.startup()
async def start_run_api(*, settings: kopf.OperatorSettings, memo: Memo, **_: Any) -> None:
    """Serve the run API (every replica does): runner pods get their budget grants here and
    report progress and results. Its CA is the operator's own, kept in a Secret."""
    kube, config = memo.kube, memo.settings
    tls = await asyncio.to_thread(RunApiTls.load_or_create, kube, config)
    memo.run_api = RunApiEndpoint(config.run_api_url, tls.ca_pem)
    context = tls.server_context()
    conninfo = _conninfo(memo)
    if conninfo is not None:
        # A report may reach any replica: every replica hears of it (controller.relay).
        channel = relay.channel_for(config.run_api_tls_namespace, config.leader_lease_name)
        memo.relay = relay.RunRelay(memo.active, memo.recorder.stats, conninfo, channel)
        await memo.relay.start()
    app = make_app(
        authenticator=Authenticator(kube),
        history=memo.history,
        prices=memo.prices,
        settings=config,
        # Status reads a schedule's run statistics from a cache this keeps true.
        on_write=memo.relay.wrote if memo.relay else memo.recorder.stats.invalidate,
        observer=memo.relay or memo.active,
        # A retry finds its Job's ended attempts recorded, their grants released.
        before_grant=lambda identity: memo.recorder.settle_ended_attempts(
            identity.namespace, identity.job_name, identity.job_uid, identity.pod_uid
        ),
        ready=lambda: not memo.draining,
    )
    memo.run_api_server = await serve(app, config, tls, context=context)
    # The admission webhook (kopf serves it once the startup handlers are done).
    memo.webhook = admission.serve(settings, config, tls)
    memo.serving_contexts.append(context)
    memo.run_api_renewal = asyncio.create_task(_renew_run_api_certificate(memo, tls))
    if config.runs_api_port:
        await _start_runs_api(memo, tls)


async def _start_runs_api(memo: Memo, tls: RunApiTls) -> None:
    """Serve the agentruns API (every replica does) with the operator's certificate; keep the
    APIService's caBundle and the apiserver's request-header settings current."""
    config, history = memo.settings, memo.history
    context = tls.server_context()
    memo.serving_contexts.append(context)
    memo.run_changes = RunChanges(_conninfo(memo))
    memo.run_changes.start()
    app = runs_server.make_app(
        history=history,
        front_proxy=lambda: memo.front_proxy,
        reviews=AccessReviews(memo.kube.review_access),
        changes=memo.run_changes,
    )
    memo.runs_api_server = await runs_server.serve(
        app, config.runs_api_bind, config.runs_api_port, context
    )
    memo.runs_api_tasks.append(asyncio.create_task(_keep_front_proxy(memo, context, tls)))


def _conninfo(memo: Memo) -> str | None:
    """The history database as a libpq connection string (for LISTEN), or None."""
    if memo.history is None:
        return None
    url = memo.history.engine.url.set(drivername="postgresql")
    return url.render_as_string(hide_password=False)


async def _keep_front_proxy(memo: Memo, context: ssl.SSLContext, tls: RunApiTls) -> None:
    """Read the apiserver's request-header settings (and trust its CA), set the APIService's
    caBundle; again every RENEWAL_CHECK, and every minute until both worked once."""
    log = logging.getLogger(__name__)
    patched = False
    while True:
        try:
            proxy = await asyncio.to_thread(FrontProxy.load, memo.kube)
            if proxy != memo.front_proxy:
                proxy.trust(context)
                memo.front_proxy = proxy
                log.info(
                    "agentruns API: trusting the apiserver's front proxy %s", proxy.allowed_names
                )
        except Exception as exc:
            log.warning("agentruns API: no request-header settings yet: %s", exc)
        if not patched:  # an APIService installed later: tried again every minute
            patched = await _point_api_service(memo, tls.ca_pem)
        ready = memo.front_proxy is not None and patched
        await asyncio.sleep(RENEWAL_CHECK.total_seconds() if ready else 60)


# How often the serving certificate's expiry (and a CA another replica replaced) is checked.
RENEWAL_CHECK = timedelta(hours=6)


async def _renew_run_api_certificate(memo: Memo, tls: RunApiTls) -> None:
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
        for context in memo.serving_contexts:
            fresh.load_into(context)
        if memo.webhook is not None:
            server, pem = memo.webhook
            server.cadata = fresh.ca_pem.encode()  # read again when kopf restarts the server
            fresh.write_pem(pem)
        if fresh.ca_cert != tls.ca_cert:
            # Runners of Jobs created before trust the old CA: their reports fall back to
            # their summaries. New Jobs get the new bundle from the next reconcile.
            log.warning("run API: the CA changed; new Jobs get the new bundle")
            memo.run_api = RunApiEndpoint(memo.settings.run_api_url, fresh.ca_pem)
            await _point_api_service(memo, fresh.ca_pem)
        log.info(
            "run API: now serving the certificate valid until %s", fresh.cert.not_valid_after_utc
        )
        tls = fresh


async def _point_api_service(memo: Memo, ca_pem: str) -> bool:
    """Set the agentruns APIService's caBundle to ``ca_pem``; True when it is set (or there is
    none to keep), False when the APIService is missing or the patch failed (logged)."""
    name = memo.settings.runs_api_apiservice
    if not (memo.settings.runs_api_port and name):
        return True
    log = logging.getLogger(__name__)
    try:
        found = await asyncio.to_thread(memo.kube.patch_api_service_ca, name, ca_pem)
    except Exception as exc:
        log.warning("agentruns API: setting the caBundle of %s failed: %s", name, exc)
        return False
    if not found:
        log.warning("agentruns API: APIService %s not found; caBundle not set", name)
    return found


@kopf.on.cleanup()
async def stop_run_api(*, memo: Memo, **_: Any) -> None:
    """Give up the lead (a standby takes it within seconds), answer readiness 503 and keep
    serving for shutdown_drain_seconds while the Service turns to the other replica; then
    stop listening (reports in flight finish first: aiohttp's graceful shutdown)."""
    memo.draining = True
    if memo.elector is not None:
        await asyncio.to_thread(memo.elector.stop)
    await asyncio.sleep(memo.settings.shutdown_drain_seconds)
    if memo.run_api_renewal is not None:
        memo.run_api_renewal.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await memo.run_api_renewal
    if memo.run_api_server is not None:
        await memo.run_api_server.cleanup()
    for task in memo.runs_api_tasks:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
    if memo.runs_api_server is not None:
        await memo.runs_api_server.cleanup()
    if memo.run_changes is not None:
        await memo.run_changes.stop()
    if memo.relay is not None:
        await memo.relay.stop()


@kopf.on.startup()
async def start_sweeper(*, memo: Memo, **_: Any) -> None:
    """Start the periodic sweep (runner pods whose Job is gone, rows left RUNNING) and the
    notification deliveries."""
    memo.sweeper = asyncio.create_task(sweep(memo))
    notifier = memo.notifier
    if notifier is not None:
        # Deliveries run on the operator's loop, apart from every handler: a slow or dead
        # webhook never holds up a reconcile.
        memo.deliveries = asyncio.create_task(notifier.run(asyncio.Event()))


@kopf.on.cleanup()
async def stop_sweeper(*, memo: Memo, **_: Any) -> None:
    """Stop the sweep, the deliveries and the workers (passes in progress finish first)."""
    for task in (memo.sweeper, memo.deliveries):
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
    if memo.workers is not None:
        await asyncio.to_thread(memo.workers.stop)


@kopf.on.event("batch", "v1", "cronjobs", labels=_MANAGED)
def cronjob_event(
    *,
    type: str | None,
    body: kopf.Body,
    namespace: str | None,
    name: str,
    labels: kopf.Labels,
    memo: Memo,
    **kwargs: Any,
) -> None:
    """A managed CronJob changed or vanished: queue its schedule (drift is repaired at once),
    or remove the CronJob if no schedule owns it. The echo of our own write wakes nobody, nor
    does the initial listing while the first pass (which read the listed CronJob) runs."""
    indexes = _indexes(memo, kwargs)
    deleted = type == "DELETED"
    version = None if deleted else body["metadata"].get("resourceVersion")
    if memo.unseen.seen("CronJob", str(namespace), name, version):
        return
    key = (str(namespace), labels.get(LABEL_SCHEDULE, ""))
    if key in indexes.bodies:
        if type is not None or not memo.in_first_pass(key):  # else queued by _indexes
            memo.queue.add(key)
        return
    owner_name = key[1]
    kube = memo.kube
    if not memo.leading():  # the leader removes it (a new leader when it takes over)
        return
    if not deleted and kube.delete("CronJob", str(namespace), name):
        post_event(
            kube,
            body,
            "Warning",
            "OrphanRemoved",
            f"no AgentSchedule {owner_name!r} owns this CronJob; deleted",
        )


@kopf.on.event("", "v1", "pods", labels=_MANAGED)
def pod_event(
    *, body: kopf.Body, namespace: str | None, labels: kopf.Labels, memo: Memo, **kwargs: Any
) -> None:
    """A finished runner pod being deleted with our finalizer still on (its Job was deleted:
    a cancel, or pruned): record its attempt from its summary and let it go now, not at the
    next sweep (a foreground deletion of its Job waits for it)."""
    meta = body["metadata"]
    finalizers = meta.get("finalizers") or []
    if (
        not meta.get("deletionTimestamp")
        or RUN_RECORD_FINALIZER not in finalizers
        or not verdicts.pod_finished(body)
        or not memo.leading()  # the leader's sweep records it
    ):
        return
    indexes = _indexes(memo, kwargs)
    key = (str(namespace), labels.get(LABEL_SCHEDULE, ""))
    memo.recorder.record_orphaned_pods(indexes.owner, [(key, [dict(body)])])


@kopf.on.event("batch", "v1", "jobs", labels=_MANAGED)
def job_event(
    *,
    type: str | None,
    body: kopf.Body,
    namespace: str | None,
    name: str,
    labels: kopf.Labels,
    memo: Memo,
    **kwargs: Any,
) -> None:
    """A run finished: make sure its attempts are recorded, then queue the owner (its status
    shows the result). A Job deleted while it ran (a cancel) queues the owner too: its runner
    reported CANCELLED before its pod, and then the Job, were gone."""
    running = verdicts.job_outcome(body) is None
    if running and type != "DELETED":
        return
    indexes = _indexes(memo, kwargs)
    owner_name = labels.get(LABEL_SCHEDULE, "")
    if running:  # deleted before it finished
        key = (str(namespace), owner_name)
        memo.active.forget(key, [str(body["metadata"]["uid"])])
        if key in indexes.bodies:
            memo.queue.add(key)
        return
    owner = indexes.owner(str(namespace), owner_name)
    if owner is None or not memo.leading():  # the leader's pass records it
        return
    memo.recorder.record_job(body, owner)
    memo.queue.add((str(namespace), owner_name))
