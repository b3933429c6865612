"""Volumes of an executor container: which files, with which modes, mounted where (pure, plus
files written to a temp dir)."""

from __future__ import annotations

import base64
import stat
import subprocess
from collections.abc import Callable
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest

from harness.executor import (
    ExecutorProcess,
    FileProjection,
    HostCapacity,
    Identity,
    ObjectCache,
    PodStartError,
    VolumeDir,
    VolumeSources,
    container_identity,
    container_mounts,
    host_paths_for,
    make_empty_dir,
    resolve_env,
    service_env,
    termination_log_mount,
    write_volume,
)

CAPACITY = HostCapacity(cpu=Decimal(2), memory=2**30, ephemeral_storage=2**34)


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


class Objects:
    def __init__(self, secrets: dict[str, Any], config_maps: dict[str, Any]) -> None:
        self.secrets = secrets
        self.config_maps = config_maps

    def secret(self, namespace: str, name: str) -> dict[str, Any] | None:
        return self.secrets.get(name)

    def config_map(self, namespace: str, name: str) -> dict[str, Any] | None:
        return self.config_maps.get(name)


class Tokens:
    def __init__(self) -> None:
        self.requests: list[dict[str, Any]] = []

    def service_account_token(
        self,
        namespace: str,
        service_account: str,
        *,
        audience: str,
        expiration_seconds: int,
        pod_name: str,
        pod_uid: str,
    ) -> str:
        self.requests.append(
            {
                "namespace": namespace,
                "sa": service_account,
                "audience": audience,
                "expiration": expiration_seconds,
                "pod": (pod_name, pod_uid),
            }
        )
        return "jwt-for-" + pod_name


OBJECTS = Objects(
    secrets={"creds": {"data": {"key": b64(b"\x00binary"), "other": b64(b"o")}}},
    config_maps={
        "cfg": {"data": {"a.yaml": "a: 1\n", "b": "bee"}, "binaryData": {"bin": b64(b"\x01")}},
        "kube-root-ca.crt": {"data": {"ca.crt": "PEM"}},
    },
)

POD: dict[str, Any] = {
    "metadata": {"name": "p", "namespace": "ns", "uid": "u1", "labels": {"app": "x"}},
    "spec": {"serviceAccountName": "runner", "containers": [{"name": "main"}]},
}


def files(
    volume: dict[str, Any], identity: Identity | None = None, tokens: Tokens | None = None
) -> dict[str, tuple[bytes, int, int | None]] | None:
    ident = identity or container_identity(POD, {"name": "main"})
    sources = VolumeSources(POD, ident, ObjectCache(OBJECTS, "ns"), tokens or Tokens(), CAPACITY)
    found = sources.files(volume)
    if found is None:
        return None
    return {f.path: (f.data, f.mode, f.owner) for f in found}


def test_empty_dir_has_no_files() -> None:
    assert files({"name": "scratch", "emptyDir": {}}) is None


def test_config_map_all_keys_with_default_mode() -> None:
    assert files({"name": "v", "configMap": {"name": "cfg"}}) == {
        "a.yaml": (b"a: 1\n", 0o644, None),
        "b": (b"bee", 0o644, None),
        "bin": (b"\x01", 0o644, None),
    }


def test_config_map_items_modes_and_nested_paths() -> None:
    volume = {
        "name": "v",
        "configMap": {
            "name": "cfg",
            "defaultMode": 0o440,
            "items": [
                {"key": "a.yaml", "path": "conf/app.yaml"},
                {"key": "b", "path": "b", "mode": 0o600},
            ],
        },
    }
    assert files(volume) == {"conf/app.yaml": (b"a: 1\n", 0o440, None), "b": (b"bee", 0o600, None)}


def test_secret_volume_decodes_base64() -> None:
    volume = {
        "name": "v",
        "secret": {"secretName": "creds", "items": [{"key": "key", "path": "k"}]},
    }
    assert files(volume) == {"k": (b"\x00binary", 0o644, None)}


@pytest.mark.parametrize(
    ("volume", "needle"),
    [
        ({"name": "v", "secret": {"secretName": "nope"}}, 'volume v: secret "nope" not found'),
        (
            {"name": "v", "configMap": {"name": "cfg", "items": [{"key": "zz", "path": "z"}]}},
            "references non-existent key: zz",
        ),
        (
            {"name": "v", "configMap": {"name": "cfg", "items": [{"key": "b", "path": "../x"}]}},
            "invalid item path '../x'",
        ),
    ],
)
def test_missing_objects_and_keys_fail(volume: dict[str, Any], needle: str) -> None:
    with pytest.raises(PodStartError) as info:
        files(volume)
    assert info.value.reason == "CreateContainerConfigError"
    assert needle in info.value.message


def test_optional_objects_and_keys_may_be_missing() -> None:
    assert files({"name": "v", "secret": {"secretName": "nope", "optional": True}}) == {}
    volume = {
        "name": "v",
        "configMap": {"name": "cfg", "optional": True, "items": [{"key": "zz", "path": "z"}]},
    }
    assert files(volume) == {}


def test_unsupported_volume_types_are_named() -> None:
    with pytest.raises(PodStartError) as info:
        files({"name": "data", "persistentVolumeClaim": {"claimName": "pvc"}})
    assert info.value.reason == "UnsupportedPodSpec"
    assert "['persistentVolumeClaim']" in info.value.message


def test_missing_root_ca_names_the_controller() -> None:
    empty = VolumeSources(
        POD,
        container_identity(POD, {"name": "main"}),
        ObjectCache(Objects({}, {}), "ns"),
        Tokens(),
        CAPACITY,
    )
    volume = {"name": "v", "projected": {"sources": [{"configMap": {"name": "kube-root-ca.crt"}}]}}
    with pytest.raises(PodStartError, match="root-ca-certificate-publisher-controller"):
        empty.files(volume)


# What the ServiceAccount admission plugin injects.
KUBE_API_ACCESS = {
    "name": "kube-api-access-abcde",
    "projected": {
        "defaultMode": 420,
        "sources": [
            {"serviceAccountToken": {"expirationSeconds": 3607, "path": "token"}},
            {
                "configMap": {
                    "name": "kube-root-ca.crt",
                    "items": [{"key": "ca.crt", "path": "ca.crt"}],
                }
            },
            {
                "downwardAPI": {
                    "items": [
                        {
                            "path": "namespace",
                            "fieldRef": {"apiVersion": "v1", "fieldPath": "metadata.namespace"},
                        }
                    ]
                }
            },
        ],
    },
}


def test_projected_service_account_volume() -> None:
    tokens = Tokens()
    assert files(KUBE_API_ACCESS, tokens=tokens) == {
        "token": (b"jwt-for-p", 0o644, None),
        "ca.crt": (b"PEM", 0o644, None),
        "namespace": (b"ns", 0o644, None),
    }
    assert tokens.requests == [
        {"namespace": "ns", "sa": "runner", "audience": "", "expiration": 3607, "pod": ("p", "u1")}
    ]


def test_projected_token_is_private_to_an_explicit_non_root_user() -> None:
    container = {"name": "main", "securityContext": {"runAsUser": 1000}}
    found = files(KUBE_API_ACCESS, identity=container_identity(POD, container))
    assert found is not None
    assert found["token"] == (b"jwt-for-p", 0o600, 1000)


def test_downward_api_volume() -> None:
    volume = {
        "name": "info",
        "downwardAPI": {
            "items": [
                {"path": "labels", "fieldRef": {"fieldPath": "metadata.labels"}},
                {"path": "cpu", "resourceFieldRef": {"resource": "limits.cpu"}, "mode": 0o400},
            ]
        },
    }
    assert files(volume) == {"labels": (b'app="x"', 0o644, None), "cpu": (b"2", 0o400, None)}


def test_write_volume_and_empty_dir_modes(tmp_path: Path) -> None:
    root = tmp_path / "v"
    write_volume(
        root, [FileProjection("conf/a", b"1", 0o640), FileProjection("b", b"2", 0o600)], None
    )
    assert (root / "conf" / "a").read_bytes() == b"1"
    assert stat.S_IMODE((root / "conf" / "a").stat().st_mode) == 0o640
    assert stat.S_IMODE((root / "b").stat().st_mode) == 0o600
    assert stat.S_IMODE((root / "conf").stat().st_mode) == 0o755
    scratch = tmp_path / "scratch"
    make_empty_dir(scratch, None)
    assert stat.S_IMODE(scratch.stat().st_mode) == 0o777


def kinds(table: dict[str, str]) -> Callable[[str], str | None]:
    return table.get


def test_container_mounts_resolve_sort_and_sub_path(tmp_path: Path) -> None:
    cfg = tmp_path / "cfg"
    write_volume(cfg, [FileProjection("app.yaml", b"x", 0o644)], None)
    data = tmp_path / "data"
    make_empty_dir(data, None)
    volumes = {"cfg": VolumeDir(cfg, writable=False), "data": VolumeDir(data, writable=True)}
    container = {
        "volumeMounts": [
            {"name": "cfg", "mountPath": "/run/data/conf/app.yaml", "subPath": "app.yaml"},
            {"name": "data", "mountPath": "/var/run/data"},
            {
                "name": "data",
                "mountPath": "/run/work",
                "subPathExpr": "$(POD)/work",
                "readOnly": True,
            },
            {"name": "cfg", "mountPath": "/etc/ssl"},
        ]
    }
    mounts = container_mounts(
        container,
        volumes,
        {"POD": "p1"},
        readlink={"/var/run": "/run"}.get,
        host_kind=kinds({"/etc/ssl": "dir"}),
    )
    assert [(m.target, m.source, m.read_only) for m in mounts] == [
        ("/run/data", str(data), False),
        ("/run/work", str(data / "p1" / "work"), True),
        ("/etc/ssl", str(cfg), True),
        ("/run/data/conf/app.yaml", str(cfg / "app.yaml"), True),
    ]
    assert (data / "p1" / "work").is_dir(), "a missing subPath in an emptyDir is created"


def test_container_mount_outside_the_sandbox_tmpfs_fails(tmp_path: Path) -> None:
    volumes = {"cfg": VolumeDir(tmp_path, writable=False)}
    container = {"volumeMounts": [{"name": "cfg", "mountPath": "/etc/nocturne"}]}
    with pytest.raises(PodStartError) as info:
        container_mounts(container, volumes, {}, readlink=lambda _: None, host_kind=kinds({}))
    assert info.value.reason == "CreateContainerConfigError"
    assert "/etc/nocturne does not exist on the host" in info.value.message


def test_missing_sub_path_of_a_read_only_volume_fails(tmp_path: Path) -> None:
    volumes = {"cfg": VolumeDir(tmp_path, writable=False)}
    container = {"volumeMounts": [{"name": "cfg", "mountPath": "/run/x", "subPath": "nope"}]}
    with pytest.raises(PodStartError, match="subPath 'nope' does not exist"):
        container_mounts(container, volumes, {})


def test_termination_log_mount(tmp_path: Path) -> None:
    log = tmp_path / "t"
    assert termination_log_mount({}, log, []).target == "/dev/termination-log"
    custom = {"terminationMessagePath": "/var/run/result.json"}
    assert termination_log_mount(custom, log, [], kinds({})).target == "/run/result.json"
    with pytest.raises(PodStartError, match="terminationMessagePath"):
        termination_log_mount({"terminationMessagePath": "/opt/nope/msg"}, log, [], kinds({}))


def test_malformed_pods_fail_instead_of_crashing() -> None:
    container: dict[str, Any] = {"name": "main", "env": "FOO=bar"}
    with pytest.raises(PodStartError) as info:
        resolve_env(POD, container, OBJECTS, service_env("https://127.0.0.1:1"), CAPACITY)
    assert info.value.reason == "CreateContainerError"
    assert "env is not a list of objects" in info.value.message


def test_host_paths_never_expose_the_state_dir(tmp_path: Path) -> None:
    state = tmp_path / "state"
    state.mkdir()
    script = state / "run.sh"
    script.write_text("#!/bin/sh\necho hi\n")
    script.chmod(0o755)
    paths = host_paths_for(str(script), "/usr/bin:/bin", "/", state)
    assert not any(p.startswith(str(state)) for p in paths)
    wrapper = tmp_path / "tool"
    wrapper.write_text("#!/usr/bin/env sh\n")
    wrapper.chmod(0o755)
    paths = host_paths_for(str(wrapper), "/usr/bin:/bin", "/", state)
    assert str(wrapper) in paths
    assert any(p.endswith(("/dash", "/sh", "/bash", "/busybox")) for p in paths)


def test_log_path_of_the_only_container(tmp_path: Path) -> None:
    proc = subprocess.Popen(["true"])
    proc.wait()
    handle = ExecutorProcess(proc, tmp_path, tmp_path / "executor.log")
    pod_dir = handle.pod_dir("ns", "p")
    pod_dir.mkdir(parents=True)
    with pytest.raises(FileNotFoundError, match="expected one container log"):
        handle.log_path("ns", "p")
    (pod_dir / "main.log").write_text("x")
    assert handle.log_path("ns", "p") == pod_dir / "main.log"
    assert handle.log_path("ns", "p", "other") == pod_dir / "other.log"
