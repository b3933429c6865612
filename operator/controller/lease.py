"""Leader election over a coordination.k8s.io/v1 Lease: of the operator's replicas one
reconciles and sweeps, the others serve the run API, the agentruns API and the admission
webhook and keep kopf's indexes warm (issue 15).

The algorithm is client-go's: the holder renews the Lease every ``retry`` seconds; a candidate
takes it over when its record (holder and renewTime) has not changed for ``lease_duration``
seconds as measured on the candidate's own monotonic clock (no comparison of two machines'
clocks); the holder that cannot renew for ``renew_deadline`` seconds (< ``lease_duration``)
stops leading by then, so two replicas never lead at once. ``leading()`` answers from the
last successful renewal, not from the thread's latest verdict: a renewal stuck in a hung request
ends leadership at the deadline all the same. A replica that stops gracefully releases the
Lease (empty holder), and a standby takes it within ``retry`` seconds.

Without a namespace (``run_api_tls_namespace`` empty: a process outside the cluster, a test)
there is no Lease: the process leads alone.
"""

from __future__ import annotations

import logging
import math
import random
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Protocol

from nocturne_operator.adapters import metrics

__all__ = ["LeaderElector", "LeaseStore", "LeaseTiming"]

log = logging.getLogger(__name__)

_MICRO_TIME = "%Y-%m-%dT%H:%M:%S.%fZ"  # metav1.MicroTime
_FAILURE_LOG_INTERVAL = 60.0


class LeaseStore(Protocol):
    """The part of ``adapters.kube.Kube`` the elector needs (each call bounded by ``timeout``)."""

    def get_lease(self, namespace: str, name: str, timeout: float) -> dict[str, Any] | None: ...

    def write_lease(self, lease: dict[str, Any], timeout: float) -> dict[str, Any] | None: ...


@dataclass(frozen=True)
class LeaseTiming:
    """Seconds: a Lease not renewed for ``duration`` may be taken; its holder stops leading
    ``renew_deadline`` after its last renewal; everyone tries every ``retry``."""

    duration: float = 15.0
    renew_deadline: float = 10.0
    retry: float = 2.0

    def __post_init__(self) -> None:
        if not 0 < self.retry < self.renew_deadline < self.duration:
            raise ValueError(
                f"lease timing: need 0 < retry ({self.retry}) < renew deadline "
                f"({self.renew_deadline}) < lease duration ({self.duration})"
            )


def _now_text() -> str:
    return datetime.now(UTC).strftime(_MICRO_TIME)


class LeaderElector:
    """Campaign for the Lease ``namespace/name`` as ``identity`` on a thread of its own.
    ``on_started`` runs on that thread when this replica becomes the leader, ``on_stopped``
    when it stops being one (lost, not renewed in time, or released at ``stop``)."""

    def __init__(
        self,
        store: LeaseStore | None,
        namespace: str,
        name: str,
        identity: str,
        *,
        timing: LeaseTiming = LeaseTiming(),
        on_started: Callable[[], None] = lambda: None,
        on_stopped: Callable[[], None] = lambda: None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.store = store if namespace else None
        self.namespace, self.name, self.identity = namespace, name, identity
        self.timing = timing
        self.on_started, self.on_stopped = on_started, on_stopped
        self.clock = clock
        self._renewed_at: float | None = None  # monotonic time of the last renewal (leading)
        self._observed: tuple[str, str] | None = None  # (holder, renewTime) last read
        self._observed_at = 0.0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()
        self.became_leader_at: float | None = None

    # ---- what other threads ask ------------------------------------------------------------

    def leading(self) -> bool:
        """This replica may write now: it renewed the Lease less than ``renew_deadline`` ago."""
        with self._lock:
            renewed = self._renewed_at
        return renewed is not None and self.clock() - renewed < self.timing.renew_deadline

    def holder(self) -> str:
        """Who held the Lease at the last read (this replica's identity while it leads)."""
        if self.store is None:
            return self.identity
        return self._observed[0] if self._observed is not None else ""

    # ---- lifecycle ---------------------------------------------------------------------------

    def start(self) -> None:
        """Lead at once (no Lease), or campaign on a daemon thread."""
        if self.store is None:
            log.info("leader election: no namespace for a Lease; this process leads alone")
            self._mark_renewed()
            self._started()
            return
        self._thread = threading.Thread(target=self._run, name="leader-election", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 5.0) -> None:
        """Stop campaigning; a leader stops leading first, then releases the Lease so that a
        standby takes over within ``retry`` seconds instead of ``duration``."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None
        if self.store is None:
            self._step_down("stopping")

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                renewed = self._try_acquire_or_renew()
            except Exception as exc:  # the apiserver away: the renew deadline decides
                renewed = False
                self._failed(exc)
            else:
                self._failures = 0
            if renewed:
                self._mark_renewed()
                if not self._led:
                    self._started()
            elif self._led:
                holder = self.holder()
                if holder and holder != self.identity:
                    self._step_down(f"Lease taken by {holder}")
                elif not self.leading():
                    self._step_down(f"Lease not renewed for {self.timing.renew_deadline:g} s")
            # A standby's tries are spread a little (client-go's jitter).
            jitter = 0.0 if self._led else random.random() * 0.2  # noqa: S311 - not a secret
            self._stop.wait(self.timing.retry * (1.0 + jitter))
        if self._led:
            self._step_down("stopping")
            self._release()

    # ---- the Lease ---------------------------------------------------------------------------

    def _try_acquire_or_renew(self) -> bool:
        store, timeout = self.store, self.timing.retry
        assert store is not None  # noqa: S101 - only the thread calls this
        lease = store.get_lease(self.namespace, self.name, timeout)
        now_text = _now_text()
        seconds = math.ceil(self.timing.duration)
        if lease is None:
            fresh = {
                "apiVersion": "coordination.k8s.io/v1",
                "kind": "Lease",
                "metadata": {"name": self.name, "namespace": self.namespace},
                "spec": {
                    "holderIdentity": self.identity,
                    "leaseDurationSeconds": seconds,
                    "acquireTime": now_text,
                    "renewTime": now_text,
                    "leaseTransitions": 0,
                },
            }
            created = store.write_lease(fresh, timeout)
            if created is not None:
                self._observe(self.identity, now_text)
            return created is not None
        spec: dict[str, Any] = dict(lease.get("spec") or {})
        holder = str(spec.get("holderIdentity") or "")
        self._observe(holder, str(spec.get("renewTime") or ""))
        duration = float(spec.get("leaseDurationSeconds") or self.timing.duration)
        if holder and holder != self.identity and self.clock() - self._observed_at < duration:
            return False  # held, and renewed within its duration as far as we can tell
        if holder != self.identity:
            spec["acquireTime"] = now_text
            spec["leaseTransitions"] = int(spec.get("leaseTransitions") or 0) + (1 if holder else 0)
        spec.update(holderIdentity=self.identity, leaseDurationSeconds=seconds, renewTime=now_text)
        written = store.write_lease({**lease, "spec": spec}, timeout)  # resourceVersion kept
        if written is None:
            return False  # another replica wrote it first: read again next time
        if holder != self.identity:
            log.info(
                "leader election: took Lease %s/%s%s",
                self.namespace,
                self.name,
                f" from {holder} (not renewed for {duration:.0f} s)" if holder else "",
            )
        self._observe(self.identity, now_text)
        return True

    def _release(self) -> None:
        """Give the Lease up (only if still ours): the standby need not wait it out."""
        store = self.store
        if store is None:
            return
        try:
            lease = store.get_lease(self.namespace, self.name, self.timing.retry)
            spec = dict((lease or {}).get("spec") or {})
            if lease is None or spec.get("holderIdentity") != self.identity:
                return
            spec.update(holderIdentity="", leaseDurationSeconds=1, renewTime=_now_text())
            if store.write_lease({**lease, "spec": spec}, self.timing.retry) is not None:
                log.info("leader election: released Lease %s/%s", self.namespace, self.name)
        except Exception as exc:  # the standby waits the Lease out instead
            log.warning("leader election: releasing Lease %s/%s failed: %s", *self._where(), exc)

    _failures = 0
    _failure_logged = float("-inf")

    def _failed(self, exc: Exception) -> None:
        """One line for the first failed try and then one a minute while they go on (an
        apiserver outage would log one every retry period)."""
        self._failures += 1
        now = self.clock()
        if self._failures == 1 or now - self._failure_logged >= _FAILURE_LOG_INTERVAL:
            self._failure_logged = now
            log.warning(
                "leader election: Lease %s/%s: %s (%d failed tries in a row)",
                *self._where(),
                exc,
                self._failures,
            )

    def _where(self) -> tuple[str, str]:
        return self.namespace, self.name

    def _observe(self, holder: str, renew_time: str) -> None:
        record = (holder, renew_time)
        if record != self._observed:
            self._observed, self._observed_at = record, self.clock()

    # ---- transitions -------------------------------------------------------------------------

    _led = False  # on_started ran and on_stopped not yet

    def _mark_renewed(self) -> None:
        with self._lock:
            self._renewed_at = self.clock()

    def _started(self) -> None:
        self._led = True
        self.became_leader_at = self.clock()
        metrics.LEADER.set(1)
        log.info("leader election: %s leads (Lease %s/%s)", self.identity, *self._where())
        try:
            self.on_started()
        except Exception:
            log.exception("leader election: taking over failed")

    def _step_down(self, why: str) -> None:
        with self._lock:
            self._renewed_at = None
        if not self._led:
            return
        self._led = False
        metrics.LEADER.set(0)
        log.warning("leader election: %s stops leading: %s", self.identity, why)
        try:
            self.on_stopped()
        except Exception:
            log.exception("leader election: stepping down failed")
