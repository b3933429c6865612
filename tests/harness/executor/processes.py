"""A container's processes on the host: starting its sandbox and finding the process that
SIGTERM is meant for."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

from harness.executor.pod import PodStartError
from harness.executor.reasons import REASON_START
from harness.executor.runs import LaunchPlan


def spawn(plan: LaunchPlan, log_path: Path, *, append: bool) -> subprocess.Popen[bytes]:
    """Start the sandbox in its own session, stdout+stderr to the container log (appended to
    on a restart, so the file keeps every run's output)."""
    with log_path.open("ab" if append else "wb") as log_file:
        try:
            return subprocess.Popen(
                plan.command,
                stdin=subprocess.DEVNULL,
                stdout=log_file,
                stderr=subprocess.STDOUT,
                env=plan.env,
                start_new_session=True,
                close_fds=True,
            )
        except OSError as exc:
            raise PodStartError(REASON_START, f"cannot start bwrap: {exc}") from exc


def _pgrp_members(pgid: int) -> dict[int, int]:
    """pid -> ppid of every process in process group ``pgid``."""
    members: dict[int, int] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat_line = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        fields = stat_line.rsplit(")", 1)[1].split()
        if int(fields[2]) == pgid:
            members[int(entry)] = int(fields[1])
    return members


def main_process(bwrap_pid: int) -> int | None:
    """The container's main process: the child of bwrap's PID-1 reaper (bwrap -> reaper -> it).

    SIGTERM goes to it alone, like the kubelet signals a container's PID 1: signalling bwrap
    would make it die and SIGKILL the sandbox at once, and the reaper ignores SIGTERM.
    """
    members = _pgrp_members(bwrap_pid)
    reapers = [pid for pid, ppid in members.items() if ppid == bwrap_pid]
    for reaper in reapers:
        for pid, ppid in members.items():
            if ppid == reaper:
                return pid
    return None
