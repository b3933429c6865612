"""Who a container runs as: the pod and container securityContext, resolved for setpriv."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from harness.executor.pod import (
    PodKey,
    PodStartError,
    config_error,
    get_bool,
    get_int,
    get_map,
    get_text,
)
from harness.executor.reasons import REASON_INTERNAL, REASON_UNSUPPORTED

NOBODY = 65534


@dataclass(frozen=True)
class Identity:
    """Who the container runs as, and how its root filesystem and privileges look."""

    uid: int
    gid: int
    groups: tuple[int, ...]
    explicit_uid: bool
    fs_group: int | None
    read_only_root: bool
    no_new_privs: bool


def container_identity(pod: Mapping[str, Any], container: Mapping[str, Any]) -> Identity:
    """Resolve pod + container securityContext; raises for what cannot be honoured."""
    psc = get_map(get_map(pod, "spec"), "securityContext")
    csc = get_map(container, "securityContext")

    def pick_int(key: str) -> int | None:
        value = get_int(csc, key)
        return value if value is not None else get_int(psc, key)

    if get_bool(csc, "privileged"):
        raise PodStartError(REASON_UNSUPPORTED, "privileged containers are not supported")
    run_as_user = pick_int("runAsUser")
    run_as_group = pick_int("runAsGroup")
    non_root = get_bool(csc, "runAsNonRoot")
    if non_root is None:
        non_root = get_bool(psc, "runAsNonRoot")
    uid = NOBODY if run_as_user is None else run_as_user
    if non_root and uid == 0:
        raise config_error(
            f"container's runAsUser breaks non-root policy (pod: {PodKey.of(pod)}, "
            f"container: {get_text(container, 'name')})"
        )
    # Without runAsGroup: root keeps group 0, everyone else gets nogroup (not the risky 0).
    gid = run_as_group if run_as_group is not None else (0 if uid == 0 else NOBODY)
    fs_group = get_int(psc, "fsGroup")
    groups: list[int] = []
    for g in [*([] if fs_group is None else [fs_group]), *_supplemental(psc)]:
        if g not in groups:
            groups.append(g)
    return Identity(
        uid=uid,
        gid=gid,
        groups=tuple(groups),
        explicit_uid=run_as_user is not None,
        fs_group=fs_group,
        read_only_root=bool(get_bool(csc, "readOnlyRootFilesystem")),
        no_new_privs=get_bool(csc, "allowPrivilegeEscalation") is not True,
    )


def _supplemental(psc: Mapping[str, Any]) -> list[int]:
    value = psc.get("supplementalGroups") or []
    if not isinstance(value, list) or not all(
        isinstance(v, int) and not isinstance(v, bool) for v in value
    ):
        raise PodStartError(REASON_INTERNAL, "malformed pod: supplementalGroups")
    return value
