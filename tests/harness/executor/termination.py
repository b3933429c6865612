"""How a container ended: exit codes, the termination message (file or log tail) and the
``Termination`` record that status documents report."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from harness.executor.pod import JSON, now_rfc3339

# pkg/kubelet/container/runtime.go
MAX_TERMINATION_MESSAGE_BYTES = 4096
FALLBACK_LOG_LINES = 80
FALLBACK_LOG_BYTES = 2048
START_FAILURE_EXIT_CODE = 128  # what runc reports for a container that never started


def read_termination_file(path: Path) -> bytes:
    """The first 4 KiB of the termination-message file (the kubelet's LimitReader)."""
    try:
        with path.open("rb") as fh:
            return fh.read(MAX_TERMINATION_MESSAGE_BYTES)
    except OSError:
        return b""


def read_log_tail(path: Path) -> bytes:
    """The last 80 lines of a container log, then its last 2 KiB (kubelet's circbuf)."""
    try:
        with path.open("rb") as fh:
            fh.seek(0, os.SEEK_END)
            size = fh.tell()
            fh.seek(max(0, size - 65536))
            data = fh.read()
    except OSError:
        return b""
    lines = data.splitlines(keepends=True)[-FALLBACK_LOG_LINES:]
    return b"".join(lines)[-FALLBACK_LOG_BYTES:]


def termination_message(file_content: bytes, log_tail: bytes, exit_code: int, policy: str) -> str:
    """``state.terminated.message``: the file (capped at 4 KiB); with FallbackToLogsOnError, a
    non-zero exit and an empty file, the log tail (last 80 lines, at most 2 KiB)."""
    content = file_content[:MAX_TERMINATION_MESSAGE_BYTES]
    if not content and policy == "FallbackToLogsOnError" and exit_code != 0:
        content = log_tail[-FALLBACK_LOG_BYTES:]
    return content.decode(errors="replace")


def exit_code_of(returncode: int) -> int:
    """Popen returncode -> container exit code (killed by signal N -> 128+N, as runc reports)."""
    return 128 - returncode if returncode < 0 else returncode


@dataclass(frozen=True)
class Termination:
    """How a container ended (or why it never started) and what the pod should say about it."""

    exit_code: int
    reason: str
    message: str
    started_at: str
    finished_at: str
    container_id: str = ""
    pod_reason: str = ""
    pod_message: str = ""
    force_failed: bool = False

    def state(self) -> JSON:
        """``state.terminated`` / ``lastState.terminated`` of the container status."""
        terminated: JSON = {
            "exitCode": self.exit_code,
            "reason": self.reason,
            "startedAt": self.started_at,
            "finishedAt": self.finished_at,
        }
        if self.message:
            terminated["message"] = self.message
        if self.container_id:
            terminated["containerID"] = self.container_id
        return {"terminated": terminated}


def exited_termination(
    exit_code: int,
    *,
    term_path: Path,
    log_path: Path,
    message_policy: str,
    started_at: str,
    pid: int,
) -> Termination:
    """A container process that exited (now): Completed or Error, with its termination message."""
    return Termination(
        exit_code=exit_code,
        reason="Completed" if exit_code == 0 else "Error",
        message=termination_message(
            read_termination_file(term_path),
            read_log_tail(log_path),
            exit_code,
            message_policy,
        ),
        started_at=started_at,
        finished_at=now_rfc3339(),
        container_id=f"local://{pid}",
    )


def rejected_termination(reason: str, message: str, now: str) -> Termination:
    """A container that never started: exit code 128 like runc's StartError; the pod says why."""
    return Termination(
        exit_code=START_FAILURE_EXIT_CODE,
        reason=reason,
        message=message,
        started_at=now,
        finished_at=now,
        pod_reason=reason,
        pod_message=message,
        force_failed=True,
    )


def lost_termination(now: str, pod_reason: str = "", pod_message: str = "") -> Termination:
    """A container that is not (or no longer) there when its pod terminates: reported like the
    kubelet's ContainerStatusUnknown (exit code 137), the pod Failed."""
    return Termination(
        137,
        "ContainerStatusUnknown",
        "The container could not be located when the pod was terminated",
        now,
        now,
        pod_reason=pod_reason,
        pod_message=pod_message,
        force_failed=True,
    )
