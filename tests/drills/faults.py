"""The faults a drill injects, each a real one: SIGKILL of the operator (then a new one on the same
run API port), a kube-apiserver restart, PostgreSQL stopped for a while, SIGKILL of a runner
container's main process. ``FaultLog`` counts what was injected and when."""

from __future__ import annotations

import json
import os
import random
import signal
import threading
import time
from collections import Counter
from collections.abc import Callable
from contextlib import AbstractContextManager, ExitStack
from dataclasses import dataclass, field
from pathlib import Path

from e2e.conftest import OperatorProcess
from harness.controlplane import ControlPlane
from harness.kube import Kubectl
from harness.node import Node

OPERATOR_KILL = "operator SIGKILL (restarted at once)"
APISERVER_RESTART = "kube-apiserver restart"
POSTGRES_OUTAGE = "PostgreSQL stopped"
RUNNER_KILL = "runner pod SIGKILL"
FAULT_KINDS = (OPERATOR_KILL, APISERVER_RESTART, POSTGRES_OUTAGE, RUNNER_KILL)


@dataclass
class FaultLog:
    """What the driver injected: a count per kind and a line per fault, seconds from the start."""

    started: float = field(default_factory=time.monotonic)
    counts: Counter[str] = field(default_factory=Counter)
    lines: list[str] = field(default_factory=list)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def injected(self, kind: str, began: float, detail: str) -> None:
        """Count a fault of ``kind`` that began at ``began`` (``time.monotonic()``)."""
        with self._lock:
            self.counts[kind] += 1
            self.lines.append(f"{began - self.started:6.1f} s  {kind}: {detail}")


class Operators:
    """The drill's operator, one process at a time: ``kill()`` SIGKILLs it and starts the next
    (``start(n)`` makes incarnation ``n``, logging to its own file). An exit nobody asked for is
    kept in ``unexpected_exits``."""

    def __init__(self, start: Callable[[int], AbstractContextManager[OperatorProcess]]) -> None:
        self._start = start
        self._stack = ExitStack()
        self.incarnations: list[OperatorProcess] = []
        self.unexpected_exits: list[str] = []

    @property
    def current(self) -> OperatorProcess:
        return self.incarnations[-1]

    @property
    def logs(self) -> list[Path]:
        return [o.log for o in self.incarnations]

    def up(self) -> OperatorProcess:
        """Start the next incarnation; returns once its health endpoint answers."""
        running = self._stack.enter_context(self._start(len(self.incarnations)))
        self.incarnations.append(running)
        return running

    def kill(self) -> int:
        """SIGKILL the current operator's process group and start the next; the killed pid."""
        proc = self.current.process
        if proc.poll() is not None:
            self.unexpected_exits.append(f"{self.current.log.name}: exited {proc.returncode}")
        else:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(30)
        self._stack.close()  # its stop() is a no-op now
        self._stack = ExitStack()
        self.up()
        return proc.pid

    def close(self) -> None:
        """Stop the current operator gracefully (SIGTERM), noting an earlier exit of its own."""
        if self.incarnations and self.current.process.poll() is not None:
            code = self.current.process.returncode
            self.unexpected_exits.append(f"{self.current.log.name}: exited {code}")
        self._stack.close()


def restart_apiserver(control_plane: ControlPlane) -> float:
    """Restart the kube-apiserver; how long it was unavailable (s)."""
    began = time.monotonic()
    control_plane.restart_apiserver()
    return time.monotonic() - began


def running_runner_pids(kubectl: Kubectl, namespace: str, node: Node) -> dict[str, int]:
    """Pod name -> host pid of the main process of every runner pod whose container runs now
    (empty when the apiserver does not answer)."""
    out = kubectl("get", "pods", "-n", namespace, "-o", "json", check=False)
    if not out:
        return {}
    found: dict[str, int] = {}
    for pod in json.loads(out)["items"]:
        for status in (pod.get("status") or {}).get("containerStatuses") or []:
            container_id = str(status.get("containerID") or "")
            pid = node.container_pid(container_id) if container_id else None
            if "running" in (status.get("state") or {}) and pid is not None:
                found[pod["metadata"]["name"]] = pid
    return found


def kill_runner(
    kubectl: Kubectl, namespace: str, node: Node, rng: random.Random, spared: set[str]
) -> str | None:
    """SIGKILL the main process of one running runner container (chosen by ``rng``, not one of
    ``spared``), as the kernel's OOM killer would; the pod's name, or None when none ran."""
    pods = running_runner_pids(kubectl, namespace, node)
    candidates = sorted(set(pods) - spared)
    for name in rng.sample(candidates, len(candidates)):
        try:
            os.kill(pods[name], signal.SIGKILL)
        except ProcessLookupError:
            continue  # it ended in the meantime: try another
        return name
    return None
