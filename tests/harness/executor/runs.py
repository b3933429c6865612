"""The executor's record of one claimed pod (``PodRun``) and its prepared container start."""

from __future__ import annotations

import dataclasses
import subprocess
import threading
from dataclasses import dataclass, field
from pathlib import Path

from harness.executor.pod import PodKey
from harness.executor.podspec import DEFAULT_GRACE_SECONDS
from harness.executor.restarts import History
from harness.executor.status import ContainerInfo
from harness.executor.termination import Termination


def pod_files_dir(state_dir: Path, namespace: str, name: str) -> Path:
    """Where the executor keeps a pod's files (container logs, its uid, per-incarnation
    volumes and termination-log) below its state directory."""
    return state_dir / "pods" / namespace / name


@dataclass
class PodRun:
    """One claimed pod. Fields are guarded by ``Executor._lock``; ``status_lock`` orders this
    pod's status writes (claimed -> running -> backoff/running ... -> terminated).

    States: starting (``busy``, no process) -> running (``proc`` alive) -> backoff
    (``restart_at`` set) -> restarting (``busy``) -> running ... -> forgotten.
    """

    key: PodKey
    pod_dir: Path
    info: ContainerInfo | None = None
    log_path: Path | None = None
    term_path: Path | None = None
    message_policy: str = "File"
    restart_policy: str = "Never"
    plan: LaunchPlan | None = None
    proc: subprocess.Popen[bytes] | None = None
    pidfd: int | None = None
    started_at: str = ""
    started_mono: float = 0.0
    instance: int = 0  # bumped on every (re)start; stale backoff writes are skipped
    busy: bool = True  # a start/restart task is in flight
    history: History = field(default_factory=History)
    pending: Termination | None = None  # the last exit, until the restart happens
    backoff_level: int = 0
    restart_at: float | None = None  # monotonic
    deadline: float | None = None  # monotonic; pod activeDeadlineSeconds
    kill_at: float | None = None  # monotonic; SIGKILL once terminating
    termination_grace: int = DEFAULT_GRACE_SECONDS
    stopping: bool = False
    stop_reason: str = ""
    stop_message: str = ""
    force_failed: bool = False
    gone: bool = False
    status_lock: threading.Lock = field(default_factory=threading.Lock)

    @property
    def private_dir(self) -> Path:
        """Volumes and termination-log of this incarnation (removed when it finishes)."""
        return self.pod_dir / f"uid-{self.key.uid}"

    def info_or_fail(self) -> ContainerInfo:
        """The container facts; set before any status write."""
        if self.info is None:
            raise RuntimeError(f"{self.key}: container info missing")
        return self.info

    def alive(self) -> bool:
        """A container process exists and has not been reaped."""
        return self.proc is not None and self.proc.returncode is None

    def final(self, term: Termination) -> Termination:
        """``term`` with the pod-level reason of why the pod is being stopped, if any."""
        return dataclasses.replace(
            term,
            pod_reason=self.stop_reason or term.pod_reason,
            pod_message=self.stop_message or term.pod_message,
            force_failed=self.force_failed or term.force_failed,
        )


@dataclass(frozen=True)
class LaunchPlan:
    """A fully prepared container start: the bwrap argv and the process environment."""

    command: list[str]
    env: dict[str, str]
    uid: int
    argv0: str
