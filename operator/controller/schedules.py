"""Reconcile one schedule from the operator's memo (a worker's pass: ``reconcile_key``): from
kopf's indexes, with its run statistics from PostgreSQL, its notices queued and its Events
posted (and audited). The decisions are ``reconcile``'s; this is where the operator's clients
meet them."""

from __future__ import annotations

import logging
import zlib
from collections.abc import Mapping
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any

from nocturne_operator.adapters import metrics
from nocturne_operator.adapters.kube import FIELD_MANAGER, Kube
from nocturne_operator.api.model import KIND
from nocturne_operator.controller import reconcile as rec
from nocturne_operator.controller.memo import Memo, SchedulePeers
from nocturne_operator.controller.queue import Key
from nocturne_operator.notifications import notices
from nocturne_operator.render import cronjob_name
from nocturne_operator.schedule.validation import Limits, Peer
from nocturne_operator.settings import Settings
from nocturne_operator.storage import EventKind, HistoryError, RunStats, StatsQuery, month_start

log = logging.getLogger(__name__)


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
    "RunCancelled": EventKind.RUN_CANCELLED,
}


def audit(memo: Memo, obj: Mapping[str, Any], kind: EventKind, reason: str) -> None:
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
        log.warning("audit event %s not recorded: %s", kind, exc)


def _last_writer(meta: Mapping[str, Any]) -> str | None:
    """The field manager that wrote the object last (kubectl, argocd-controller, ...), not
    counting the operator's own writes."""
    entry = _last_writer_entry(meta)
    return None if entry is None else str(entry["manager"])


def _last_writer_entry(meta: Mapping[str, Any]) -> dict[str, Any] | None:
    """That writer's ``managedFields`` entry, without its field set."""
    ours = {"kopf", FIELD_MANAGER}
    entries = [
        e
        for e in meta.get("managedFields") or []
        if e.get("manager") and e.get("manager") not in ours and e.get("subresource") != "status"
    ]
    if not entries:
        return None
    latest = max(entries, key=lambda e: e.get("time") or "")
    return {k: latest[k] for k in ("manager", "operation", "time") if k in latest}


# kubectl's copy of what it applied: as big as the object, and nothing a pass reads.
_LAST_APPLIED = "kubectl.kubernetes.io/last-applied-configuration"


def trimmed(body: Mapping[str, Any]) -> dict[str, Any]:
    """What an index keeps of an object: all of it but ``managedFields`` (which ``audit`` reads
    only to name the last writer: kept as that one entry, without its field set) and kubectl's
    last-applied copy. Nested parts are shared with ``body``, not copied."""
    obj = dict(body)
    meta = dict(obj.get("metadata") or {})
    writer = _last_writer_entry(meta)
    meta.pop("managedFields", None)
    if writer is not None:
        meta["managedFields"] = [writer]
    annotations = meta.get("annotations")
    if annotations and _LAST_APPLIED in annotations:
        meta["annotations"] = {k: v for k, v in annotations.items() if k != _LAST_APPLIED}
    obj["metadata"] = meta
    return obj


def reconcile_key(key: Key, memo: Memo) -> None:
    """One worker's pass over a schedule: record its finished Jobs, then reconcile it, both
    from kopf's indexes (an object we wrote and the watch has not shown yet is read from the
    apiserver instead); then set the timer of its next pass."""
    indexes = memo.indexes
    if indexes is None:
        return
    namespace, name = key
    body = _current(memo, KIND, namespace, name, indexes.owner(namespace, name))
    if body is None or body["metadata"].get("deletionTimestamp"):
        return  # gone, or going: garbage collection takes its CronJob and Jobs
    behind = False  # a finished Job left unrecorded (the database is away)
    if memo.history is not None:
        for job in indexes.finished_jobs(*key, done=memo.recorder.ledger.notified):
            behind = not memo.recorder.record_job(job, body) or behind
    cronjob = _current(memo, "CronJob", namespace, cronjob_name(name), indexes.cronjob(*key))
    memo.active.forget(key, indexes.finished_job_uids(*key))  # their runs are over
    plan = reconcile_schedule(
        body,
        memo,
        indexes.peers,
        cronjob,
        behind=behind,
        limits=indexes.limits(memo.settings, namespace, memo.kube),
    )
    # Within: a pass asked for meanwhile (a run's progress for status) is not put off.
    memo.queue.add_within(key, next_pass_in(memo.settings, key, plan.due, datetime.now(UTC)))


# A pass due at a moment runs this long after it: the slot or deadline has surely passed.
DUE_SLACK = timedelta(seconds=1)


def next_pass_in(settings: Settings, key: Key, due: datetime | None, now: datetime) -> float:
    """Seconds until ``key``'s next pass: just after ``due`` (the moment the clock changes what
    a pass decides, or work was left for when the database is back), at the latest after the
    resync interval, shortened by up to a tenth so that schedules listed together do not all
    come back in the same second."""
    spread = zlib.crc32(f"{key[0]}/{key[1]}".encode()) / 2**32
    seconds = settings.resync_interval_seconds * (1.0 - spread / 10)
    if due is not None:
        seconds = min(seconds, (due + DUE_SLACK - now).total_seconds())
    return max(0.0, seconds)


def _current(
    memo: Memo, kind: str, namespace: str, name: str, cached: dict[str, Any] | None
) -> dict[str, Any] | None:
    """``cached``, unless a write of ours is newer: then the object as the apiserver has it."""
    if not memo.unseen.stale(kind, namespace, name, cached):
        return cached
    fresh = memo.kube.get(kind, namespace, name)
    memo.unseen.settle(kind, namespace, name, fresh)
    return fresh


def reconcile_schedule(
    body: dict[str, Any],
    memo: Memo,
    index: SchedulePeers,
    cronjob: dict[str, Any] | None,
    *,
    behind: bool = False,
    limits: Limits | None = None,
) -> rec.Plan:
    """Reconcile ``body`` against ``cronjob`` (its CronJob as the cluster has it, or None); the
    plan carried out. When the database was away -- its run statistics unread, or a finished
    Job left unrecorded (``behind``) -- the plan is due again within the reconcile interval, to
    catch up once the database is back. ``limits``: the namespace's (its policies')."""
    meta = body["metadata"]
    peers = list(index.get(meta["namespace"], []))
    history = memo.history
    now = datetime.now(UTC)  # one clock for the month's cost and the month it is labelled with
    stats = None
    if history is not None:
        try:
            # By UID: a re-created schedule is a new one, its streak and totals start clean.
            stats = memo.recorder.stats.get(_stats_query(body, now), history.run_stats)
        except HistoryError as exc:
            # Keep reconciling (drift repair must not depend on the database); results and
            # holds stay as last recorded on status.
            log.warning("run results unavailable: %s", exc)
    namespace_spent = _namespace_spent(memo, meta["namespace"], limits, now)
    _spread_hold(memo, meta["namespace"], peers, limits=limits, spent=namespace_spent, now=now)

    def notice(kind: str, key: str, message: str) -> None:
        notifier = memo.notifier
        target = notices.Target.of(body)
        if notifier is None or target is None:
            return
        try:  # the notifier wakes its delivery loop itself
            notifier.schedule_event(
                notices.NoticeSubject.of(body),
                target,
                notices.Kind(kind),
                key=key,
                message=message,
                now=now,
            )
        except HistoryError as exc:  # never fail a reconcile over a notice
            log.warning("%s notice not queued: %s", kind, exc)

    def post(obj: Mapping[str, Any], type_: str, reason: str, message: str) -> None:
        post_event(memo.kube, obj, type_, reason, message)
        if reason == "AutoPaused":
            metrics.count_auto_pause(meta["namespace"], meta["name"])
        elif reason == "BudgetExhausted":
            metrics.count_budget_exhausted(meta["namespace"], meta["name"])
        if reason in _AUDITED:
            audit(memo, obj, _AUDITED[reason], message)

    with metrics.RECONCILE_DURATION.time():
        try:
            plan = rec.reconcile(
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
                actual=cronjob,
                active=memo.active.of((meta["namespace"], meta["name"])),
                limits=limits,
                namespace_spent=namespace_spent,
            )
        except Exception:
            metrics.RECONCILE_ERRORS.inc()
            raise
    metrics.observe_schedule(meta["namespace"], meta["name"], plan.phase)
    lost = stats is None or (
        limits is not None and limits.namespace_budget and namespace_spent is None
    )
    if behind or (history is not None and lost):
        plan.due_by(now + timedelta(seconds=memo.settings.reconcile_interval_seconds))
    return plan


def _namespace_spent(
    memo: Memo, namespace: str, limits: Limits | None, now: datetime
) -> Decimal | None:
    """What ``namespace`` spent this month in its budget's zone, when it has a budget and the
    database answers (None otherwise). Read afresh by every pass (one index range): a run that
    ended in another schedule of the namespace may have spent the rest of the budget."""
    cap = None if limits is None else limits.namespace_budget
    history = memo.history
    spent = None
    if cap is not None and history is not None:
        try:
            spent = history.namespace_month_cost(namespace, month_start(now, cap.time_zone))
        except HistoryError as exc:
            log.warning("cost of namespace %s unavailable: %s", namespace, exc)
    metrics.observe_namespace_budget(namespace, None if cap is None else cap.max_monthly_usd, spent)
    return spent


def _spread_hold(
    memo: Memo,
    namespace: str,
    peers: list[Peer],
    *,
    limits: Limits | None,
    spent: Decimal | None,
    now: datetime,
) -> None:
    """The first pass to find the namespace's monthly budget spent queues every schedule of
    the namespace, so that all of them hold now rather than at their next pass."""
    cap = None if limits is None else limits.namespace_budget
    if cap is None or spent is None:
        return
    mark = (namespace, month_start(now, cap.time_zone))
    if spent < cap.max_monthly_usd:
        memo.spent_namespaces.discard(mark)
        return
    if mark in memo.spent_namespaces:
        return
    # Marks of months past go (a namespace's zone cannot make a month start 40 days back).
    memo.spent_namespaces = {m for m in memo.spent_namespaces if m[1] > now - timedelta(days=40)}
    memo.spent_namespaces.add(mark)
    for peer in peers:
        memo.queue.add((namespace, peer.name))


def _stats_query(body: Mapping[str, Any], now: datetime) -> StatsQuery:
    """What a pass asks of the schedule's run statistics: failures counted since, and the
    start of this month in its zone."""
    return StatsQuery(
        str(body["metadata"]["uid"]),
        rec.failures_counted_since(body.get("status") or {}),
        _month_start(body, now),
    )


def read_stats_ahead(memo: Memo, schedules: list[dict[str, Any]]) -> None:
    """The run statistics of many schedules in one read (the first pass after a start reads
    every schedule's: two statements each were most of a restart's time at 1,000)."""
    history = memo.history
    if history is None or not schedules:
        return
    now = datetime.now(UTC)
    queries = [_stats_query(s, now) for s in schedules]
    try:
        memo.recorder.stats.fill(queries, history.run_stats)
    except HistoryError as exc:  # each pass reads its own then
        log.warning("run statistics not read ahead: %s", exc)


def not_run_yet(memo: Memo, body: Mapping[str, Any]) -> None:
    """``body`` was created while this process runs: it has no runs yet (its CronJob is for
    this process's first pass of it to make), so its statistics are known without a read (a
    third of the operator's work when 1,000 are created at once)."""
    history = memo.history
    if history is None:
        return
    query = _stats_query(body, datetime.now(UTC))
    memo.recorder.stats.fill(
        [query], lambda asked: {q.schedule_uid: RunStats.before_any_run(q) for q in asked}
    )


def _month_start(body: Mapping[str, Any], now: datetime) -> datetime | None:
    """This month's start in the schedule's zone (None for a zone validation will reject)."""
    try:
        return month_start(now, str((body.get("spec") or {}).get("timeZone", "UTC")))
    except ValueError:
        return None


def post_event(kube: Kube, obj: Mapping[str, Any], type_: str, reason: str, message: str) -> None:
    """Post an Event through the API (from handlers, the sweep and the delivery loop alike);
    a failure is logged, never raised: an Event is worth less than the reconcile around it."""
    try:
        kube.post_event(obj, type_, reason, message)
    except Exception as exc:  # any API or transport error
        meta = obj.get("metadata") or {}
        log.warning(
            "Event %s on %s/%s not posted: %s", reason, meta.get("namespace"), meta.get("name"), exc
        )
