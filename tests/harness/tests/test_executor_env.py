"""Environment, command line and identity of an executor container, from already-fetched
objects (pure: the Secrets/ConfigMaps are plain dicts, as the API returns them)."""

from __future__ import annotations

import base64
from decimal import Decimal
from typing import Any

import pytest

from harness.executor import (
    HostCapacity,
    ImageEntry,
    PodStartError,
    container_argv,
    container_environment,
    container_identity,
    field_value,
    format_map,
    parse_quantity,
    resolve_env,
    resource_value,
    service_env,
)

CAPACITY = HostCapacity(cpu=Decimal(4), memory=8 * 2**30, ephemeral_storage=100 * 2**30)
SERVICE = service_env("https://127.0.0.1:6443")


def b64(text: str) -> str:
    return base64.b64encode(text.encode()).decode()


class Objects:
    """Secrets and ConfigMaps of one namespace, keyed by name (what GET would return)."""

    def __init__(self, secrets: dict[str, Any], config_maps: dict[str, Any]) -> None:
        self.secrets = secrets
        self.config_maps = config_maps
        self.calls: list[tuple[str, str]] = []

    def secret(self, namespace: str, name: str) -> dict[str, Any] | None:
        self.calls.append(("secret", name))
        return self.secrets.get(name)

    def config_map(self, namespace: str, name: str) -> dict[str, Any] | None:
        self.calls.append(("configmap", name))
        return self.config_maps.get(name)


OBJECTS = Objects(
    secrets={"creds": {"data": {"apikey": b64("s3cret"), "user": b64("bob")}}},
    config_maps={
        "cfg": {"data": {"LEVEL": "debug", "bad=key": "x", "MODE": "fast"}},
        "bin": {"binaryData": {"blob": b64("raw")}},
    },
)


def pod(container: dict[str, Any], **spec: Any) -> dict[str, Any]:
    return {
        "metadata": {
            "name": "p1",
            "namespace": "ns1",
            "uid": "u-1",
            "labels": {"app": "demo", "tier": "x"},
            "annotations": {"note": 'say "hi"'},
        },
        "spec": {"serviceAccountName": "runner", "containers": [container], **spec},
    }


def env_of(container: dict[str, Any], objects: Objects = OBJECTS) -> dict[str, str]:
    c = {"name": "main", "image": "busybox", **container}
    return resolve_env(pod(c), c, objects, SERVICE, CAPACITY)


def test_values_expand_earlier_variables_and_service_env() -> None:
    env = env_of(
        {
            "env": [
                {"name": "A", "value": "one"},
                {"name": "B", "value": "$(A)-two-$(KUBERNETES_SERVICE_PORT)"},
                {"name": "C", "value": "$(LATER)"},
                {"name": "LATER", "value": "x"},
                {"name": "D", "value": "$$(A)"},
                {"name": "E"},
            ]
        }
    )
    assert env["B"] == "one-two-6443"
    assert env["C"] == "$(LATER)"  # only earlier variables are visible
    assert env["D"] == "$(A)"
    assert env["E"] == ""


def test_secret_and_config_map_key_refs() -> None:
    env = env_of(
        {
            "env": [
                {
                    "name": "APIKEY",
                    "valueFrom": {"secretKeyRef": {"name": "creds", "key": "apikey"}},
                },
                {"name": "LVL", "valueFrom": {"configMapKeyRef": {"name": "cfg", "key": "LEVEL"}}},
                {
                    "name": "OPT",
                    "valueFrom": {
                        "secretKeyRef": {"name": "creds", "key": "nope", "optional": True}
                    },
                },
                {
                    "name": "GONE",
                    "valueFrom": {
                        "configMapKeyRef": {"name": "missing", "key": "k", "optional": True}
                    },
                },
            ]
        }
    )
    assert env["APIKEY"] == "s3cret"
    assert env["LVL"] == "debug"
    assert "OPT" not in env
    assert "GONE" not in env


@pytest.mark.parametrize(
    ("ref", "needle"),
    [
        ({"secretKeyRef": {"name": "creds", "key": "nope"}}, "couldn't find key nope in Secret"),
        ({"secretKeyRef": {"name": "other", "key": "k"}}, 'secret "other" not found'),
        ({"configMapKeyRef": {"name": "cfg", "key": "x"}}, "couldn't find key x in ConfigMap"),
        ({"configMapKeyRef": {"name": "nocm", "key": "x"}}, 'configmap "nocm" not found'),
        ({"fieldRef": {"fieldPath": "spec.containers[0]"}}, "unsupported fieldRef"),
    ],
)
def test_missing_references_fail_with_config_error(ref: dict[str, Any], needle: str) -> None:
    with pytest.raises(PodStartError) as info:
        env_of({"env": [{"name": "X", "valueFrom": ref}]})
    assert info.value.reason == "CreateContainerConfigError"
    assert needle in info.value.message
    assert "s3cret" not in info.value.message


def test_env_from_with_prefix_skips_invalid_names_and_env_overrides() -> None:
    skipped: list[str] = []
    c = {
        "name": "main",
        "image": "busybox",
        "envFrom": [
            {"configMapRef": {"name": "cfg"}, "prefix": "CFG_"},
            {"secretRef": {"name": "creds"}},
            {"configMapRef": {"name": "absent", "optional": True}},
        ],
        "env": [{"name": "user", "value": "override"}],
    }
    env = resolve_env(pod(c), c, OBJECTS, SERVICE, CAPACITY, on_skip=skipped.append)
    assert env["CFG_LEVEL"] == "debug"
    assert env["CFG_MODE"] == "fast"
    assert "CFG_bad=key" not in env
    assert env["apikey"] == "s3cret"
    assert env["user"] == "override"
    assert len(skipped) == 1
    assert "CFG_bad=key" in skipped[0]


def test_env_from_missing_object_fails() -> None:
    with pytest.raises(PodStartError, match='configmap "absent" not found'):
        env_of({"envFrom": [{"configMapRef": {"name": "absent"}}]})


def test_each_object_is_fetched_once() -> None:
    objects = Objects(OBJECTS.secrets, OBJECTS.config_maps)
    env_of(
        {
            "envFrom": [{"secretRef": {"name": "creds"}}],
            "env": [
                {"name": "A", "valueFrom": {"secretKeyRef": {"name": "creds", "key": "user"}}},
                {"name": "B", "valueFrom": {"secretKeyRef": {"name": "creds", "key": "apikey"}}},
            ],
        },
        objects,
    )
    assert objects.calls == [("secret", "creds")]


def test_service_env_points_at_the_real_apiserver() -> None:
    env = env_of({})
    assert env["KUBERNETES_SERVICE_HOST"] == "127.0.0.1"
    assert env["KUBERNETES_SERVICE_PORT"] == "6443"
    assert env["KUBERNETES_PORT"] == "tcp://127.0.0.1:6443"
    assert env["KUBERNETES_PORT_6443_TCP_ADDR"] == "127.0.0.1"
    overridden = env_of({"env": [{"name": "KUBERNETES_SERVICE_HOST", "value": "elsewhere"}]})
    assert overridden["KUBERNETES_SERVICE_HOST"] == "elsewhere"


@pytest.mark.parametrize(
    ("path", "value"),
    [
        ("metadata.name", "p1"),
        ("metadata.namespace", "ns1"),
        ("metadata.uid", "u-1"),
        ("metadata.labels['app']", "demo"),
        ("metadata.labels['none']", ""),
        ("metadata.annotations['note']", 'say "hi"'),
        ("metadata.labels", 'app="demo"\ntier="x"'),
        ("spec.serviceAccountName", "runner"),
        ("spec.nodeName", ""),
        ("status.podIP", ""),
    ],
)
def test_field_refs(path: str, value: str) -> None:
    assert field_value(pod({"name": "main"}), path) == value


def test_format_map_quotes_values() -> None:
    assert format_map({"b": "2", "a": 'x"y'}) == 'a="x\\"y"\nb="2"'


@pytest.mark.parametrize(
    ("text", "value"),
    [("250m", "0.25"), ("1Gi", str(2**30)), ("1e3", "1000"), ("2", "2"), ("1.5k", "1500")],
)
def test_parse_quantity(text: str, value: str) -> None:
    assert parse_quantity(text) == Decimal(value)


def test_parse_quantity_rejects_garbage() -> None:
    with pytest.raises(ValueError, match="invalid quantity"):
        parse_quantity("lots")


@pytest.mark.parametrize(
    ("resources", "ref", "value"),
    [
        ({"limits": {"cpu": "250m"}}, {"resource": "limits.cpu"}, "1"),
        ({"limits": {"cpu": "250m"}}, {"resource": "limits.cpu", "divisor": "1m"}, "250"),
        ({"limits": {"memory": "64Mi"}}, {"resource": "limits.memory", "divisor": "1Mi"}, "64"),
        ({"requests": {"memory": "1Gi"}}, {"resource": "requests.memory"}, str(2**30)),
        ({}, {"resource": "limits.cpu"}, "4"),
        ({}, {"resource": "limits.memory", "divisor": "1Gi"}, "8"),
        ({}, {"resource": "requests.cpu"}, "0"),
    ],
)
def test_resource_field_refs(resources: dict[str, Any], ref: dict[str, str], value: str) -> None:
    p = pod({"name": "main", "resources": resources})
    assert resource_value(p, "main", ref, CAPACITY) == value


def test_resource_field_ref_for_unknown_container_fails() -> None:
    p = pod({"name": "main"})
    with pytest.raises(PodStartError, match="unknown container 'side'"):
        resource_value(p, "main", {"containerName": "side", "resource": "limits.cpu"}, CAPACITY)


def test_final_environment_layers() -> None:
    image = ImageEntry((), env=(("PATH", "/opt/bin:/bin"), ("IMG", "1")))
    env = container_environment("p1", image, {"IMG": "2"}, 65534)
    assert env == {"PATH": "/opt/bin:/bin", "HOSTNAME": "p1", "IMG": "2", "HOME": "/nonexistent"}


@pytest.mark.parametrize(
    ("container", "argv"),
    [
        ({}, ["/entry", "default"]),
        ({"args": ["x", "$(A)"]}, ["/entry", "x", "1"]),
        ({"command": ["sh", "-c"]}, ["sh", "-c"]),
        ({"command": ["sh", "-c"], "args": ["echo $(A) $$(A)"]}, ["sh", "-c", "echo 1 $(A)"]),
    ],
)
def test_command_and_args_replace_entrypoint_and_cmd(
    container: dict[str, Any], argv: list[str]
) -> None:
    image = ImageEntry(("/entry",), ("default",))
    assert container_argv(image, container, {"A": "1"}) == argv


def test_no_command_at_all_fails() -> None:
    with pytest.raises(PodStartError, match="no command"):
        container_argv(ImageEntry(()), {}, {})


def test_identity_defaults_to_nobody() -> None:
    ident = container_identity(pod({"name": "main"}), {"name": "main"})
    assert (ident.uid, ident.gid, ident.groups, ident.explicit_uid) == (65534, 65534, (), False)
    assert ident.no_new_privs
    assert not ident.read_only_root


def test_identity_container_overrides_pod() -> None:
    c = {
        "name": "main",
        "securityContext": {
            "runAsUser": 1000,
            "readOnlyRootFilesystem": True,
            "allowPrivilegeEscalation": True,
        },
    }
    p = pod(
        c,
        securityContext={
            "runAsUser": 2000,
            "runAsGroup": 3000,
            "fsGroup": 4000,
            "supplementalGroups": [5000, 4000],
        },
    )
    ident = container_identity(p, c)
    assert (ident.uid, ident.gid, ident.groups) == (1000, 3000, (4000, 5000))
    assert ident.read_only_root
    assert not ident.no_new_privs
    assert ident.fs_group == 4000


def test_run_as_non_root_with_root_uid_is_refused() -> None:
    c = {"name": "main", "securityContext": {"runAsUser": 0}}
    p = pod(c, securityContext={"runAsNonRoot": True})
    with pytest.raises(PodStartError, match="breaks non-root policy"):
        container_identity(p, c)


def test_explicit_root_keeps_group_zero() -> None:
    c = {"name": "main", "securityContext": {"runAsUser": 0}}
    ident = container_identity(pod(c), c)
    assert (ident.uid, ident.gid) == (0, 0)


def test_privileged_is_unsupported() -> None:
    c = {"name": "main", "securityContext": {"privileged": True}}
    with pytest.raises(PodStartError) as info:
        container_identity(pod(c), c)
    assert info.value.reason == "UnsupportedPodSpec"
