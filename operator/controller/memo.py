"""What every handler and loop of one operator process shares: the typed memo and kopf's
indexes."""

from __future__ import annotations

import asyncio
import logging
import ssl
from collections.abc import Collection, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, NamedTuple

import kopf
from aiohttp import web
from kopf._cogs.structs.references import NamespaceName, match_namespace

from nocturne_operator.adapters.kube import Kube
from nocturne_operator.controller.active import ActiveRuns
from nocturne_operator.controller.cache import Changes, Packed, Unseen
from nocturne_operator.controller.lease import LeaderElector
from nocturne_operator.controller.queue import Key, WorkQueue
from nocturne_operator.controller.relay import RunRelay
from nocturne_operator.controller.workers import Workers
from nocturne_operator.notifications.notify import Notifier
from nocturne_operator.prices import PriceTable
from nocturne_operator.render import RunApiEndpoint
from nocturne_operator.runs.recorder import Recorder
from nocturne_operator.runsapi.auth import FrontProxy
from nocturne_operator.runsapi.changes import RunChanges
from nocturne_operator.schedule.policy import Policy, limits_for
from nocturne_operator.schedule.validation import Limits, Peer
from nocturne_operator.settings import Settings
from nocturne_operator.storage import History

log = logging.getLogger(__name__)

# Objects are kept packed (``cache.Packed``); the methods of ``Indexes`` unpack them.
ScheduleBodies = kopf.Index[tuple[str, str], Packed]
SchedulePeers = kopf.Index[str, Peer]
ScheduleCronJobs = kopf.Index[tuple[str, str], Packed]
FinishedJobs = kopf.Index[tuple[str, str], Packed]
UnrecordedPods = kopf.Index[tuple[str, str], Packed]
SchedulePolicies = kopf.Index[str, Policy]
NamespaceLabels = kopf.Index[str, Mapping[str, str]]


class Indexes(NamedTuple):
    """kopf's live indexes, typed. kopf passes each to every handler as the keyword argument
    named after its index function; handlers take them through ``**kwargs`` (kopf's handler
    protocols admit no extra required parameters) and read them here, once."""

    bodies: ScheduleBodies  # schedule_bodies
    peers: SchedulePeers  # schedules_by_namespace
    cronjobs: ScheduleCronJobs  # schedule_cronjobs
    jobs: FinishedJobs  # finished_jobs
    pods: UnrecordedPods  # unrecorded_pods
    policies: SchedulePolicies  # schedule_policies
    namespaces: NamespaceLabels  # namespace_labels

    @classmethod
    def of(cls, kwargs: Mapping[str, Any]) -> Indexes:
        """The indexes among a handler's keyword arguments."""
        return cls(
            kwargs["schedule_bodies"],
            kwargs["schedules_by_namespace"],
            kwargs["schedule_cronjobs"],
            kwargs["finished_jobs"],
            kwargs["unrecorded_pods"],
            kwargs["schedule_policies"],
            kwargs["namespace_labels"],
        )

    def all_policies(self) -> list[Policy]:
        """Every AgentSchedulePolicy as last watched, by name."""
        return sorted(
            (p for store in list(self.policies.values()) for p in store), key=lambda p: p.name
        )

    def limits(self, settings: Settings, namespace: str, kube: Kube | None = None) -> Limits:
        """The limits of ``namespace``'s schedules: the cluster's settings as the policies
        selecting it (by its labels as last watched) make them. A namespace the watch has not
        shown yet has its labels read through ``kube`` (when given): deciding by no labels
        would let a ``NotIn`` or ``DoesNotExist`` selector relax its limits."""
        labels = self.labels(namespace)
        found = self.all_policies()
        if labels is None and found and kube is not None:
            try:
                namespace_object = kube.get("Namespace", "", namespace)
            except Exception as exc:  # the apiserver away: decide by what is known
                log.warning("labels of namespace %s not read: %s", namespace, exc)
            else:
                if namespace_object is not None:
                    labels = dict((namespace_object.get("metadata") or {}).get("labels") or {})
        return limits_for(settings, found, labels)

    def labels(self, namespace: str) -> Mapping[str, str] | None:
        """The namespace's labels as last watched (None: not seen)."""
        return next(iter(self.namespaces.get(namespace, ())), None)

    def owner(self, namespace: str, name: str) -> dict[str, Any] | None:
        """The AgentSchedule from kopf's index (None when it is gone or not seen yet)."""
        return _first(self.bodies, (namespace, name))

    def cronjob(self, namespace: str, schedule: str) -> dict[str, Any] | None:
        """The schedule's CronJob as last watched (None when there is none)."""
        return _first(self.cronjobs, (namespace, schedule))

    def finished_job_uids(self, namespace: str, schedule: str) -> set[str]:
        """The UIDs of the schedule's finished Jobs as last watched."""
        return {packed.uid for packed in self.jobs.get((namespace, schedule), ())}

    def finished_jobs(
        self, namespace: str, schedule: str, *, done: Collection[str] = ()
    ) -> list[dict[str, Any]]:
        """The schedule's finished Jobs as last watched, but those whose UID is in ``done``
        (left packed: every pass asks, and recorded Jobs stay until their TTL)."""
        jobs: Collection[Packed] = self.jobs.get((namespace, schedule), ())
        return [packed.unpack() for packed in jobs if packed.uid not in done]

    def unrecorded_pods(self) -> list[tuple[tuple[str, str], list[dict[str, Any]]]]:
        """(namespace, schedule) -> its finished runner pods still held by our finalizer."""
        return [(key, [p.unpack() for p in packed]) for key, packed in list(self.pods.items())]


def _first(
    index: kopf.Index[tuple[str, str], Packed], key: tuple[str, str]
) -> dict[str, Any] | None:
    packed = next(iter(index.get(key, [])), None)
    return None if packed is None else packed.unpack()


@dataclass(eq=False)
class Memo:
    """What every handler and loop of one operator process shares. kopf hands each object's
    handlers a shallow copy of the memo; this one's copy is itself, so what one handler sets
    (the indexes, the recorder's ledger) every loop sees. ``settings`` are loaded before kopf
    starts (``__main__``: bad settings end the process at once); fields without a default are
    set by the startup handlers before any other handler runs."""

    settings: Settings
    kube: Kube = field(init=False)
    prices: PriceTable = field(init=False)
    run_api: RunApiEndpoint = field(init=False)
    recorder: Recorder = field(init=False)
    history: History | None = None
    notifier: Notifier | None = None
    started_at: datetime = field(default_factory=lambda: datetime.now(UTC))
    # Schedules waiting for a pass, the workers that make them, and what they read instead
    # of the apiserver (see ``controller.cache``).
    queue: WorkQueue = field(default_factory=WorkQueue)
    workers: Workers | None = None
    unseen: Unseen = field(default_factory=Unseen)
    changes: Changes = field(default_factory=Changes)
    # The runs in flight as the run API hears of them (status.activeRun).
    active: ActiveRuns = field(init=False)
    # kopf's live indexes, handed over by the first handler call (the workers and the sweep
    # read them), and the schedules they listed then: any other was created while this
    # process runs.
    indexes: Indexes | None = None
    listed_at_start: frozenset[Key] = frozenset()
    run_api_server: web.AppRunner | None = None
    run_api_renewal: asyncio.Task[None] | None = None
    # The TLS contexts serving the operator's certificate (the run API's, the agentruns
    # API's): a renewed certificate is loaded into each.
    serving_contexts: list[ssl.SSLContext] = field(default_factory=list)
    # The admission webhook's server and the certificate file it reads (None: no webhook).
    webhook: tuple[kopf.WebhookServer, Path] | None = None
    # The agentruns API (issue 17): its server, its request-header settings (None until read
    # from the apiserver) and the tasks that keep them and its watches' wake-ups.
    runs_api_server: web.AppRunner | None = None
    front_proxy: FrontProxy | None = None
    runs_api_tasks: list[asyncio.Task[None]] = field(default_factory=list)
    run_changes: RunChanges | None = None
    # Namespaces whose monthly budget was found spent (with the month): their schedules were
    # all queued then, so that each holds (see schedules.hold_namespace).
    spent_namespaces: set[tuple[str, datetime]] = field(default_factory=set)
    # Each AgentSchedulePolicy as its last event (and this replica's status writes) left it:
    # a namespace's event brings their status in line without reading them again.
    policy_bodies: dict[str, dict[str, Any]] = field(default_factory=dict)
    # kopf's namespace patterns this process serves (none: every namespace).
    watch_patterns: tuple[str, ...] = ()
    sweeper: asyncio.Task[None] | None = None
    deliveries: asyncio.Task[None] | None = None
    # Replicas (issue 15): the Lease this replica campaigns for (None: it leads alone), the
    # relay that shares its run API's reports with the others (None: no database), and
    # whether it is shutting down (readiness answers 503 while the Service drains).
    elector: LeaderElector | None = None
    relay: RunRelay | None = None
    draining: bool = False

    def __post_init__(self) -> None:
        queue = self.queue

        def soon(key: Key, within: float) -> None:
            if within <= 0:
                queue.add(key)
            else:
                queue.add_within(key, within)

        self.active = ActiveRuns(queue=soon)

    def serves(self, namespace: str) -> bool:
        """This process serves ``namespace`` (its watch patterns)."""
        patterns = self.watch_patterns
        return not patterns or any(match_namespace(NamespaceName(namespace), p) for p in patterns)

    def leading(self) -> bool:
        """This replica reconciles and sweeps now (it holds the Lease, or leads alone)."""
        return self.elector is None or self.elector.leading()

    def in_first_pass(self, key: Key) -> bool:
        """``key`` was listed at the start and the first pass, which queued it then, is still
        running: an event of the initial listing need not queue it again."""
        workers = self.workers
        return key in self.listed_at_start and workers is not None and workers.first_pass.running()

    def __copy__(self) -> Memo:
        return self
