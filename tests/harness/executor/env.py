"""The container's environment (env, envFrom, valueFrom, service variables) and command line,
built the way the kubelet builds them."""

from __future__ import annotations

import pwd
import urllib.parse
from collections.abc import Callable, Mapping
from typing import Any

from harness.executor.downward import HostCapacity, downward_value
from harness.executor.expansion import expand
from harness.executor.images import ImageEntry
from harness.executor.objects import ObjectCache, ObjectSource
from harness.executor.pod import (
    PodStartError,
    config_error,
    get_bool,
    get_items,
    get_map,
    get_strings,
    get_text,
)
from harness.executor.reasons import REASON_START

DEFAULT_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"


def _valid_env_name(name: str) -> bool:
    # RelaxedEnvironmentVariableValidation (GA in 1.34): printable ASCII without '='.
    return bool(name) and "=" not in name and all(32 <= ord(c) < 127 for c in name)


def _kind_label(kind: str) -> str:
    return "Secret" if kind == "secret" else "ConfigMap"


def _env_from(
    container: Mapping[str, Any], objects: ObjectCache, on_skip: Callable[[str], None] | None
) -> dict[str, str]:
    env: dict[str, str] = {}
    for ref in get_items(container, "envFrom"):
        prefix = get_text(ref, "prefix")
        for kind, field_name in (("configmap", "configMapRef"), ("secret", "secretRef")):
            if field_name not in ref:
                continue
            target = get_map(ref, field_name)
            name = get_text(target, "name")
            data = objects.data(kind, name)
            if data is None:
                if get_bool(target, "optional"):
                    continue
                raise config_error(f'{kind} "{name}" not found (envFrom {field_name})')
            skipped = sorted(prefix + k for k in data if not _valid_env_name(prefix + k))
            env.update(
                {
                    prefix + k: v.decode(errors="replace")
                    for k, v in data.items()
                    if _valid_env_name(prefix + k)
                }
            )
            if skipped and on_skip is not None:
                on_skip(
                    f"keys {skipped} from the envFrom {_kind_label(kind)} {name} were skipped "
                    "since they are invalid environment variable names"
                )
    return env


def _key_ref_value(
    var_name: str, value_from: Mapping[str, Any], objects: ObjectCache
) -> str | None:
    """A configMapKeyRef/secretKeyRef value; None when optional and missing."""
    kind = "secret" if "secretKeyRef" in value_from else "configmap"
    ref = get_map(value_from, "secretKeyRef" if kind == "secret" else "configMapKeyRef")
    obj_name, key = get_text(ref, "name"), get_text(ref, "key")
    optional = bool(get_bool(ref, "optional"))
    data = objects.data(kind, obj_name)
    if data is None:
        if optional:
            return None
        raise config_error(f'{kind} "{obj_name}" not found (env {var_name})')
    if key not in data:
        if optional:
            return None
        raise config_error(
            f"couldn't find key {key} in {_kind_label(kind)} {objects.namespace}/{obj_name} "
            f"(env {var_name})"
        )
    return data[key].decode(errors="replace")


def resolve_env(
    pod: Mapping[str, Any],
    container: Mapping[str, Any],
    source: ObjectSource,
    service_env: Mapping[str, str],
    capacity: HostCapacity,
    *,
    on_skip: Callable[[str], None] | None = None,
) -> dict[str, str]:
    """The container's environment as the kubelet builds it (makeEnvironmentVariables).

    ``envFrom`` first (later sources override earlier ones), then ``env`` in order, where a
    ``value`` may reference earlier variables and service variables with ``$(VAR)``; service
    variables fill in what the pod did not set. A missing non-optional Secret/ConfigMap or key
    raises ``PodStartError`` (CreateContainerConfigError).
    """
    namespace = get_text(get_map(pod, "metadata"), "namespace")
    objects = source if isinstance(source, ObjectCache) else ObjectCache(source, namespace)
    env = _env_from(container, objects, on_skip)
    for var in get_items(container, "env"):
        name = get_text(var, "name")
        value = get_text(var, "value")
        value_from = get_map(var, "valueFrom")
        resolved: str | None
        if value or not value_from:
            resolved = expand(value, {**service_env, **env})
        elif "fieldRef" in value_from or "resourceFieldRef" in value_from:
            resolved = downward_value(pod, get_text(container, "name"), value_from, capacity)
        elif "configMapKeyRef" in value_from or "secretKeyRef" in value_from:
            resolved = _key_ref_value(name, value_from, objects)
        else:
            raise config_error(f"env {name}: unsupported valueFrom {sorted(value_from)}")
        if resolved is not None:
            env[name] = resolved
    for key, value in service_env.items():
        env.setdefault(key, value)
    return env


def service_env(server: str) -> dict[str, str]:
    """KUBERNETES_SERVICE_* / KUBERNETES_PORT* for the real apiserver endpoint (no kube-proxy)."""
    url = urllib.parse.urlsplit(server)
    host = url.hostname or "127.0.0.1"
    port = url.port or 443
    addr = f"tcp://{host}:{port}" if ":" not in host else f"tcp://[{host}]:{port}"
    prefix = f"KUBERNETES_PORT_{port}_TCP"
    return {
        "KUBERNETES_SERVICE_HOST": host,
        "KUBERNETES_SERVICE_PORT": str(port),
        "KUBERNETES_SERVICE_PORT_HTTPS": str(port),
        "KUBERNETES_PORT": addr,
        prefix: addr,
        f"{prefix}_PROTO": "tcp",
        f"{prefix}_PORT": str(port),
        f"{prefix}_ADDR": host,
    }


def home_for(uid: int) -> str:
    """HOME as runc sets it: the user's home in /etc/passwd (the host's here), else '/'."""
    try:
        return pwd.getpwuid(uid).pw_dir or "/"
    except KeyError:
        return "/"


def container_environment(
    hostname: str, image: ImageEntry, resolved: Mapping[str, str], uid: int
) -> dict[str, str]:
    """The final process environment: HOSTNAME, the image's ENV, then the pod's variables."""
    env = {"PATH": DEFAULT_PATH, "HOSTNAME": hostname}
    env.update(dict(image.env))
    env.update(resolved)
    env.setdefault("HOME", home_for(uid))
    return env


def container_argv(
    image: ImageEntry, container: Mapping[str, Any], env: Mapping[str, str]
) -> list[str]:
    """ENTRYPOINT/CMD overridden by ``command``/``args`` with ``$(VAR)`` expansion."""
    command = get_strings(container, "command")
    args = get_strings(container, "args")
    if command:
        argv = [expand(c, env) for c in command] + [expand(a, env) for a in args]
    elif args:
        argv = [*image.entrypoint, *(expand(a, env) for a in args)]
    else:
        argv = [*image.entrypoint, *image.args]
    if not argv:
        raise PodStartError(REASON_START, "no command specified: the image has no entrypoint")
    return argv
