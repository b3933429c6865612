"""Restarts in place (restartPolicy Always/OnFailure): the kubelet's CrashLoopBackOff schedule and
the history of a container's earlier runs."""

from __future__ import annotations

from dataclasses import dataclass

from harness.executor.termination import Termination

CRASHLOOP_BASE_SECONDS = 10
CRASHLOOP_MAX_SECONDS = 300
CRASHLOOP_RESET_SECONDS = 600


@dataclass(frozen=True)
class History:
    """Earlier runs of a restarted container (restartPolicy Always/OnFailure)."""

    restart_count: int = 0
    last: Termination | None = None


FIRST_RUN = History()  # a container that has not been restarted (yet)


def restart_delay(policy: str, exit_code: int, restarts_so_far: int) -> float | None:
    """Seconds until the kubelet would restart an exited container, None if it stays down.

    The first restart is immediate, then 10 s doubling up to 5 min (CrashLoopBackOff).
    """
    if policy == "Always" or (policy == "OnFailure" and exit_code != 0):
        if restarts_so_far == 0:
            return 0.0
        return float(
            min(CRASHLOOP_MAX_SECONDS, CRASHLOOP_BASE_SECONDS * 2 ** (restarts_so_far - 1))
        )
    return None
