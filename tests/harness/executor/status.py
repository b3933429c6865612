"""Kubelet-style pod status documents: claimed (Pending), running, back-off and terminated.

Pure functions of the current pod object; the caller PATCHes the result (``status_writes.py``).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from harness.executor.pod import JSON, PodKey, get_items, get_map, get_text
from harness.executor.restarts import FIRST_RUN, History
from harness.executor.termination import Termination

# (type, status, reason, message) of one pod condition to upsert.
ConditionUpdate = tuple[str, bool, str | None, str | None]


def merge_conditions(
    existing: Sequence[Mapping[str, Any]],
    updates: Sequence[ConditionUpdate],
    now: str,
) -> list[JSON]:
    """``existing`` with (type, status, reason, message) upserted; ``lastTransitionTime`` only
    changes when the status flips. Conditions of other writers are kept."""
    result = [dict(c) for c in existing]
    for ctype, status, reason, message in updates:
        value = "True" if status else "False"
        found = next((c for c in result if c.get("type") == ctype), None)
        cond: JSON = {"type": ctype, "status": value, "lastProbeTime": None}
        cond["lastTransitionTime"] = (
            found["lastTransitionTime"]
            if found is not None
            and found.get("status") == value
            and found.get("lastTransitionTime")
            else now
        )
        if reason:
            cond["reason"] = reason
        if message:
            cond["message"] = message
        if found is None:
            result.append(cond)
        else:
            result[result.index(found)] = cond
    return result


def _not_ready(container: str) -> list[ConditionUpdate]:
    """Scheduled and initialized, but the container is not (yet, or not again) ready."""
    reason, message = "ContainersNotReady", f"containers with unready status: [{container}]"
    return [
        ("PodScheduled", True, None, None),
        ("Initialized", True, None, None),
        ("ContainersReady", False, reason, message),
        ("Ready", False, reason, message),
    ]


@dataclass(frozen=True)
class ContainerInfo:
    """The container facts every status document repeats."""

    name: str
    image: str
    image_id: str


def _container_status(
    info: ContainerInfo,
    state: JSON,
    history: History,
    *,
    ready: bool,
    container_id: str = "",
    image_id: bool = True,
) -> JSON:
    entry: JSON = {
        "name": info.name,
        "image": info.image,
        "imageID": info.image_id if image_id else "",
        "ready": ready,
        "started": ready,
        "restartCount": history.restart_count,
        "state": state,
    }
    if container_id:
        entry["containerID"] = container_id
    if history.last is not None:
        entry["lastState"] = history.last.state()
    return entry


def _pod_status(
    pod: Mapping[str, Any],
    phase: str,
    *,
    start_time: str,
    conditions: Sequence[ConditionUpdate],
    now: str,
    container: JSON,
) -> JSON:
    """The fields every document sets; ``status.startTime`` once set is kept, else
    ``start_time``."""
    return {
        "phase": phase,
        "startTime": get_text(get_map(pod, "status"), "startTime") or start_time,
        "conditions": merge_conditions(
            get_items(get_map(pod, "status"), "conditions"), conditions, now
        ),
        "containerStatuses": [container],
    }


def claimed_status(pod: Mapping[str, Any], info: ContainerInfo, now: str) -> JSON:
    """Pending + ContainerCreating, as a kubelet reports a pod it accepted."""
    return _pod_status(
        pod,
        "Pending",
        start_time=now,
        conditions=_not_ready(info.name),
        now=now,
        container=_container_status(
            info,
            {"waiting": {"reason": "ContainerCreating"}},
            FIRST_RUN,
            ready=False,
            image_id=False,
        ),
    )


def running_status(
    pod: Mapping[str, Any],
    info: ContainerInfo,
    pid: int,
    started_at: str,
    now: str,
    *,
    history: History = FIRST_RUN,
) -> JSON:
    """Running, Ready: what the Job controller counts in ``status.ready``."""
    return _pod_status(
        pod,
        "Running",
        start_time=started_at,
        conditions=[
            ("PodReadyToStartContainers", True, None, None),
            ("PodScheduled", True, None, None),
            ("Initialized", True, None, None),
            ("ContainersReady", True, None, None),
            ("Ready", True, None, None),
        ],
        now=now,
        container=_container_status(
            info,
            {"running": {"startedAt": started_at}},
            history,
            ready=True,
            container_id=f"local://{pid}",
        ),
    )


def backoff_status(
    pod: Mapping[str, Any], info: ContainerInfo, delay: float, history: History, now: str
) -> JSON:
    """Running pod whose container waits in CrashLoopBackOff before its next restart."""
    key = PodKey.of(pod)
    waiting = {
        "reason": "CrashLoopBackOff",
        "message": f"back-off {delay:.0f}s restarting failed container={info.name} "
        f"pod={key.name}_{key.namespace}({key.uid})",
    }
    return _pod_status(
        pod,
        "Running",
        start_time=now,
        conditions=_not_ready(info.name),
        now=now,
        container=_container_status(info, {"waiting": waiting}, history, ready=False),
    )


def terminated_status(
    pod: Mapping[str, Any],
    info: ContainerInfo,
    term: Termination,
    history: History = FIRST_RUN,
) -> JSON:
    """Succeeded (exit 0) or Failed, container ``state.terminated``, Ready=False.

    ``podFailurePolicy.onExitCodes`` reads exactly ``state.terminated.exitCode``.
    """
    succeeded = term.exit_code == 0 and not term.force_failed
    completed = "PodCompleted"
    status = _pod_status(
        pod,
        "Succeeded" if succeeded else "Failed",
        start_time=term.started_at,
        conditions=[
            ("PodReadyToStartContainers", False, None, None),
            ("PodScheduled", True, None, None),
            ("Initialized", True, None, None),
            ("ContainersReady", False, completed, None),
            ("Ready", False, completed, None),
        ],
        now=term.finished_at,
        container=_container_status(
            info, term.state(), history, ready=False, container_id=term.container_id
        ),
    )
    if term.pod_reason:
        status["reason"] = term.pod_reason
    if term.pod_message:
        status["message"] = term.pod_message
    return status


def ran_locally(status: Mapping[str, Any]) -> bool:
    """Whether ``status`` was written by a local executor after a start: imageID is
    local://<table key> in every such status (a Running pod of an earlier executor)."""
    return any(
        str(c.get("imageID", "")).startswith("local://")
        for c in get_items(status, "containerStatuses")
    )
