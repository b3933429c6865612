"""What the operator reads instead of asking the apiserver: kopf's indexes, filled by its
watches, kept honest about the operator's own writes; and what changed in a schedule since
its last event.

The workers reconcile from the indexes (the operator reads nothing from the apiserver for a
pass: it compares in memory). An index lags behind a write of our own until its watch event
arrives, and a pass that read the older copy would write the same status or CronJob again.
``Unseen`` remembers the resourceVersion of each object we wrote until a watch event shows it;
while it is pending, the pass reads that one object from the apiserver instead."""

from __future__ import annotations

import hashlib
import json
import threading
from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import Enum
from typing import Any

ObjectKey = tuple[str, str, str]  # (kind, namespace, name)
# The kinds reconciles read from an index; writes of anything else are not remembered.
CACHED_KINDS = frozenset({"AgentSchedule", "CronJob"})


def version(obj: Mapping[str, Any] | None) -> str | None:
    """The object's resourceVersion (None for a missing object)."""
    if obj is None:
        return None
    return (obj.get("metadata") or {}).get("resourceVersion")


@dataclass
class Unseen:
    """Our writes a watch has not delivered yet, by (kind, namespace, name)."""

    _versions: dict[ObjectKey, str] = field(default_factory=dict)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def wrote(self, obj: Mapping[str, Any]) -> None:
        """The apiserver answered a write of ours with ``obj``."""
        meta = obj.get("metadata") or {}
        rv = meta.get("resourceVersion")
        if obj.get("kind") in CACHED_KINDS and meta.get("name") and rv:
            with self._lock:
                self._versions[(obj["kind"], meta.get("namespace", ""), meta["name"])] = rv

    def seen(self, kind: str, namespace: str, name: str, rv: str | None) -> bool:
        """A watch delivered the object at ``rv`` (None: deleted): a write of ours at that
        version is no longer pending. True when the event is that write's echo."""
        key = (kind, namespace, name)
        with self._lock:
            echo = rv is not None and self._versions.get(key) == rv
            if echo or rv is None:
                self._versions.pop(key, None)
        return echo

    def stale(self, kind: str, namespace: str, name: str, cached: Mapping[str, Any] | None) -> bool:
        """True while a write of ours is newer than the ``cached`` copy."""
        with self._lock:
            pending = self._versions.get((kind, namespace, name))
        return pending is not None and pending != version(cached)

    def settle(self, kind: str, namespace: str, name: str, fresh: Mapping[str, Any] | None) -> None:
        """The object was just read from the apiserver: what the index must show before its
        copy is fresh again is that version (or nothing, when it is gone)."""
        key = (kind, namespace, name)
        rv = version(fresh)
        with self._lock:
            if rv is None:
                self._versions.pop(key, None)
            else:
                self._versions[key] = rv

    def __len__(self) -> int:
        with self._lock:
            return len(self._versions)


class Packed:
    """An object as an index keeps it: compact JSON, read back whole when a pass needs it. As
    nested dicts a CronJob takes about 20 KB of the operator's memory, as JSON about 5 KB;
    reading it back takes tens of microseconds, once per pass."""

    __slots__ = ("_data", "uid")

    def __init__(self, obj: Mapping[str, Any]) -> None:
        self._data = json.dumps(obj, separators=(",", ":"), ensure_ascii=False).encode()
        self.uid = str((obj.get("metadata") or {}).get("uid", ""))  # readable without unpacking

    def unpack(self) -> dict[str, Any]:
        """A fresh copy of the object (the caller may change it)."""
        obj: dict[str, Any] = json.loads(self._data)
        return obj


class Change(Enum):
    """What an event of a schedule brought, as far as the reconcile cares."""

    CREATED = "created"  # first seen, never reconciled (no status.observedGeneration)
    UPDATED = "updated"  # a new generation: the spec changed
    TOUCHED = "touched"  # annotations or labels changed (run-now, pause, ...)
    RESUMED = "resumed"  # first seen by this process, unchanged since its last reconcile
    NONE = "none"  # only status changed (our own writes) or nothing at all


@dataclass
class Changes:
    """The generation and a digest of the annotations and labels of each schedule as last seen,
    by UID: status-only events (the operator's own writes) wake nobody, and a creation or a
    new generation is audited once per process (and once after a restart: the status tells)."""

    _seen: dict[str, tuple[int, str]] = field(default_factory=dict)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def of(self, body: Mapping[str, Any]) -> Change:
        meta = body.get("metadata") or {}
        uid = str(meta.get("uid", ""))
        generation = int(meta.get("generation") or 0)
        digest = _digest(meta)
        with self._lock:
            before = self._seen.get(uid)
            self._seen[uid] = (generation, digest)
        if before is None:
            observed = (body.get("status") or {}).get("observedGeneration")
            if observed is None:
                return Change.CREATED
            stale = not isinstance(observed, int) or observed < generation
            return Change.UPDATED if stale else Change.RESUMED
        if generation > before[0]:
            return Change.UPDATED
        return Change.TOUCHED if digest != before[1] else Change.NONE

    def forget(self, uid: str) -> None:
        with self._lock:
            self._seen.pop(uid, None)


def _digest(meta: Mapping[str, Any]) -> str:
    data = json.dumps(
        [meta.get("annotations") or {}, meta.get("labels") or {}], sort_keys=True, default=str
    )
    return hashlib.blake2b(data.encode(), digest_size=12).hexdigest()
