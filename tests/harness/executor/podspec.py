"""What the executor takes from a pod's spec besides its container: whether it can run the pod
at all, the hostname and the termination grace periods."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from harness.executor.pod import get_int, get_items, get_map, get_text

DEFAULT_GRACE_SECONDS = 30
MIN_GRACE_SECONDS = 2  # the kubelet's minimumGracePeriodInSeconds


def pod_hostname(pod: Mapping[str, Any]) -> str:
    """``spec.hostname`` or the pod name, cut to 63 characters like the kubelet does (a longer
    name cannot be a hostname; Job pods of long CronJob names get there)."""
    name = get_text(get_map(pod, "spec"), "hostname") or get_text(get_map(pod, "metadata"), "name")
    return name[:63].rstrip("-.") if len(name) > 63 else name


def _declared_grace(pod: Mapping[str, Any]) -> int:
    termination = get_int(get_map(pod, "spec"), "terminationGracePeriodSeconds")
    return DEFAULT_GRACE_SECONDS if termination is None else termination


def termination_grace(pod: Mapping[str, Any]) -> int:
    """terminationGracePeriodSeconds (30), at least the kubelet's 2 s minimum."""
    return max(MIN_GRACE_SECONDS, _declared_grace(pod))


def grace_seconds(pod: Mapping[str, Any]) -> int:
    """Deletion grace: min(deletionGracePeriodSeconds, terminationGracePeriodSeconds (30)),
    at least the kubelet's 2 s minimum."""
    grace = _declared_grace(pod)
    deletion = get_int(get_map(pod, "metadata"), "deletionGracePeriodSeconds")
    if deletion is not None:
        grace = min(grace, deletion)
    return max(MIN_GRACE_SECONDS, grace)


def unsupported_reason(pod: Mapping[str, Any]) -> str | None:
    """Why this executor cannot run ``pod`` faithfully, or None."""
    spec = get_map(pod, "spec")
    policy = get_text(spec, "restartPolicy", "Always")
    if policy not in ("Always", "OnFailure", "Never"):
        return f"restartPolicy {policy!r} is not one of Always, OnFailure, Never"
    if get_items(spec, "initContainers"):
        return "initContainers are not supported by the local executor"
    containers = get_items(spec, "containers")
    if len(containers) != 1:
        names = [get_text(c, "name") for c in containers]
        return f"the local executor runs exactly one container per pod, this pod has {names}"
    return None
