"""Volumes: configMap, secret, downwardAPI and projected files materialised on the host,
emptyDirs, and the bind mounts (volumeMounts, terminationMessagePath) that show them."""

from __future__ import annotations

import os
import posixpath
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from harness.executor import sandbox
from harness.executor.downward import HostCapacity, downward_value
from harness.executor.expansion import expand
from harness.executor.identity import Identity
from harness.executor.objects import ObjectCache, TokenSource
from harness.executor.pod import (
    PodStartError,
    config_error,
    get_bool,
    get_int,
    get_items,
    get_map,
    get_text,
)
from harness.executor.reasons import REASON_UNSUPPORTED

DEFAULT_TERMINATION_MESSAGE_PATH = "/dev/termination-log"
_PROJECTED_TOKEN_DEFAULT_EXPIRY = 3600


@dataclass(frozen=True)
class FileProjection:
    """One file of a materialised configMap/secret/downwardAPI/projected volume."""

    path: str
    data: bytes
    mode: int
    owner: int | None = None  # uid, for the kubelet's projected-token special case


@dataclass(frozen=True)
class VolumeDir:
    """A materialised volume: a host directory and whether the container may write to it."""

    path: Path
    writable: bool


def _check_relative(path: str, volume: str) -> str:
    norm = posixpath.normpath(path)
    if not path or path.startswith("/") or norm == ".." or norm.startswith("../"):
        raise config_error(f"volume {volume}: invalid item path {path!r}")
    return norm


def _mode(obj: Mapping[str, Any], key: str, default: int) -> int:
    value = get_int(obj, key)
    return default if value is None else value


@dataclass(frozen=True)
class VolumeSources:
    """What materialising a pod's volumes needs: the pod, who runs it, and where data lives."""

    pod: Mapping[str, Any]
    identity: Identity
    objects: ObjectCache
    tokens: TokenSource
    capacity: HostCapacity

    def keyed(
        self, volume: str, kind: str, ref: Mapping[str, Any], *, name_key: str, default_mode: int
    ) -> list[FileProjection]:
        """Files of a configMap/secret (volume or projected source), honouring items/optional."""
        name = get_text(ref, name_key)
        optional = bool(get_bool(ref, "optional"))
        data = self.objects.data(kind, name)
        if data is None:
            if optional:
                return []
            hint = (
                " (kube-root-ca.crt is published by kube-controller-manager's "
                "root-ca-certificate-publisher-controller)"
                if name == "kube-root-ca.crt"
                else ""
            )
            raise config_error(f'volume {volume}: {kind} "{name}" not found{hint}')
        items = get_items(ref, "items")
        if not items:
            return [
                FileProjection(_check_relative(k, volume), v, default_mode) for k, v in data.items()
            ]
        files = []
        for item in items:
            key = get_text(item, "key")
            if key not in data:
                if optional:
                    continue
                raise config_error(
                    f"volume {volume}: {kind} {name} references non-existent key: {key}"
                )
            files.append(
                FileProjection(
                    _check_relative(get_text(item, "path"), volume),
                    data[key],
                    _mode(item, "mode", default_mode),
                )
            )
        return files

    def downward(
        self, volume: str, source: Mapping[str, Any], *, default_mode: int
    ) -> list[FileProjection]:
        """Files of a downwardAPI volume or projected source."""
        container_name = get_text(get_items(get_map(self.pod, "spec"), "containers")[0], "name")
        files = []
        for item in get_items(source, "items"):
            value = downward_value(self.pod, container_name, item, self.capacity)
            if value is None:
                raise config_error(f"volume {volume}: downwardAPI item without fieldRef")
            files.append(
                FileProjection(
                    _check_relative(get_text(item, "path"), volume),
                    value.encode(),
                    _mode(item, "mode", default_mode),
                )
            )
        return files

    def token(self, volume: str, source: Mapping[str, Any], *, default_mode: int) -> FileProjection:
        """A projected serviceAccountToken: a real TokenRequest bound to the pod."""
        meta = get_map(self.pod, "metadata")
        token = self.tokens.service_account_token(
            get_text(meta, "namespace"),
            get_text(get_map(self.pod, "spec"), "serviceAccountName", "default"),
            audience=get_text(source, "audience"),
            expiration_seconds=get_int(source, "expirationSeconds")
            or _PROJECTED_TOKEN_DEFAULT_EXPIRY,
            pod_name=get_text(meta, "name"),
            pod_uid=get_text(meta, "uid"),
        )
        identity = self.identity
        # projected.go: with an fsUser (explicit non-root runAsUser) or fsGroup the token file
        # is 0600 and owned by that user.
        special = (identity.explicit_uid and identity.uid != 0) or identity.fs_group is not None
        return FileProjection(
            _check_relative(get_text(source, "path"), volume),
            token.encode(),
            0o600 if special else default_mode,
            identity.uid if special else None,
        )

    def files(self, volume: Mapping[str, Any]) -> list[FileProjection] | None:
        """The files of one volume, or None for an emptyDir (a plain writable directory).

        Raises ``PodStartError`` for unsupported volume types and missing objects/keys.
        """
        name = get_text(volume, "name")
        if "emptyDir" in volume:
            return None
        if "configMap" in volume:
            src = get_map(volume, "configMap")
            mode = _mode(src, "defaultMode", 0o644)
            return self.keyed(name, "configmap", src, name_key="name", default_mode=mode)
        if "secret" in volume:
            src = get_map(volume, "secret")
            mode = _mode(src, "defaultMode", 0o644)
            return self.keyed(name, "secret", src, name_key="secretName", default_mode=mode)
        if "downwardAPI" in volume:
            src = get_map(volume, "downwardAPI")
            return self.downward(name, src, default_mode=_mode(src, "defaultMode", 0o644))
        if "projected" not in volume:
            kinds = sorted(k for k in volume if k != "name")
            raise PodStartError(
                REASON_UNSUPPORTED,
                f"volume {name}: type {kinds} is not supported by the local executor "
                "(supported: emptyDir, configMap, secret, downwardAPI, projected)",
            )
        projected = get_map(volume, "projected")
        mode = _mode(projected, "defaultMode", 0o644)
        files: list[FileProjection] = []
        for src in get_items(projected, "sources"):
            if "configMap" in src:
                cm = get_map(src, "configMap")
                files += self.keyed(name, "configmap", cm, name_key="name", default_mode=mode)
            elif "secret" in src:
                sec = get_map(src, "secret")
                files += self.keyed(name, "secret", sec, name_key="name", default_mode=mode)
            elif "downwardAPI" in src:
                files += self.downward(name, get_map(src, "downwardAPI"), default_mode=mode)
            elif "serviceAccountToken" in src:
                files.append(
                    self.token(name, get_map(src, "serviceAccountToken"), default_mode=mode)
                )
            else:
                raise PodStartError(
                    REASON_UNSUPPORTED,
                    f"volume {name}: projected source {sorted(src)} is not supported by the "
                    "local executor",
                )
        return files


def write_volume(root: Path, files: Sequence[FileProjection], fs_group: int | None) -> None:
    """Materialise ``files`` below ``root`` (created 0755), with their modes and owners."""
    root.mkdir(parents=True, exist_ok=True)
    root.chmod(0o755)
    for item in files:
        target = root / item.path
        target.parent.mkdir(parents=True, exist_ok=True)
        for parent in target.relative_to(root).parents:
            (root / parent).chmod(0o755)
        target.write_bytes(item.data)
        target.chmod(item.mode & 0o777)
        if item.owner is not None or fs_group is not None:
            os.chown(
                target,
                -1 if item.owner is None else item.owner,
                -1 if fs_group is None else fs_group,
            )
    if fs_group is not None:
        os.chown(root, -1, fs_group)


def make_empty_dir(root: Path, fs_group: int | None) -> None:
    """An emptyDir: world-writable like the kubelet's (0777), setgid fsGroup if any."""
    root.mkdir(parents=True, exist_ok=True)
    root.chmod(0o777)
    if fs_group is not None:
        os.chown(root, -1, fs_group)
        root.chmod(0o2777)


def container_mounts(
    container: Mapping[str, Any],
    volumes: Mapping[str, VolumeDir],
    env: Mapping[str, str],
    *,
    readlink: Callable[[str], str | None] | None = None,
    host_kind: Callable[[str], str | None] = sandbox.host_kind,
) -> list[sandbox.Mount]:
    """The bind mounts for ``volumeMounts`` (subPath, subPathExpr, readOnly), targets resolved
    and checked against what the read-only host root allows; raises ``PodStartError``."""
    planned: list[tuple[str, str, bool, bool]] = []  # (target, source, read_only, is_dir)
    for vm in get_items(container, "volumeMounts"):
        name = get_text(vm, "name")
        vol = volumes.get(name)
        if vol is None:
            raise config_error(f"volumeMount {name}: no volume of that name in the pod")
        sub = get_text(vm, "subPath")
        if not sub and vm.get("subPathExpr"):
            sub = expand(get_text(vm, "subPathExpr"), env)
        source = vol.path
        if sub:
            source = vol.path / _check_relative(sub, name)
            if not source.exists():
                if not vol.writable:
                    raise config_error(f"volumeMount {name}: subPath {sub!r} does not exist")
                source.mkdir(parents=True, mode=0o777)
                source.chmod(0o777)
        try:
            target = (
                sandbox.resolve_target(get_text(vm, "mountPath"), readlink)
                if readlink is not None
                else sandbox.resolve_target(get_text(vm, "mountPath"))
            )
        except sandbox.MountTargetError as exc:
            raise config_error(f"volumeMount {name}: {exc}") from exc
        read_only = bool(get_bool(vm, "readOnly")) or not vol.writable
        planned.append((target, str(source), read_only, source.is_dir()))
    planned.sort(key=lambda p: len([c for c in p[0].split("/") if c]))
    writable_dirs: list[str] = []
    mounts = []
    for target, host_path, read_only, is_dir in planned:
        try:
            sandbox.check_target(
                target, is_dir=is_dir, host_kind=host_kind, writable_parents=writable_dirs
            )
        except sandbox.MountTargetError as exc:
            raise config_error(str(exc)) from exc
        if is_dir and not read_only:
            writable_dirs.append(target)
        mounts.append(sandbox.Mount(host_path, target, read_only))
    return mounts


def termination_log_mount(
    container: Mapping[str, Any],
    host_file: Path,
    mounts: Sequence[sandbox.Mount],
    host_kind: Callable[[str], str | None] = sandbox.host_kind,
) -> sandbox.Mount:
    """Bind for ``terminationMessagePath`` (default /dev/termination-log)."""
    path = get_text(container, "terminationMessagePath", DEFAULT_TERMINATION_MESSAGE_PATH)
    try:
        target = sandbox.resolve_target(path)
        writable = [m.target for m in mounts if not m.read_only]
        sandbox.check_target(target, is_dir=False, host_kind=host_kind, writable_parents=writable)
    except sandbox.MountTargetError as exc:
        raise config_error(f"terminationMessagePath: {exc}") from exc
    return sandbox.Mount(str(host_file), target, read_only=False)


def materialise_volumes(
    volumes: Sequence[Mapping[str, Any]], sources: VolumeSources, root: Path
) -> dict[str, VolumeDir]:
    """Every pod volume as a directory ``root/<name>``: emptyDirs writable, the others written
    once and read-only for the container."""
    fs_group = sources.identity.fs_group
    found: dict[str, VolumeDir] = {}
    for volume in volumes:
        name = get_text(volume, "name")
        files = sources.files(volume)
        path = root / name
        if files is None:
            make_empty_dir(path, fs_group)
            found[name] = VolumeDir(path, writable=True)
        else:
            write_volume(path, files, fs_group)
            found[name] = VolumeDir(path, writable=False)
    return found
