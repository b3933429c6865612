"""The kubelet's loop: watch unbound pods, decide which to claim, kill or mark Failed, and
start and stop the whole executor."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

from harness.executor.api import KubeApi
from harness.executor.downward import HostCapacity
from harness.executor.env import service_env
from harness.executor.images import ImageTable
from harness.executor.launch import Node
from harness.executor.pod import (
    JSON,
    PodKey,
    get_items,
    get_map,
    get_text,
    now_rfc3339,
)
from harness.executor.podspec import MIN_GRACE_SECONDS, grace_seconds
from harness.executor.reasons import REASON_STOPPED
from harness.executor.runs import PodRun, pod_files_dir
from harness.executor.runtime import Runtime
from harness.executor.status import ContainerInfo, ran_locally
from harness.executor.termination import lost_termination
from harness.executor.watch import PodWatch

log = logging.getLogger("nocturne.executor")
# harness.node's taint: pods that tolerate it are the real node's (the scheduler binds them).
REAL_NODE_TAINT = "nocturne.test/real-node"


def _for_the_real_node(spec: JSON) -> bool:
    return any(get_text(t, "key") == REAL_NODE_TAINT for t in get_items(spec, "tolerations"))


class Executor(Runtime):
    """Claims pods, runs them, reports status. Threads: one watcher, one supervisor (process
    exits and timers) and a bounded pool for API work."""

    def __init__(
        self,
        api: KubeApi,
        state_dir: Path,
        images: ImageTable,
        *,
        workers: int = 8,
        bwrap: str = "bwrap",
        setpriv: str = "setpriv",
    ) -> None:
        node = Node(
            api,
            state_dir,
            images,
            bwrap,
            setpriv,
            service_env(api.server),
            HostCapacity.detect(state_dir),
        )
        super().__init__(node, workers=workers)
        self._watch = PodWatch(api, self._stopping, self.observe, self._resync)
        self.synced = self._watch.synced

    # ------------------------------------------------------------------ lifecycle

    def start(self) -> None:
        """Start the supervisor and the watcher threads."""
        self._supervisor.start()
        self._watch.start()

    def shutdown(self) -> None:
        """Stop claiming, kill every container (<= 5 s grace), write their final status."""
        log.info("shutdown: stopping the watch and %d running pod(s)", len(self._runs))
        self._stopping.set()
        self._watch.stop(timeout=30)
        self._stop_runs()
        log.info("shutdown complete")

    # ------------------------------------------------------------------ decisions

    def _resync(self, items: Sequence[JSON]) -> None:
        seen = set()
        for pod in items:
            seen.add(get_text(get_map(pod, "metadata"), "uid"))
            try:
                self.observe("ADDED", pod)
            except Exception:
                log.exception("resync: unexpected error")
        with self._lock:
            vanished = [r for uid, r in self._runs.items() if uid not in seen]
            self._done &= seen
        for run in vanished:
            self._kill_gone(run, "pod vanished while the executor was not watching; killing")

    def observe(self, kind: str, pod: JSON) -> None:
        """React to one pod event; must not block (API work goes to the pool)."""
        key = PodKey.of(pod)
        meta = get_map(pod, "metadata")
        spec = get_map(pod, "spec")
        status = get_map(pod, "status")
        with self._lock:
            run = self._runs.get(key.uid)
            if kind == "DELETED":
                self._done.discard(key.uid)
        if kind == "DELETED":
            if run is not None:
                self._kill_gone(run, "pod deleted; killing its container")
            return
        if run is not None:
            if meta.get("deletionTimestamp"):
                self._terminate(run, grace_seconds(pod), "", "")
            return
        if self._stopping.is_set() or get_text(spec, "nodeName") or _for_the_real_node(spec):
            return
        with self._lock:
            if key.uid in self._done:
                return
        phase = get_text(status, "phase")
        if phase == "Pending" and not meta.get("deletionTimestamp"):
            self._claim(key, pod)
        elif phase == "Running" and ran_locally(status):
            self._orphaned(key, pod)

    def _kill_gone(self, run: PodRun, message: str) -> None:
        """The pod object is gone: kill its container at once, no status to write."""
        log.info("%s: %s", run.key, message)
        run.gone = True
        self._terminate(run, MIN_GRACE_SECONDS, "", "")

    def _pod_dir(self, key: PodKey) -> Path:
        return pod_files_dir(self.node.state_dir, key.namespace, key.name)

    def _claim(self, key: PodKey, pod: JSON) -> None:
        run = PodRun(key, self._pod_dir(key))
        with self._lock:
            if key.uid in self._runs or key.uid in self._done:
                return
            self._runs[key.uid] = run
        log.info("%s: claimed (uid %s)", key, key.uid)
        self._pool.submit(self._start, run, pod)

    def _orphaned(self, key: PodKey, pod: JSON) -> None:
        with self._lock:
            self._done.add(key.uid)
        log.info("%s: Running with a local container from an earlier executor; marking Failed", key)
        run = PodRun(key, self._pod_dir(key))
        containers = get_items(get_map(pod, "spec"), "containers")
        name = get_text(containers[0], "name") if containers else "main"
        image = get_text(containers[0], "image") if containers else ""
        run.info = ContainerInfo(name, image, "")
        term = lost_termination(
            now_rfc3339(),
            REASON_STOPPED,
            "the local pod executor that ran this container stopped; the process is gone",
        )
        self._pool.submit(self._write_terminated, run, term)
