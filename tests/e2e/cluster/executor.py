"""The pod executor: the kubelet stand-in of the local e2e control plane (test/dev only).

It claims unbound Pending pods, runs their container as a local process inside bubblewrap (see
``sandbox.py``) and writes kubelet-compatible pod status, so the real Job/CronJob/Deployment
controllers see pods start, finish, fail and terminate. Run it as

    PYTHONSAFEPATH=1 PYTHONPATH=tests python -m e2e.cluster.executor \
        --kubeconfig K --state-dir D [--images images.json] [--ready-file F]

(the repository root must not be on ``sys.path``: ``operator/`` would shadow the stdlib), or from
Python with ``run_executor()``. SIGTERM/SIGINT stop it: every container is killed, its pod marked
Failed, and the process exits 0.

Deliberate differences from a kubelet, each chosen to keep tests simple and honest:

* Pods are never bound (``spec.nodeName`` stays empty, recipe 3.2): the apiserver deletes them at
  once, only finalizers keep them; PodScheduled=True is written for readability only.
* One container and no init containers; anything else fails the pod with reason
  UnsupportedPodSpec instead of running something different. ``restartPolicy`` Always/OnFailure
  (Deployments) restart the container in place with the kubelet's CrashLoopBackOff delays
  (at once, then 10 s doubling to 5 min); the log file keeps every run's output.
* Images are not pulled: an image table maps repository names to local entry points. An unknown
  image, a missing Secret/ConfigMap/key or an impossible mount fails the pod *at once* (phase
  Failed, container terminated with exit code 128, like a runc StartError) where a kubelet would
  retry forever with the pod Pending; a Failed pod keeps Job controllers moving.
* The root filesystem is the host's, always read-only; /tmp (world-writable unless
  ``readOnlyRootFilesystem``) and /run are private tmpfs. Mount paths must lie below /tmp, /run,
  /var/run or /dev, below a writable emptyDir mount, or exist on the host.
* Without ``runAsUser`` the container runs as uid 65534 (a kubelet would use the image's USER;
  running as host root is too dangerous); ``runAsGroup`` defaults to 65534 (0 for uid 0).
  Explicit uid 0 gets Docker's default capabilities. ``no_new_privs`` is on unless
  ``allowPrivilegeEscalation: true``.
* Resources are not enforced; downward-API limits default to the host's capacity.
* The network is the host's: no pod IP (``status.podIP`` is empty), ports are shared, and only the
  ``kubernetes`` service is exported as KUBERNETES_SERVICE_*/KUBERNETES_PORT* (pointing at the real
  apiserver, since there is no kube-proxy).
* Projected service-account tokens are requested once (TokenRequest), never rotated.
* Container logs are raw stdout+stderr in ``<state>/pods/<ns>/<pod>/<container>.log`` (no CRI
  timestamps); the executor's own actions go to ``<state>/executor.log``, never secret values.
* The executor must run as root (it switches each container's uid with setpriv); its state dir
  is hidden from containers, whose view of the host is otherwise the read-only root.
* A termination grace period below 2 s is raised to 2 s (the kubelet's minimum); on executor
  shutdown at most 5 s are granted.
"""

from __future__ import annotations

import argparse
import base64
import binascii
import contextlib
import json
import logging
import os
import posixpath
import pwd
import re
import selectors
import shutil
import signal
import subprocess
import sys
import threading
import time
import urllib.parse
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import UTC, datetime
from decimal import ROUND_CEILING, Decimal, InvalidOperation
from pathlib import Path
from typing import Any, Protocol

from e2e.cluster import sandbox, tools

JSON = dict[str, Any]

log = logging.getLogger("nocturne.executor")

REPO_ROOT = Path(__file__).resolve().parents[3]
TESTS_DIR = REPO_ROOT / "tests"

NOBODY = 65534
DEFAULT_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
DEFAULT_TERMINATION_MESSAGE_PATH = "/dev/termination-log"
DEFAULT_GRACE_SECONDS = 30
MIN_GRACE_SECONDS = 2  # the kubelet's minimumGracePeriodInSeconds
SHUTDOWN_GRACE_SECONDS = 5
# pkg/kubelet/container/runtime.go
MAX_TERMINATION_MESSAGE_BYTES = 4096
FALLBACK_LOG_LINES = 80
FALLBACK_LOG_BYTES = 2048

# Container (and pod) reasons this executor reports; CamelCase like the kubelet's.
REASON_IMAGE = "ErrImageNotMapped"
REASON_CONFIG = "CreateContainerConfigError"
REASON_UNSUPPORTED = "UnsupportedPodSpec"
REASON_START = "StartError"
REASON_INTERNAL = "CreateContainerError"
REASON_DEADLINE = "DeadlineExceeded"
REASON_STOPPED = "ExecutorStopped"
DEADLINE_MESSAGE = "Pod was active on the node longer than the specified deadline"
START_FAILURE_EXIT_CODE = 128  # what runc reports for a container that never started
CRASHLOOP_BASE_SECONDS = 10
CRASHLOOP_MAX_SECONDS = 300
CRASHLOOP_RESET_SECONDS = 600

_PROJECTED_TOKEN_DEFAULT_EXPIRY = 3600


# --------------------------------------------------------------------------- errors and JSON


class PodStartError(Exception):
    """The pod cannot run; ``reason`` and ``message`` go to its container and pod status."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason
        self.message = message


def _config_error(message: str) -> PodStartError:
    return PodStartError(REASON_CONFIG, message)


def _map(obj: Mapping[str, Any], key: str) -> JSON:
    value = obj.get(key)
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise PodStartError(REASON_INTERNAL, f"malformed pod: {key} is not an object")
    return value


def _items(obj: Mapping[str, Any], key: str) -> list[JSON]:
    value = obj.get(key)
    if value is None:
        return []
    if not isinstance(value, list) or not all(isinstance(v, dict) for v in value):
        raise PodStartError(REASON_INTERNAL, f"malformed pod: {key} is not a list of objects")
    return value


def _text(obj: Mapping[str, Any], key: str, default: str = "") -> str:
    value = obj.get(key)
    if value is None:
        return default
    if not isinstance(value, str):
        raise PodStartError(REASON_INTERNAL, f"malformed pod: {key} is not a string")
    return value


def _strings(obj: Mapping[str, Any], key: str) -> list[str]:
    value = obj.get(key)
    if value is None:
        return []
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise PodStartError(REASON_INTERNAL, f"malformed pod: {key} is not a list of strings")
    return value


def _opt_int(obj: Mapping[str, Any], key: str) -> int | None:
    value = obj.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        raise PodStartError(REASON_INTERNAL, f"malformed pod: {key} is not an integer")
    return value


def _opt_bool(obj: Mapping[str, Any], key: str) -> bool | None:
    value = obj.get(key)
    if value is None:
        return None
    if not isinstance(value, bool):
        raise PodStartError(REASON_INTERNAL, f"malformed pod: {key} is not a boolean")
    return value


def _str_map(obj: Mapping[str, Any], key: str) -> dict[str, str]:
    value = _map(obj, key)
    return {str(k): str(v) for k, v in value.items()}


@dataclass(frozen=True)
class PodKey:
    """Identity of one pod incarnation (a recreated pod of the same name has a new uid)."""

    namespace: str
    name: str
    uid: str

    @classmethod
    def of(cls, pod: Mapping[str, Any]) -> PodKey:
        meta = _map(pod, "metadata")
        return cls(_text(meta, "namespace"), _text(meta, "name"), _text(meta, "uid"))

    def __str__(self) -> str:
        return f"{self.namespace}/{self.name}"


def now_rfc3339() -> str:
    """Current time as the API serialises metav1.Time (seconds, UTC, 'Z')."""
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


# --------------------------------------------------------------------------- image table


@dataclass(frozen=True)
class ImageEntry:
    """What a container image would provide: ENTRYPOINT, CMD, ENV and WORKDIR."""

    entrypoint: tuple[str, ...]
    args: tuple[str, ...] = ()
    env: tuple[tuple[str, str], ...] = ()
    working_dir: str = "/"


def default_images() -> dict[str, ImageEntry]:
    """The built-in table: Nocturne's images run from this checkout's venv; busybox is the host."""
    return {
        "nocturne-operator": ImageEntry((sys.executable, "-m", "nocturne_operator")),
        "nocturne-runner": ImageEntry((sys.executable, "-m", "agent_runner")),
        # busybox's ENTRYPOINT is empty and its CMD is ["sh"]: command/args run on the host's
        # read-only root (/bin/sh, sleep, id, ...).
        "busybox": ImageEntry((), ("sh",)),
        # The pinned kubectl of tools.py (ENTRYPOINT ["kubectl"] in registry.k8s.io/kubectl);
        # in-cluster config comes from the projected service-account volume.
        "kubectl": ImageEntry((str(tools.tools_dir() / "bin" / "kubectl"),)),
    }


def image_repository(image: str) -> str:
    """The repository part of an image reference: no tag, no digest ('a/b:1@sha256:x' -> 'a/b')."""
    ref = image.split("@", 1)[0]
    colon = ref.rfind(":")
    if colon > ref.rfind("/"):
        ref = ref[:colon]
    return ref


def _parse_entry(key: str, raw: object, source: str) -> ImageEntry:
    where = f"{source}: image {key!r}"
    if isinstance(raw, list):
        raw = {"entrypoint": raw}
    if not isinstance(raw, dict):
        raise TypeError(f"{where}: expected a list (entrypoint) or an object, got {raw!r}")
    unknown = set(raw) - {"entrypoint", "args", "env", "workingDir"}
    if unknown:
        raise ValueError(f"{where}: unknown keys {sorted(unknown)}")

    def strings(name: str) -> tuple[str, ...]:
        value = raw.get(name, [])
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise ValueError(f"{where}: {name} must be a list of strings")
        return tuple(value)

    env = raw.get("env", {})
    if not isinstance(env, dict) or not all(isinstance(v, str) for v in env.values()):
        raise ValueError(f"{where}: env must map names to strings")
    working_dir = raw.get("workingDir", "/")
    if not isinstance(working_dir, str) or not working_dir.startswith("/"):
        raise ValueError(f"{where}: workingDir must be an absolute path")
    return ImageEntry(strings("entrypoint"), strings("args"), tuple(env.items()), working_dir)


class ImageTable:
    """Maps image references to local entry points by repository name.

    A key matches an image whose repository (tag and digest stripped) equals the key or ends
    with ``/<key>``, so ``nocturne-runner`` matches ``ghcr.io/x/nocturne-runner:1.2``; the
    longest matching key wins.
    """

    def __init__(self, entries: Mapping[str, ImageEntry], source: str) -> None:
        self.entries = {image_repository(k): v for k, v in entries.items()}
        self.source = source

    @classmethod
    def load(cls, path: Path | None) -> ImageTable:
        """Defaults, extended/overridden by the JSON object in ``path`` (name -> argv | entry)."""
        entries = default_images()
        if path is None:
            return cls(entries, "the executor's built-in image table")
        raw = json.loads(path.read_text())
        if not isinstance(raw, dict):
            raise TypeError(f"{path}: expected a JSON object mapping image names to entries")
        for key, value in raw.items():
            entries[key] = _parse_entry(key, value, str(path))
        return cls(entries, f"the image table {path} (plus built-in defaults)")

    def lookup(self, image: str) -> tuple[str, ImageEntry] | None:
        """The (key, entry) for ``image``, or None if no key matches."""
        repo = image_repository(image)
        best: str | None = None
        for key in self.entries:
            if (repo == key or repo.endswith("/" + key)) and (best is None or len(key) > len(best)):
                best = key
        return None if best is None else (best, self.entries[best])


# --------------------------------------------------------------------------- $(VAR) expansion


def expand(text: str, env: Mapping[str, str]) -> str:
    """Kubernetes ``$(VAR)`` expansion (third_party/forked/golang/expansion).

    ``$(NAME)`` becomes the value of NAME, or stays as written if NAME is undefined; ``$$``
    becomes ``$``; any other ``$`` is kept.
    """
    out: list[str] = []
    i = 0
    while i < len(text):
        char = text[i]
        if char != "$" or i + 1 >= len(text):
            out.append(char)
            i += 1
            continue
        nxt = text[i + 1]
        if nxt == "$":
            out.append("$")
            i += 2
        elif nxt == "(":
            end = text.find(")", i + 2)
            if end == -1:
                out.append("$(")
                i += 2
            else:
                name = text[i + 2 : end]
                out.append(env.get(name, f"$({name})"))
                i = end + 1
        else:
            out.append("$" + nxt)
            i += 2
    return "".join(out)


# --------------------------------------------------------------------------- quantities


_SUFFIXES = {
    "Ki": Decimal(2) ** 10,
    "Mi": Decimal(2) ** 20,
    "Gi": Decimal(2) ** 30,
    "Ti": Decimal(2) ** 40,
    "Pi": Decimal(2) ** 50,
    "Ei": Decimal(2) ** 60,
    "n": Decimal("1e-9"),
    "u": Decimal("1e-6"),
    "m": Decimal("1e-3"),
    "": Decimal(1),
    "k": Decimal("1e3"),
    "M": Decimal("1e6"),
    "G": Decimal("1e9"),
    "T": Decimal("1e12"),
    "P": Decimal("1e15"),
    "E": Decimal("1e18"),
}
_QUANTITY = re.compile(r"^([+-]?[0-9.]+)([eE][+-]?[0-9]+|[KMGTPE]i|[numkMGTPE]?)$")


def parse_quantity(text: str) -> Decimal:
    """A resource.Quantity string ('250m', '1Gi', '1e3') as a Decimal."""
    match = _QUANTITY.match(text.strip())
    if match is None:
        raise ValueError(f"invalid quantity {text!r}")
    number, suffix = match.groups()
    try:
        value = Decimal(number)
    except InvalidOperation as exc:
        raise ValueError(f"invalid quantity {text!r}") from exc
    if suffix[:1] in ("e", "E"):
        return value * Decimal(10) ** int(suffix[1:])
    return value * _SUFFIXES[suffix]


def _ceil(value: Decimal) -> int:
    return int(value.to_integral_value(rounding=ROUND_CEILING))


@dataclass(frozen=True)
class HostCapacity:
    """The "node allocatable" that downward-API limits default to when a container sets none."""

    cpu: Decimal
    memory: int
    ephemeral_storage: int

    @classmethod
    def detect(cls, path: Path) -> HostCapacity:
        """Measure this host: CPU count, MemTotal, size of the filesystem holding ``path``."""
        memory = 0
        with contextlib.suppress(OSError):
            for line in Path("/proc/meminfo").read_text().splitlines():
                if line.startswith("MemTotal:"):
                    memory = int(line.split()[1]) * 1024
        return cls(Decimal(os.cpu_count() or 1), memory, shutil.disk_usage(path).total)


# --------------------------------------------------------------------------- downward API


_KEYED_FIELD = re.compile(r"^metadata\.(labels|annotations)\['(.*)'\]$")


def format_map(values: Mapping[str, str]) -> str:
    """Labels/annotations as the downward API writes them: sorted ``key="value"`` lines."""
    return "\n".join(f"{k}={json.dumps(values[k], ensure_ascii=False)}" for k in sorted(values))


def field_value(pod: Mapping[str, Any], path: str) -> str:
    """Value of a downward-API ``fieldRef.fieldPath`` for ``pod`` (unbound: no node, no IPs)."""
    meta = _map(pod, "metadata")
    spec = _map(pod, "spec")
    keyed = _KEYED_FIELD.match(path)
    if keyed:
        return _str_map(meta, keyed.group(1)).get(keyed.group(2), "")
    simple: dict[str, Callable[[], str]] = {
        "metadata.name": lambda: _text(meta, "name"),
        "metadata.namespace": lambda: _text(meta, "namespace"),
        "metadata.uid": lambda: _text(meta, "uid"),
        "metadata.labels": lambda: format_map(_str_map(meta, "labels")),
        "metadata.annotations": lambda: format_map(_str_map(meta, "annotations")),
        "spec.nodeName": lambda: _text(spec, "nodeName"),
        "spec.serviceAccountName": lambda: _text(spec, "serviceAccountName"),
        "status.hostIP": lambda: "",
        "status.hostIPs": lambda: "",
        "status.podIP": lambda: "",
        "status.podIPs": lambda: "",
    }
    if path not in simple:
        raise _config_error(f"unsupported fieldRef.fieldPath {path!r}")
    return simple[path]()


def resource_value(
    pod: Mapping[str, Any], container_name: str, ref: Mapping[str, Any], capacity: HostCapacity
) -> str:
    """Value of a ``resourceFieldRef`` like the kubelet: ceil(quantity / divisor), limits default
    to the host's capacity."""
    target = _text(ref, "containerName") or container_name
    containers = _items(_map(pod, "spec"), "containers")
    container = next((c for c in containers if _text(c, "name") == target), None)
    if container is None:
        raise _config_error(f"resourceFieldRef names unknown container {target!r}")
    resource = _text(ref, "resource")
    kind, _, name = resource.partition(".")
    if kind not in ("limits", "requests") or name not in ("cpu", "memory", "ephemeral-storage"):
        raise _config_error(f"unsupported resourceFieldRef.resource {resource!r}")
    raw_divisor = ref.get("divisor") or "1"
    try:
        divisor = parse_quantity(str(raw_divisor))
        given = _str_map(_map(container, "resources"), kind).get(name)
        quantity = parse_quantity(given) if given is not None else None
    except ValueError as exc:
        raise _config_error(f"resourceFieldRef {resource}: {exc}") from exc
    if divisor <= 0:
        raise _config_error(f"resourceFieldRef {resource}: divisor must be positive")
    if quantity is None:
        if kind == "requests":
            quantity = Decimal(0)
        elif name == "cpu":
            quantity = capacity.cpu
        elif name == "memory":
            quantity = Decimal(capacity.memory)
        else:
            quantity = Decimal(capacity.ephemeral_storage)
    if name == "cpu":
        # convertResourceCPUToString: ceil(milliValue / divisor.milliValue)
        return str(_ceil(Decimal(_ceil(quantity * 1000)) / Decimal(_ceil(divisor * 1000))))
    return str(_ceil(Decimal(_ceil(quantity)) / Decimal(_ceil(divisor))))


# --------------------------------------------------------------------------- env


class ObjectSource(Protocol):
    """Read access to the pod's Secrets and ConfigMaps; None means "not found"."""

    def secret(self, namespace: str, name: str) -> JSON | None: ...

    def config_map(self, namespace: str, name: str) -> JSON | None: ...


class TokenSource(Protocol):
    """Issues service-account tokens bound to a pod (the TokenRequest API)."""

    def service_account_token(
        self,
        namespace: str,
        service_account: str,
        *,
        audience: str,
        expiration_seconds: int,
        pod_name: str,
        pod_uid: str,
    ) -> str: ...


def _decode_secret_value(secret: str, key: str, value: object) -> bytes:
    try:
        return base64.b64decode(str(value), validate=True)
    except (binascii.Error, ValueError) as exc:
        raise _config_error(f"secret {secret!r} key {key!r} is not valid base64") from exc


class _Objects:
    """Per-pod cache so a Secret/ConfigMap is fetched once per pod start (like the kubelet)."""

    def __init__(self, source: ObjectSource, namespace: str) -> None:
        self._source = source
        self.namespace = namespace
        self._cache: dict[tuple[str, str], JSON | None] = {}

    def secret(self, namespace: str, name: str) -> JSON | None:
        """ObjectSource, cached (only for this pod's namespace)."""
        del namespace
        return self.get("secret", name)

    def config_map(self, namespace: str, name: str) -> JSON | None:
        """ObjectSource, cached (only for this pod's namespace)."""
        del namespace
        return self.get("configmap", name)

    def get(self, kind: str, name: str) -> JSON | None:
        """The Secret (kind "secret") or ConfigMap (kind "configmap"), None if missing."""
        key = (kind, name)
        if key not in self._cache:
            if kind == "secret":
                self._cache[key] = self._source.secret(self.namespace, name)
            else:
                self._cache[key] = self._source.config_map(self.namespace, name)
        return self._cache[key]

    def data(self, kind: str, name: str) -> dict[str, bytes] | None:
        """Decoded data of a Secret or ConfigMap (``data`` + ``binaryData``), None if missing."""
        obj = self.get(kind, name)
        if obj is None:
            return None
        if kind == "secret":
            return {k: _decode_secret_value(name, k, v) for k, v in _map(obj, "data").items()}
        found = {k: str(v).encode() for k, v in _map(obj, "data").items()}
        for k, v in _map(obj, "binaryData").items():
            found[k] = _decode_secret_value(name, k, v)
        return found


def _valid_env_name(name: str) -> bool:
    # RelaxedEnvironmentVariableValidation (GA in 1.34): printable ASCII without '='.
    return bool(name) and "=" not in name and all(32 <= ord(c) < 127 for c in name)


def _kind_label(kind: str) -> str:
    return "Secret" if kind == "secret" else "ConfigMap"


def _env_from(
    container: Mapping[str, Any], objects: _Objects, on_skip: Callable[[str], None] | None
) -> dict[str, str]:
    env: dict[str, str] = {}
    for ref in _items(container, "envFrom"):
        prefix = _text(ref, "prefix")
        for kind, field_name in (("configmap", "configMapRef"), ("secret", "secretRef")):
            if field_name not in ref:
                continue
            target = _map(ref, field_name)
            name = _text(target, "name")
            data = objects.data(kind, name)
            if data is None:
                if _opt_bool(target, "optional"):
                    continue
                raise _config_error(f'{kind} "{name}" not found (envFrom {field_name})')
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


def _key_ref_value(var_name: str, value_from: Mapping[str, Any], objects: _Objects) -> str | None:
    """A configMapKeyRef/secretKeyRef value; None when optional and missing."""
    kind = "secret" if "secretKeyRef" in value_from else "configmap"
    ref = _map(value_from, "secretKeyRef" if kind == "secret" else "configMapKeyRef")
    obj_name, key = _text(ref, "name"), _text(ref, "key")
    optional = bool(_opt_bool(ref, "optional"))
    data = objects.data(kind, obj_name)
    if data is None:
        if optional:
            return None
        raise _config_error(f'{kind} "{obj_name}" not found (env {var_name})')
    if key not in data:
        if optional:
            return None
        raise _config_error(
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
    namespace = _text(_map(pod, "metadata"), "namespace")
    objects = source if isinstance(source, _Objects) else _Objects(source, namespace)
    env = _env_from(container, objects, on_skip)
    for var in _items(container, "env"):
        name = _text(var, "name")
        value = _text(var, "value")
        value_from = _map(var, "valueFrom")
        resolved: str | None
        if value or not value_from:
            resolved = expand(value, {**service_env, **env})
        elif "fieldRef" in value_from:
            resolved = field_value(pod, _text(_map(value_from, "fieldRef"), "fieldPath"))
        elif "resourceFieldRef" in value_from:
            resolved = resource_value(
                pod, _text(container, "name"), _map(value_from, "resourceFieldRef"), capacity
            )
        elif "configMapKeyRef" in value_from or "secretKeyRef" in value_from:
            resolved = _key_ref_value(name, value_from, objects)
        else:
            raise _config_error(f"env {name}: unsupported valueFrom {sorted(value_from)}")
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
    command = _strings(container, "command")
    args = _strings(container, "args")
    if command:
        argv = [expand(c, env) for c in command] + [expand(a, env) for a in args]
    elif args:
        argv = [*image.entrypoint, *(expand(a, env) for a in args)]
    else:
        argv = [*image.entrypoint, *image.args]
    if not argv:
        raise PodStartError(REASON_START, "no command specified: the image has no entrypoint")
    return argv


# --------------------------------------------------------------------------- security context


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
    psc = _map(_map(pod, "spec"), "securityContext")
    csc = _map(container, "securityContext")

    def pick_int(key: str) -> int | None:
        value = _opt_int(csc, key)
        return value if value is not None else _opt_int(psc, key)

    if _opt_bool(csc, "privileged"):
        raise PodStartError(REASON_UNSUPPORTED, "privileged containers are not supported")
    run_as_user = pick_int("runAsUser")
    run_as_group = pick_int("runAsGroup")
    non_root = _opt_bool(csc, "runAsNonRoot")
    if non_root is None:
        non_root = _opt_bool(psc, "runAsNonRoot")
    uid = NOBODY if run_as_user is None else run_as_user
    if non_root and uid == 0:
        raise _config_error(
            f"container's runAsUser breaks non-root policy (pod: {PodKey.of(pod)}, "
            f"container: {_text(container, 'name')})"
        )
    # Without runAsGroup: root keeps group 0, everyone else gets nogroup (not the risky 0).
    gid = run_as_group if run_as_group is not None else (0 if uid == 0 else NOBODY)
    fs_group = _opt_int(psc, "fsGroup")
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
        read_only_root=bool(_opt_bool(csc, "readOnlyRootFilesystem")),
        no_new_privs=_opt_bool(csc, "allowPrivilegeEscalation") is not True,
    )


def _supplemental(psc: Mapping[str, Any]) -> list[int]:
    value = psc.get("supplementalGroups") or []
    if not isinstance(value, list) or not all(
        isinstance(v, int) and not isinstance(v, bool) for v in value
    ):
        raise PodStartError(REASON_INTERNAL, "malformed pod: supplementalGroups")
    return value


# --------------------------------------------------------------------------- volumes


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
        raise _config_error(f"volume {volume}: invalid item path {path!r}")
    return norm


def _mode(obj: Mapping[str, Any], key: str, default: int) -> int:
    value = _opt_int(obj, key)
    return default if value is None else value


@dataclass(frozen=True)
class VolumeSources:
    """What materialising a pod's volumes needs: the pod, who runs it, and where data lives."""

    pod: Mapping[str, Any]
    identity: Identity
    objects: _Objects
    tokens: TokenSource
    capacity: HostCapacity

    def keyed(
        self, volume: str, kind: str, ref: Mapping[str, Any], *, name_key: str, default_mode: int
    ) -> list[FileProjection]:
        """Files of a configMap/secret (volume or projected source), honouring items/optional."""
        name = _text(ref, name_key)
        optional = bool(_opt_bool(ref, "optional"))
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
            raise _config_error(f'volume {volume}: {kind} "{name}" not found{hint}')
        items = _items(ref, "items")
        if not items:
            return [
                FileProjection(_check_relative(k, volume), v, default_mode) for k, v in data.items()
            ]
        files = []
        for item in items:
            key = _text(item, "key")
            if key not in data:
                if optional:
                    continue
                raise _config_error(
                    f"volume {volume}: {kind} {name} references non-existent key: {key}"
                )
            files.append(
                FileProjection(
                    _check_relative(_text(item, "path"), volume),
                    data[key],
                    _mode(item, "mode", default_mode),
                )
            )
        return files

    def downward(
        self, volume: str, source: Mapping[str, Any], *, default_mode: int
    ) -> list[FileProjection]:
        """Files of a downwardAPI volume or projected source."""
        container_name = _text(_items(_map(self.pod, "spec"), "containers")[0], "name")
        files = []
        for item in _items(source, "items"):
            if "fieldRef" in item:
                value = field_value(self.pod, _text(_map(item, "fieldRef"), "fieldPath"))
            elif "resourceFieldRef" in item:
                value = resource_value(
                    self.pod, container_name, _map(item, "resourceFieldRef"), self.capacity
                )
            else:
                raise _config_error(f"volume {volume}: downwardAPI item without fieldRef")
            files.append(
                FileProjection(
                    _check_relative(_text(item, "path"), volume),
                    value.encode(),
                    _mode(item, "mode", default_mode),
                )
            )
        return files

    def token(self, volume: str, source: Mapping[str, Any], *, default_mode: int) -> FileProjection:
        """A projected serviceAccountToken: a real TokenRequest bound to the pod."""
        meta = _map(self.pod, "metadata")
        token = self.tokens.service_account_token(
            _text(meta, "namespace"),
            _text(_map(self.pod, "spec"), "serviceAccountName", "default"),
            audience=_text(source, "audience"),
            expiration_seconds=_opt_int(source, "expirationSeconds")
            or _PROJECTED_TOKEN_DEFAULT_EXPIRY,
            pod_name=_text(meta, "name"),
            pod_uid=_text(meta, "uid"),
        )
        identity = self.identity
        # projected.go: with an fsUser (explicit non-root runAsUser) or fsGroup the token file
        # is 0600 and owned by that user.
        special = (identity.explicit_uid and identity.uid != 0) or identity.fs_group is not None
        return FileProjection(
            _check_relative(_text(source, "path"), volume),
            token.encode(),
            0o600 if special else default_mode,
            identity.uid if special else None,
        )

    def files(self, volume: Mapping[str, Any]) -> list[FileProjection] | None:
        """The files of one volume, or None for an emptyDir (a plain writable directory).

        Raises ``PodStartError`` for unsupported volume types and missing objects/keys.
        """
        name = _text(volume, "name")
        if "emptyDir" in volume:
            return None
        if "configMap" in volume:
            src = _map(volume, "configMap")
            mode = _mode(src, "defaultMode", 0o644)
            return self.keyed(name, "configmap", src, name_key="name", default_mode=mode)
        if "secret" in volume:
            src = _map(volume, "secret")
            mode = _mode(src, "defaultMode", 0o644)
            return self.keyed(name, "secret", src, name_key="secretName", default_mode=mode)
        if "downwardAPI" in volume:
            src = _map(volume, "downwardAPI")
            return self.downward(name, src, default_mode=_mode(src, "defaultMode", 0o644))
        if "projected" not in volume:
            kinds = sorted(k for k in volume if k != "name")
            raise PodStartError(
                REASON_UNSUPPORTED,
                f"volume {name}: type {kinds} is not supported by the local executor "
                "(supported: emptyDir, configMap, secret, downwardAPI, projected)",
            )
        projected = _map(volume, "projected")
        mode = _mode(projected, "defaultMode", 0o644)
        files: list[FileProjection] = []
        for src in _items(projected, "sources"):
            if "configMap" in src:
                cm = _map(src, "configMap")
                files += self.keyed(name, "configmap", cm, name_key="name", default_mode=mode)
            elif "secret" in src:
                sec = _map(src, "secret")
                files += self.keyed(name, "secret", sec, name_key="name", default_mode=mode)
            elif "downwardAPI" in src:
                files += self.downward(name, _map(src, "downwardAPI"), default_mode=mode)
            elif "serviceAccountToken" in src:
                files.append(self.token(name, _map(src, "serviceAccountToken"), default_mode=mode))
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
    for vm in _items(container, "volumeMounts"):
        name = _text(vm, "name")
        vol = volumes.get(name)
        if vol is None:
            raise _config_error(f"volumeMount {name}: no volume of that name in the pod")
        sub = _text(vm, "subPath")
        if not sub and vm.get("subPathExpr"):
            sub = expand(_text(vm, "subPathExpr"), env)
        source = vol.path
        if sub:
            source = vol.path / _check_relative(sub, name)
            if not source.exists():
                if not vol.writable:
                    raise _config_error(f"volumeMount {name}: subPath {sub!r} does not exist")
                source.mkdir(parents=True, mode=0o777)
                source.chmod(0o777)
        try:
            target = (
                sandbox.resolve_target(_text(vm, "mountPath"), readlink)
                if readlink is not None
                else sandbox.resolve_target(_text(vm, "mountPath"))
            )
        except sandbox.MountTargetError as exc:
            raise _config_error(f"volumeMount {name}: {exc}") from exc
        read_only = bool(_opt_bool(vm, "readOnly")) or not vol.writable
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
            raise _config_error(str(exc)) from exc
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
    path = _text(container, "terminationMessagePath", DEFAULT_TERMINATION_MESSAGE_PATH)
    try:
        target = sandbox.resolve_target(path)
        writable = [m.target for m in mounts if not m.read_only]
        sandbox.check_target(target, is_dir=False, host_kind=host_kind, writable_parents=writable)
    except sandbox.MountTargetError as exc:
        raise _config_error(f"terminationMessagePath: {exc}") from exc
    return sandbox.Mount(str(host_file), target, read_only=False)


# --------------------------------------------------------------------------- termination message


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


# --------------------------------------------------------------------------- status documents


def merge_conditions(
    existing: Sequence[Mapping[str, Any]],
    updates: Sequence[tuple[str, bool, str | None, str | None]],
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


def _pod_conditions(pod: Mapping[str, Any]) -> list[JSON]:
    return _items(_map(pod, "status"), "conditions")


def _not_ready(container: str) -> tuple[str, str]:
    return "ContainersNotReady", f"containers with unready status: [{container}]"


@dataclass(frozen=True)
class ContainerInfo:
    """The container facts every status document repeats."""

    name: str
    image: str
    image_id: str


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


@dataclass(frozen=True)
class History:
    """Earlier runs of a restarted container (restartPolicy Always/OnFailure)."""

    restart_count: int = 0
    last: Termination | None = None


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


def _pod_start(pod: Mapping[str, Any], default: str) -> str:
    return _text(_map(pod, "status"), "startTime") or default


def claimed_status(pod: Mapping[str, Any], info: ContainerInfo, now: str) -> JSON:
    """Pending + ContainerCreating, as a kubelet reports a pod it accepted."""
    reason, message = _not_ready(info.name)
    return {
        "phase": "Pending",
        "startTime": _pod_start(pod, now),
        "conditions": merge_conditions(
            _pod_conditions(pod),
            [
                ("PodScheduled", True, None, None),
                ("Initialized", True, None, None),
                ("ContainersReady", False, reason, message),
                ("Ready", False, reason, message),
            ],
            now,
        ),
        "containerStatuses": [
            _container_status(
                info,
                {"waiting": {"reason": "ContainerCreating"}},
                History(),
                ready=False,
                image_id=False,
            )
        ],
    }


def running_status(
    pod: Mapping[str, Any],
    info: ContainerInfo,
    pid: int,
    started_at: str,
    now: str,
    *,
    history: History = History(),
) -> JSON:
    """Running, Ready: what the Job controller counts in ``status.ready``."""
    return {
        "phase": "Running",
        "startTime": _pod_start(pod, started_at),
        "conditions": merge_conditions(
            _pod_conditions(pod),
            [
                ("PodReadyToStartContainers", True, None, None),
                ("PodScheduled", True, None, None),
                ("Initialized", True, None, None),
                ("ContainersReady", True, None, None),
                ("Ready", True, None, None),
            ],
            now,
        ),
        "containerStatuses": [
            _container_status(
                info,
                {"running": {"startedAt": started_at}},
                history,
                ready=True,
                container_id=f"local://{pid}",
            )
        ],
    }


def backoff_status(
    pod: Mapping[str, Any], info: ContainerInfo, delay: float, history: History, now: str
) -> JSON:
    """Running pod whose container waits in CrashLoopBackOff before its next restart."""
    key = PodKey.of(pod)
    reason, message = _not_ready(info.name)
    waiting = {
        "reason": "CrashLoopBackOff",
        "message": f"back-off {delay:.0f}s restarting failed container={info.name} "
        f"pod={key.name}_{key.namespace}({key.uid})",
    }
    return {
        "phase": "Running",
        "startTime": _pod_start(pod, now),
        "conditions": merge_conditions(
            _pod_conditions(pod),
            [
                ("PodScheduled", True, None, None),
                ("Initialized", True, None, None),
                ("ContainersReady", False, reason, message),
                ("Ready", False, reason, message),
            ],
            now,
        ),
        "containerStatuses": [_container_status(info, {"waiting": waiting}, history, ready=False)],
    }


def terminated_status(
    pod: Mapping[str, Any],
    info: ContainerInfo,
    term: Termination,
    history: History = History(),
) -> JSON:
    """Succeeded (exit 0) or Failed, container ``state.terminated``, Ready=False.

    ``podFailurePolicy.onExitCodes`` reads exactly ``state.terminated.exitCode``.
    """
    succeeded = term.exit_code == 0 and not term.force_failed
    completed = "PodCompleted"
    status: JSON = {
        "phase": "Succeeded" if succeeded else "Failed",
        "startTime": _pod_start(pod, term.started_at),
        "conditions": merge_conditions(
            _pod_conditions(pod),
            [
                ("PodReadyToStartContainers", False, None, None),
                ("PodScheduled", True, None, None),
                ("Initialized", True, None, None),
                ("ContainersReady", False, completed, None),
                ("Ready", False, completed, None),
            ],
            term.finished_at,
        ),
        "containerStatuses": [
            _container_status(
                info, term.state(), history, ready=False, container_id=term.container_id
            )
        ],
    }
    if term.pod_reason:
        status["reason"] = term.pod_reason
    if term.pod_message:
        status["message"] = term.pod_message
    return status


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


def pod_hostname(pod: Mapping[str, Any]) -> str:
    """``spec.hostname`` or the pod name, cut to 63 characters like the kubelet does (a longer
    name cannot be a hostname; Job pods of long CronJob names get there)."""
    name = _text(_map(pod, "spec"), "hostname") or _text(_map(pod, "metadata"), "name")
    return name[:63].rstrip("-.") if len(name) > 63 else name


def grace_seconds(pod: Mapping[str, Any]) -> int:
    """Deletion grace: min(deletionGracePeriodSeconds, terminationGracePeriodSeconds (30)),
    at least the kubelet's 2 s minimum."""
    meta = _map(pod, "metadata")
    spec = _map(pod, "spec")
    termination = _opt_int(spec, "terminationGracePeriodSeconds")
    grace = DEFAULT_GRACE_SECONDS if termination is None else termination
    deletion = _opt_int(meta, "deletionGracePeriodSeconds")
    if deletion is not None:
        grace = min(grace, deletion)
    return max(MIN_GRACE_SECONDS, grace)


def unsupported_reason(pod: Mapping[str, Any]) -> str | None:
    """Why this executor cannot run ``pod`` faithfully, or None."""
    spec = _map(pod, "spec")
    policy = _text(spec, "restartPolicy", "Always")
    if policy not in ("Always", "OnFailure", "Never"):
        return f"restartPolicy {policy!r} is not one of Always, OnFailure, Never"
    if _items(spec, "initContainers"):
        return "initContainers are not supported by the local executor"
    containers = _items(spec, "containers")
    if len(containers) != 1:
        names = [_text(c, "name") for c in containers]
        return f"the local executor runs exactly one container per pod, this pod has {names}"
    return None


# --------------------------------------------------------------------------- Kubernetes API


class ApiError(Exception):
    """An API call failed; ``status`` is the HTTP status, None for transport errors."""

    def __init__(self, status: int | None, message: str) -> None:
        super().__init__(message)
        self.status = status


def _load_json(raw: bytes) -> JSON:
    doc = json.loads(raw) if raw else {}
    if not isinstance(doc, dict):
        raise ApiError(None, "the apiserver answered with non-object JSON")
    return doc


class KubeApi:
    """The few raw JSON calls the executor makes, through the official client's auth and TLS.

    Raw dicts (not the generated models) keep unknown fields intact and the typing contained.
    """

    def __init__(self, kubeconfig: Path) -> None:
        from kubernetes import config  # noqa: PLC0415 - keeps the unit tests' import cheap

        self._client: Any = config.new_client_from_config(config_file=str(kubeconfig))
        self.server: str = str(self._client.configuration.host)

    def close(self) -> None:
        """Release the connection pool."""
        self._client.close()

    def _send(
        self,
        method: str,
        path: str,
        *,
        query: Sequence[tuple[str, str]] = (),
        body: JSON | None = None,
        content_type: str = "application/json",
        timeout: float | tuple[float, float] = (5.0, 30.0),
    ) -> Any:
        from kubernetes.client.exceptions import ApiException  # noqa: PLC0415

        headers = {"Accept": "application/json"}
        if body is not None:
            headers["Content-Type"] = content_type
        try:
            request = self._client.param_serialize(
                method=method,
                resource_path=path,
                query_params=list(query),
                header_params=headers,
                body=body,
                auth_settings=["BearerToken"],
            )
            response = self._client.call_api(*request, _request_timeout=timeout)
        except ApiException as exc:
            raise ApiError(exc.status, f"{method} {path}: {exc.status} {exc.reason}") from exc
        except Exception as exc:  # urllib3/ssl/socket errors: transient for our purposes
            raise ApiError(None, f"{method} {path}: {type(exc).__name__}: {exc}") from exc
        raw = response.response
        if not 200 <= raw.status <= 299:
            data = raw.data
            raw.release_conn()
            message = data.decode(errors="replace")[:500]
            raise ApiError(raw.status, f"{method} {path}: {raw.status} {message}")
        return raw

    def request(self, method: str, path: str, **kwargs: Any) -> JSON:
        """One call; the decoded JSON object. Raises ``ApiError``."""
        raw = self._send(method, path, **kwargs)
        try:
            data: bytes = raw.data
        except Exception as exc:
            raise ApiError(None, f"{method} {path}: reading the answer: {exc}") from exc
        finally:
            raw.release_conn()
        return _load_json(data)

    def _get_or_none(self, path: str) -> JSON | None:
        try:
            return self.request("GET", path)
        except ApiError as exc:
            if exc.status == 404:
                return None
            raise

    def get_pod(self, namespace: str, name: str) -> JSON | None:
        """The pod, or None if it no longer exists."""
        return self._get_or_none(f"/api/v1/namespaces/{namespace}/pods/{name}")

    def secret(self, namespace: str, name: str) -> JSON | None:
        """The Secret, or None if it does not exist."""
        return self._get_or_none(f"/api/v1/namespaces/{namespace}/secrets/{name}")

    def config_map(self, namespace: str, name: str) -> JSON | None:
        """The ConfigMap, or None if it does not exist."""
        return self._get_or_none(f"/api/v1/namespaces/{namespace}/configmaps/{name}")

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
        """A TokenRequest bound to the pod, like the kubelet's token manager asks for."""
        body = {
            "apiVersion": "authentication.k8s.io/v1",
            "kind": "TokenRequest",
            "spec": {
                # Empty audiences = the apiserver's own (the kubelet sends none for "").
                "audiences": [audience] if audience else [],
                "expirationSeconds": expiration_seconds,
                "boundObjectRef": {
                    "apiVersion": "v1",
                    "kind": "Pod",
                    "name": pod_name,
                    "uid": pod_uid,
                },
            },
        }
        try:
            answer = self.request(
                "POST",
                f"/api/v1/namespaces/{namespace}/serviceaccounts/{service_account}/token",
                body=body,
            )
        except ApiError as exc:
            if exc.status in (400, 403, 404, 422):
                raise _config_error(
                    f"token for serviceaccount {namespace}/{service_account}: {exc}"
                ) from exc
            raise
        token = _map(answer, "status").get("token")
        if not isinstance(token, str) or not token:
            raise _config_error(f"TokenRequest for {namespace}/{service_account} returned no token")
        return token

    def patch_pod_status(self, namespace: str, name: str, body: JSON) -> None:
        """JSON merge patch on pods/status (lists such as containerStatuses are replaced)."""
        self.request(
            "PATCH",
            f"/api/v1/namespaces/{namespace}/pods/{name}/status",
            body=body,
            content_type="application/merge-patch+json",
        )

    def list_pods(self, field_selector: str) -> tuple[list[JSON], str]:
        """All pods matching ``field_selector`` and the list's resourceVersion."""
        doc = self.request(
            "GET", "/api/v1/pods", query=[("fieldSelector", field_selector)], timeout=(5.0, 60.0)
        )
        items = doc.get("items") or []
        rv = _text(_map(doc, "metadata"), "resourceVersion")
        return [i for i in items if isinstance(i, dict)], rv

    def watch_pods(self, field_selector: str, resource_version: str, timeout: int) -> WatchStream:
        """A watch from ``resource_version`` (server closes it after ``timeout`` seconds)."""
        raw = self._send(
            "GET",
            "/api/v1/pods",
            query=[
                ("fieldSelector", field_selector),
                ("watch", "true"),
                ("allowWatchBookmarks", "true"),
                ("resourceVersion", resource_version),
                ("timeoutSeconds", str(timeout)),
            ],
            timeout=(5.0, timeout + 30.0),
        )
        return WatchStream(raw)


class WatchStream:
    """Newline-delimited watch events from a streaming response; ``close()`` works from any
    thread and ends the iteration."""

    def __init__(self, raw: Any) -> None:
        self._raw = raw
        self._closed = threading.Event()

    def close(self) -> None:
        """Interrupt a blocked read (urllib3 >= 2.3 ``shutdown``) and release the connection."""
        if self._closed.is_set():
            return
        self._closed.set()
        with contextlib.suppress(Exception):
            self._raw.shutdown()
        with contextlib.suppress(Exception):
            self._raw.release_conn()

    def __iter__(self) -> Iterator[JSON]:
        buffer = b""
        try:
            for chunk in self._raw.stream(amt=None, decode_content=True):
                if self._closed.is_set():
                    return
                buffer += chunk
                while b"\n" in buffer:
                    line, buffer = buffer.split(b"\n", 1)
                    if line.strip():
                        yield _load_json(line)
        except Exception as exc:
            if self._closed.is_set():
                return
            raise ApiError(None, f"watch stream broke: {type(exc).__name__}: {exc}") from exc
        finally:
            self.close()


# --------------------------------------------------------------------------- running pods


@dataclass
class PodRun:
    """One claimed pod. Fields are guarded by ``Executor._lock``; ``status_lock`` orders this
    pod's status writes (claimed -> running -> backoff/running ... -> terminated).

    States: starting (``busy``, no process) -> running (``proc`` alive) -> backoff
    (``restart_at`` set) -> restarting (``busy``) -> running ... -> forgotten.
    """

    key: PodKey
    pod_dir: Path
    info: ContainerInfo | None = None
    log_path: Path | None = None
    term_path: Path | None = None
    message_policy: str = "File"
    restart_policy: str = "Never"
    plan: LaunchPlan | None = None
    proc: subprocess.Popen[bytes] | None = None
    pidfd: int | None = None
    started_at: str = ""
    started_mono: float = 0.0
    instance: int = 0  # bumped on every (re)start; stale backoff writes are skipped
    busy: bool = True  # a start/restart task is in flight
    history: History = field(default_factory=History)
    pending: Termination | None = None  # the last exit, until the restart happens
    backoff_level: int = 0
    restart_at: float | None = None  # monotonic
    deadline: float | None = None  # monotonic; pod activeDeadlineSeconds
    kill_at: float | None = None  # monotonic; SIGKILL once terminating
    termination_grace: int = DEFAULT_GRACE_SECONDS
    stopping: bool = False
    stop_reason: str = ""
    stop_message: str = ""
    force_failed: bool = False
    gone: bool = False
    status_lock: threading.Lock = field(default_factory=threading.Lock)

    @property
    def private_dir(self) -> Path:
        """Volumes and termination-log of this incarnation (removed when it finishes)."""
        return self.pod_dir / f"uid-{self.key.uid}"

    def info_or_fail(self) -> ContainerInfo:
        """The container facts; set before any status write."""
        if self.info is None:
            raise RuntimeError(f"{self.key}: container info missing")
        return self.info

    def alive(self) -> bool:
        """A container process exists and has not been reaped."""
        return self.proc is not None and self.proc.returncode is None

    def final(self, term: Termination) -> Termination:
        """``term`` with the pod-level reason of why the pod is being stopped, if any."""
        return Termination(
            term.exit_code,
            term.reason,
            term.message,
            term.started_at,
            term.finished_at,
            term.container_id,
            self.stop_reason or term.pod_reason,
            self.stop_message or term.pod_message,
            self.force_failed or term.force_failed,
        )


@dataclass(frozen=True)
class LaunchPlan:
    """A fully prepared container start: the bwrap argv and the process environment."""

    command: list[str]
    env: dict[str, str]
    uid: int
    argv0: str


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


class Executor:
    """Claims pods, runs them, reports status. Threads: one watcher, one supervisor (process
    exits and timers) and a bounded pool for API work."""

    FIELD_SELECTOR = "spec.nodeName="

    def __init__(
        self,
        api: KubeApi,
        state_dir: Path,
        images: ImageTable,
        *,
        workers: int = 8,
        bwrap: str = "bwrap",
        setpriv: str = "setpriv",
    ) -> None:
        self.api = api
        self.state_dir = state_dir
        self.images = images
        self.bwrap = bwrap
        self.setpriv = setpriv
        self.service_env = service_env(api.server)
        self.capacity = HostCapacity.detect(state_dir)
        self._runs: dict[str, PodRun] = {}
        self._unregistered: list[PodRun] = []
        self._done: set[str] = set()
        self._lock = threading.Lock()
        self._pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="executor-api")
        self._stopping = threading.Event()
        self.synced = threading.Event()
        self._wake_r, self._wake_w = os.pipe()
        os.set_blocking(self._wake_w, False)
        self._selector = selectors.DefaultSelector()
        self._selector.register(self._wake_r, selectors.EVENT_READ, None)
        self._watch: WatchStream | None = None
        self._supervisor = threading.Thread(target=self._supervise, name="executor-supervisor")
        self._watcher = threading.Thread(target=self._watch_loop, name="executor-watch")

    # ------------------------------------------------------------------ lifecycle

    def start(self) -> None:
        """Start the supervisor and the watcher threads."""
        self._supervisor.start()
        self._watcher.start()

    def shutdown(self) -> None:
        """Stop claiming, kill every container (<= 5 s grace), write their final status."""
        log.info("shutdown: stopping the watch and %d running pod(s)", len(self._runs))
        self._stopping.set()
        with self._lock:
            watch = self._watch
        if watch is not None:
            watch.close()
        self._watcher.join(timeout=30)
        with self._lock:
            runs = list(self._runs.values())
        for run in runs:
            self._terminate(
                run,
                min(run.termination_grace, SHUTDOWN_GRACE_SECONDS),
                REASON_STOPPED,
                "the local pod executor stopped while the container was running",
                force_failed=True,
            )
        self._wake()
        self._supervisor.join(timeout=SHUTDOWN_GRACE_SECONDS + 30)
        self._pool.shutdown(wait=True)
        self._selector.close()
        os.close(self._wake_r)
        os.close(self._wake_w)
        log.info("shutdown complete")

    def _wake(self) -> None:
        with contextlib.suppress(BlockingIOError, OSError):
            os.write(self._wake_w, b"x")

    # ------------------------------------------------------------------ watch

    def _watch_loop(self) -> None:
        backoff = 0.5
        rv = ""
        while not self._stopping.is_set():
            try:
                if not rv:
                    items, rv = self.api.list_pods(self.FIELD_SELECTOR)
                    self._resync(items)
                    self.synced.set()
                    log.info("listed %d unbound pod(s) at resourceVersion %s", len(items), rv)
                stream = self.api.watch_pods(self.FIELD_SELECTOR, rv, timeout=300)
                with self._lock:
                    self._watch = stream
                if self._stopping.is_set():
                    stream.close()
                for event in stream:
                    rv = self._on_event(event, rv)
                    backoff = 0.5
            except ApiError as exc:
                if self._stopping.is_set():
                    break
                if exc.status == 410:
                    log.info("watch: resourceVersion %s expired, re-listing", rv)
                    rv = ""
                    continue
                log.warning("watch: %s; retrying in %.1f s", exc, backoff)
                self._stopping.wait(backoff)
                backoff = min(backoff * 2, 10.0)
            except Exception:
                log.exception("watch: unexpected error; re-listing")
                rv = ""
                self._stopping.wait(backoff)
                backoff = min(backoff * 2, 10.0)
            finally:
                with self._lock:
                    self._watch = None

    def _on_event(self, event: JSON, rv: str) -> str:
        kind = event.get("type")
        obj = event.get("object")
        if not isinstance(obj, dict):
            return rv
        if kind == "ERROR":
            code = obj.get("code")
            raise ApiError(code if isinstance(code, int) else None, f"watch error: {obj}")
        new_rv = _text(_map(obj, "metadata"), "resourceVersion") or rv
        if kind == "BOOKMARK":
            return new_rv
        try:
            self.observe(str(kind), obj)
        except Exception:
            log.exception("observe: unexpected error for %s", obj.get("metadata", {}).get("name"))
        return new_rv

    def _resync(self, items: Sequence[JSON]) -> None:
        seen = set()
        for pod in items:
            seen.add(_text(_map(pod, "metadata"), "uid"))
            try:
                self.observe("ADDED", pod)
            except Exception:
                log.exception("resync: unexpected error")
        with self._lock:
            vanished = [r for uid, r in self._runs.items() if uid not in seen]
            self._done &= seen
        for run in vanished:
            log.info("%s: pod vanished while the executor was not watching; killing", run.key)
            run.gone = True
            self._terminate(run, MIN_GRACE_SECONDS, "", "")

    # ------------------------------------------------------------------ decisions

    def observe(self, kind: str, pod: JSON) -> None:
        """React to one pod event; must not block (API work goes to the pool)."""
        key = PodKey.of(pod)
        meta = _map(pod, "metadata")
        spec = _map(pod, "spec")
        status = _map(pod, "status")
        with self._lock:
            run = self._runs.get(key.uid)
            if kind == "DELETED":
                self._done.discard(key.uid)
        if kind == "DELETED":
            if run is not None:
                log.info("%s: pod deleted; killing its container", key)
                run.gone = True
                self._terminate(run, MIN_GRACE_SECONDS, "", "")
            return
        if run is not None:
            if meta.get("deletionTimestamp"):
                self._terminate(run, grace_seconds(pod), "", "")
            return
        if self._stopping.is_set() or _text(spec, "nodeName"):
            return
        with self._lock:
            if key.uid in self._done:
                return
        phase = _text(status, "phase")
        if phase == "Pending" and not meta.get("deletionTimestamp"):
            self._claim(key, pod)
        elif phase == "Running" and self._ran_locally(status):
            self._orphaned(key, pod)

    @staticmethod
    def _ran_locally(status: Mapping[str, Any]) -> bool:
        # imageID is local://<table key> in every status this executor writes after a start.
        return any(
            str(c.get("imageID", "")).startswith("local://")
            for c in _items(status, "containerStatuses")
        )

    def _pod_dir(self, key: PodKey) -> Path:
        return self.state_dir / "pods" / key.namespace / key.name

    def _claim(self, key: PodKey, pod: JSON) -> None:
        run = PodRun(key, self._pod_dir(key))
        with self._lock:
            if key.uid in self._runs or key.uid in self._done:
                return
            self._runs[key.uid] = run
        log.info("%s: claimed (uid %s)", key, key.uid)
        self._pool.submit(self._start, run, pod)

    def _orphaned(self, key: PodKey, pod: JSON) -> None:
        with self._lock:
            self._done.add(key.uid)
        log.info("%s: Running with a local container from an earlier executor; marking Failed", key)
        run = PodRun(key, self._pod_dir(key))
        containers = _items(_map(pod, "spec"), "containers")
        name = _text(containers[0], "name") if containers else "main"
        image = _text(containers[0], "image") if containers else ""
        run.info = ContainerInfo(name, image, "")
        term = lost_termination(
            now_rfc3339(),
            REASON_STOPPED,
            "the local pod executor that ran this container stopped; the process is gone",
        )
        self._pool.submit(self._write_terminated, run, term)

    # ------------------------------------------------------------------ start

    def _start(self, run: PodRun, pod: JSON) -> None:
        with run.status_lock:
            try:
                self._start_locked(run, pod)
            except PodStartError as exc:
                self._reject(run, pod, exc.reason, exc.message)
            except Exception as exc:
                log.exception("%s: cannot run pod", run.key)
                self._reject(
                    run, pod, REASON_INTERNAL, f"the local executor could not run this pod: {exc!r}"
                )

    def _reject(self, run: PodRun, pod: JSON, reason: str, message: str) -> None:
        log.info("%s: failed before start: %s: %s", run.key, reason, message)
        if run.info is None:
            containers = pod.get("spec", {}).get("containers") or [{}]
            first = containers[0] if isinstance(containers[0], dict) else {}
            run.info = ContainerInfo(
                str(first.get("name") or "main"), str(first.get("image") or ""), ""
            )
        if not run.gone:
            self._write_terminated(run, rejected_termination(reason, message, now_rfc3339()))
        self._forget(run)

    def _start_locked(self, run: PodRun, pod: JSON) -> None:
        container, image_key, entry = self._admit(run, pod)
        if not self._write_status(
            run, lambda p: claimed_status(p, run.info_or_fail(), now_rfc3339())
        ):
            self._forget(run)
            return
        spec = _map(pod, "spec")
        claimed_at = time.monotonic()
        grace = _opt_int(spec, "terminationGracePeriodSeconds")
        run.termination_grace = max(
            MIN_GRACE_SECONDS, DEFAULT_GRACE_SECONDS if grace is None else grace
        )
        run.restart_policy = _text(spec, "restartPolicy", "Always")
        run.plan = self._prepare(run, pod, container, entry)
        active_deadline = _opt_int(spec, "activeDeadlineSeconds")
        if active_deadline is not None:
            # The kubelet counts from status.startTime, i.e. from the claim.
            run.deadline = claimed_at + active_deadline
            if time.monotonic() >= run.deadline:
                raise PodStartError(REASON_DEADLINE, DEADLINE_MESSAGE)
        pid = self._launch(run, run.plan, append=False)
        if pid is None:
            self._not_launched(run)
            return
        log.info(
            "%s: started pid %d as uid %d: image %s -> %s",
            run.key,
            pid,
            run.plan.uid,
            image_key,
            run.plan.argv0,
        )
        history = run.history
        self._write_status(
            run,
            lambda p: running_status(
                p, run.info_or_fail(), pid, run.started_at, now_rfc3339(), history=history
            ),
        )

    def _admit(self, run: PodRun, pod: JSON) -> tuple[JSON, str, ImageEntry]:
        """Checks that need no API call: supported shape, known image."""
        problem = unsupported_reason(pod)
        containers = _items(_map(pod, "spec"), "containers")
        container = containers[0] if containers else {}
        name = _text(container, "name")
        image = _text(container, "image")
        run.info = ContainerInfo(name, image, "")
        if problem is not None:
            raise PodStartError(REASON_UNSUPPORTED, problem)
        found = self.images.lookup(image)
        if found is None:
            raise PodStartError(
                REASON_IMAGE,
                f"image {image!r} is not in {self.images.source}; known repositories: "
                f"{sorted(self.images.entries)} (pass --images FILE.json to add one)",
            )
        image_key, entry = found
        program = entry.entrypoint[0] if entry.entrypoint else ""
        if program.startswith("/") and not os.path.exists(program):
            raise PodStartError(
                REASON_IMAGE,
                f"image {image!r} maps to {program}, which does not exist on this host "
                f"({self.images.source})",
            )
        run.info = ContainerInfo(name, image, f"local://{image_key}")
        return container, image_key, entry

    def _prepare(self, run: PodRun, pod: JSON, container: JSON, entry: ImageEntry) -> LaunchPlan:
        """Resolve env, materialise volumes and build the sandbox command line."""
        spec = _map(pod, "spec")
        name = _text(container, "name")
        identity = container_identity(pod, container)
        pod_dir = run.pod_dir
        pod_dir.mkdir(parents=True, exist_ok=True)
        pod_dir.chmod(0o700)  # secrets live below; containers see only what is bound in
        (pod_dir / "uid").write_text(run.key.uid + "\n")
        # Volumes and the termination-log are per pod *incarnation*: a pod recreated under the
        # same name must not share them with one that is still stopping.
        private = run.private_dir
        shutil.rmtree(private, ignore_errors=True)
        private.mkdir(mode=0o700)
        volumes_dir = private / "volumes"
        objects = _Objects(self.api, run.key.namespace)
        env = resolve_env(
            pod,
            container,
            objects,
            self.service_env,
            self.capacity,
            on_skip=lambda msg: log.info("%s: %s", run.key, msg),
        )
        sources = VolumeSources(pod, identity, objects, self.api, self.capacity)
        volumes: dict[str, VolumeDir] = {}
        for volume in _items(spec, "volumes"):
            vname = _text(volume, "name")
            files = sources.files(volume)
            path = volumes_dir / vname
            if files is None:
                make_empty_dir(path, identity.fs_group)
                volumes[vname] = VolumeDir(path, writable=True)
            else:
                write_volume(path, files, identity.fs_group)
                volumes[vname] = VolumeDir(path, writable=False)
        mounts = container_mounts(container, volumes, env)
        run.log_path = pod_dir / f"{name}.log"
        run.term_path = private / f"{name}.termination-log"
        run.term_path.write_bytes(b"")
        run.term_path.chmod(0o666)  # the kubelet's makeMounts does the same for non-root users
        mounts.append(termination_log_mount(container, run.term_path, mounts))
        run.message_policy = _text(container, "terminationMessagePolicy", "File")
        hostname = pod_hostname(pod)
        final_env = container_environment(hostname, entry, env, identity.uid)
        argv = container_argv(entry, container, final_env)
        working_dir = _text(container, "workingDir") or entry.working_dir
        spec_sandbox = sandbox.SandboxSpec(
            argv=argv,
            uid=identity.uid,
            gid=identity.gid,
            groups=identity.groups,
            hostname=hostname,
            working_dir=working_dir,
            mounts=mounts,
            host_paths=host_paths_for(
                argv[0], final_env.get("PATH", DEFAULT_PATH), working_dir, self.state_dir
            ),
            hidden=[os.path.realpath(self.state_dir)],
            writable_tmp=not identity.read_only_root,
            no_new_privs=identity.no_new_privs,
        )
        command = sandbox.build_bwrap_argv(
            spec_sandbox,
            bwrap=self.bwrap,
            setpriv=self.setpriv,
            on_skip=lambda p, why: log.info(
                "%s: host path %s not made visible: %s", run.key, p, why
            ),
        )
        return LaunchPlan(command, final_env, identity.uid, argv[0])

    def _launch(self, run: PodRun, plan: LaunchPlan, *, append: bool) -> int | None:
        """Start the sandbox and hand it to the supervisor; None if the pod is stopping."""
        assert run.log_path is not None
        assert run.term_path is not None
        with self._lock:
            run.busy = False
            if run.stopping:
                return None
            run.term_path.write_bytes(b"")  # a new container instance gets a fresh file
            with run.log_path.open("ab" if append else "wb") as log_file:
                try:
                    proc = subprocess.Popen(
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
            run.proc = proc
            run.instance += 1
            run.started_at = now_rfc3339()
            run.started_mono = time.monotonic()
            run.pidfd = os.pidfd_open(proc.pid)
            self._unregistered.append(run)  # the selector belongs to the supervisor thread
        self._wake()
        return proc.pid

    def _not_launched(self, run: PodRun) -> None:
        """The pod began stopping before its (first) container started."""
        if run.gone:
            log.info("%s: deleted before its container started", run.key)
        elif run.stop_reason == REASON_STOPPED:
            # Executor shutdown: leave the pod Pending for the next executor to claim.
            log.info("%s: not started (executor stopping); left Pending", run.key)
            with self._lock:
                self._runs.pop(run.key.uid, None)
            return
        else:
            term = lost_termination(now_rfc3339())
            self._write_terminated(run, run.final(term))
        self._forget(run)

    # ------------------------------------------------------------------ restarts

    def _restart(self, run: PodRun) -> None:
        with run.status_lock:
            with self._lock:
                pending = run.pending
                plan = run.plan
            if pending is None or plan is None:
                return
            if run.stopping:
                with self._lock:
                    run.busy = False
                self._finish_locked(run, run.final(pending), run.history)
                return
            run.history = History(run.history.restart_count + 1, pending)
            try:
                pid = self._launch(run, plan, append=True)
            except PodStartError as exc:
                self._finish_locked(
                    run,
                    run.final(rejected_termination(exc.reason, exc.message, now_rfc3339())),
                    run.history,
                )
                return
            if pid is None:
                self._finish_locked(run, run.final(pending), run.history)
                return
            history = run.history
            log.info("%s: restarted (restart %d) as pid %d", run.key, history.restart_count, pid)
            self._write_status(
                run,
                lambda p: running_status(
                    p, run.info_or_fail(), pid, run.started_at, now_rfc3339(), history=history
                ),
            )

    def _write_backoff(self, run: PodRun, instance: int, delay: float, history: History) -> None:
        with run.status_lock:
            if run.instance != instance or run.stopping or run.gone:
                return  # already restarted or stopping: a newer status supersedes this one
            self._write_status(
                run, lambda p: backoff_status(p, run.info_or_fail(), delay, history, now_rfc3339())
            )

    # ------------------------------------------------------------------ termination

    def _terminate(
        self, run: PodRun, grace: int, reason: str, message: str, *, force_failed: bool = False
    ) -> None:
        """Begin stopping ``run``: SIGTERM now, SIGKILL after ``grace`` seconds (idempotent; an
        earlier kill deadline wins). A pod waiting to restart is finished at once."""
        signal_pid: int | None = None
        finish: Termination | None = None
        with self._lock:
            first = not run.stopping
            if first:
                run.stopping = True
                run.stop_reason, run.stop_message = reason, message
                run.force_failed = force_failed
            if run.alive():
                assert run.proc is not None
                kill_at = time.monotonic() + grace
                if run.kill_at is None or kill_at < run.kill_at:
                    run.kill_at = kill_at
                if first:
                    signal_pid = run.proc.pid
            elif first and not run.busy and run.restart_at is not None and run.pending:
                run.restart_at = None
                finish = run.final(run.pending)
        if signal_pid is not None:
            target = main_process(signal_pid)
            log.info(
                "%s: SIGTERM to pid %s, SIGKILL in %d s%s",
                run.key,
                target or signal_pid,
                grace,
                f" ({reason})" if reason else "",
            )
            with contextlib.suppress(ProcessLookupError):
                if target is not None:
                    os.kill(target, signal.SIGTERM)
                else:
                    # Not exec'd yet: nothing graceful is possible.
                    os.killpg(signal_pid, signal.SIGKILL)
        if finish is not None:
            log.info("%s: stopping while in back-off; finishing", run.key)
            self._pool.submit(self._finish, run, finish, run.history)
        self._wake()

    def _supervise(self) -> None:
        """Reap exited containers and fire deadline/restart/SIGKILL timers until shutdown."""
        while True:
            with self._lock:
                runs = list(self._runs.values())
                if self._stopping.is_set() and not runs:
                    return
                fresh, self._unregistered = self._unregistered, []
            for run in fresh:
                if run.pidfd is not None:
                    self._selector.register(run.pidfd, selectors.EVENT_READ, run)
            now = time.monotonic()
            timers = [
                t for r in runs for t in (r.deadline, r.kill_at, r.restart_at) if t is not None
            ]
            timeout = min([1.0, *(max(0.0, t - now) for t in timers)])
            for key, _ in self._selector.select(timeout):
                if key.data is None:
                    with contextlib.suppress(BlockingIOError):
                        os.read(self._wake_r, 4096)
                    continue
                run_ready: PodRun = key.data
                self._reap(run_ready)
            self._fire_timers(runs, time.monotonic())

    def _fire_timers(self, runs: Sequence[PodRun], now: float) -> None:
        for run in runs:
            if run.alive() and run.kill_at is not None and now >= run.kill_at:
                assert run.proc is not None
                log.info("%s: grace period over; SIGKILL", run.key)
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(run.proc.pid, signal.SIGKILL)
                run.kill_at = now + 5.0  # retry if it somehow survives
            elif not run.stopping and run.deadline is not None and now >= run.deadline:
                self._terminate(
                    run,
                    run.termination_grace,
                    REASON_DEADLINE,
                    DEADLINE_MESSAGE,
                    force_failed=True,
                )
            elif run.restart_at is not None and now >= run.restart_at:
                with self._lock:
                    if run.stopping or run.restart_at is None:
                        continue
                    run.restart_at = None
                    run.busy = True
                self._pool.submit(self._restart, run)

    def _reap(self, run: PodRun) -> None:
        proc = run.proc
        if proc is None or proc.poll() is None:
            return
        if run.pidfd is not None:
            self._selector.unregister(run.pidfd)
            os.close(run.pidfd)
            run.pidfd = None
        # The PID namespace dies with bwrap, but a setsid'd process could still hold the
        # process group: make sure nothing of this container survives.
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, signal.SIGKILL)
        code = exit_code_of(proc.returncode)
        assert run.term_path is not None
        assert run.log_path is not None
        term = Termination(
            exit_code=code,
            reason="Completed" if code == 0 else "Error",
            message=termination_message(
                read_termination_file(run.term_path),
                read_log_tail(run.log_path),
                code,
                run.message_policy,
            ),
            started_at=run.started_at,
            finished_at=now_rfc3339(),
            container_id=f"local://{proc.pid}",
        )
        with self._lock:
            if time.monotonic() - run.started_mono > CRASHLOOP_RESET_SECONDS:
                run.backoff_level = 0  # the kubelet forgets back-off after a long healthy run
            delay = (
                None if run.stopping else restart_delay(run.restart_policy, code, run.backoff_level)
            )
            if delay is not None:
                run.pending = term
                run.backoff_level += 1
                if delay == 0:
                    run.busy = True
                else:
                    run.restart_at = time.monotonic() + delay
            instance, history = run.instance, run.history
        log.info(
            "%s: container exited with code %d%s",
            run.key,
            code,
            "" if delay is None else f"; restart in {delay:.0f} s ({run.restart_policy})",
        )
        if delay is None:
            self._pool.submit(self._finish, run, run.final(term), history)
        elif delay == 0:
            self._pool.submit(self._restart, run)
        else:
            waiting = History(history.restart_count, term)
            self._pool.submit(self._write_backoff, run, instance, delay, waiting)

    def _finish(self, run: PodRun, term: Termination, history: History) -> None:
        with run.status_lock:
            self._finish_locked(run, term, history)

    def _finish_locked(self, run: PodRun, term: Termination, history: History) -> None:
        if run.gone:
            log.info("%s: pod object is gone; no final status to write", run.key)
        else:
            self._write_terminated(run, term, history)
        shutil.rmtree(run.private_dir, ignore_errors=True)  # secrets do not linger
        self._forget(run)

    def _forget(self, run: PodRun) -> None:
        with self._lock:
            self._runs.pop(run.key.uid, None)
            if not run.gone:
                self._done.add(run.key.uid)
        self._wake()

    def _write_terminated(
        self,
        run: PodRun,
        term: Termination,
        history: History = History(),
    ) -> None:
        info = run.info_or_fail()
        phase = "Succeeded" if term.exit_code == 0 and not term.force_failed else "Failed"
        if self._write_status(run, lambda p: terminated_status(p, info, term, history)):
            log.info(
                "%s: phase %s (exit code %d, reason %s)",
                run.key,
                phase,
                term.exit_code,
                term.pod_reason or term.reason,
            )

    # ------------------------------------------------------------------ status writes

    def _write_status(self, run: PodRun, build: Callable[[JSON], JSON]) -> bool:
        """GET the pod, build the status from it, PATCH with its resourceVersion; retry on
        conflicts and transient errors (bounded). False if the pod is gone or replaced."""
        deadline = time.monotonic() + (15.0 if self._stopping.is_set() else 120.0)
        delay = 0.2
        while True:
            error: ApiError | None = None
            try:
                written = self._try_write_status(run, build)
            except ApiError as exc:
                error = exc
            if error is None:
                return written
            if error.status == 409:  # someone else wrote: rebuild from the fresh object
                continue
            if error.status == 404:
                return False
            if error.status in (400, 403, 422):
                log.error("%s: status write rejected: %s", run.key, error)
                return False
            if time.monotonic() > deadline:
                log.error("%s: giving up on a status write: %s", run.key, error)
                return False
            log.warning("%s: status write failed (%s); retrying", run.key, error)
            time.sleep(delay)
            delay = min(delay * 2, 5.0)

    def _try_write_status(self, run: PodRun, build: Callable[[JSON], JSON]) -> bool:
        pod = self.api.get_pod(run.key.namespace, run.key.name)
        if pod is None or _text(_map(pod, "metadata"), "uid") != run.key.uid:
            log.info("%s: pod gone or replaced; status not written", run.key)
            return False
        meta = _map(pod, "metadata")
        body = {
            # A stale resourceVersion makes the apiserver answer 409 instead of overwriting.
            "metadata": {"resourceVersion": _text(meta, "resourceVersion")},
            "status": build(pod),
        }
        self.api.patch_pod_status(run.key.namespace, run.key.name, body)
        return True


# --------------------------------------------------------------------------- host paths


def _which(command: str, path_env: str, working_dir: str) -> str | None:
    if "/" in command:
        candidate = command if command.startswith("/") else posixpath.join(working_dir, command)
        return candidate if os.path.isfile(candidate) else None
    for directory in path_env.split(":"):
        candidate = posixpath.join(directory or ".", command)
        if os.path.isfile(candidate) and os.access(candidate, os.X_OK):
            return candidate
    return None


def _shebang(path: str, path_env: str) -> str | None:
    try:
        with open(path, "rb") as fh:
            head = fh.read(256)
    except OSError:
        return None
    if not head.startswith(b"#!"):
        return None
    words = head[2:].split(b"\n", 1)[0].decode(errors="replace").split()
    if not words:
        return None
    if posixpath.basename(words[0]) == "env" and len(words) > 1:
        return _which(words[1], path_env, "/")
    return words[0]


def host_paths_for(command: str, path_env: str, working_dir: str, state_dir: Path) -> list[str]:
    """Host paths a non-root container needs to see: this interpreter (``sys.prefix``,
    ``sys.base_prefix``), the repository, ``sys.path``, the working directory, and the command's
    executable plus its ``#!`` interpreter. The executor's state dir is never exposed."""
    candidates = {
        sys.prefix,
        sys.base_prefix,
        sys.exec_prefix,
        sys.executable,
        str(REPO_ROOT),
        os.getcwd(),
        *(p for p in sys.path if p),
    }
    exe = _which(command, path_env, working_dir)
    if exe is not None:
        candidates.add(exe)
        interpreter = _shebang(exe, path_env)
        if interpreter is not None:
            candidates.add(interpreter)
    state = os.path.realpath(state_dir)
    found = set()
    for path in candidates:
        real = os.path.realpath(path)
        if os.path.exists(real) and not sandbox.is_under(real, state):
            found.add(real)
    return sorted(found)


# --------------------------------------------------------------------------- entry point


def _setup_logging(path: Path) -> None:
    handler = logging.FileHandler(path)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(threadName)s %(message)s"))
    root = logging.getLogger()
    root.addHandler(handler)
    root.setLevel(logging.INFO)
    # urllib3 warns on every broken watch; our own lines already say what happened.
    logging.getLogger("urllib3").setLevel(logging.ERROR)


def main(argv: Sequence[str] | None = None) -> int:
    """CLI entry point; returns the process exit code (0 after a clean SIGTERM/SIGINT)."""
    parser = argparse.ArgumentParser(
        prog="python -m e2e.cluster.executor",
        description="Run unbound pods of a local control plane as bubblewrap-sandboxed processes.",
    )
    parser.add_argument("--kubeconfig", type=Path, required=True, help="admin kubeconfig")
    parser.add_argument("--state-dir", type=Path, required=True, help="logs and pod files")
    parser.add_argument("--images", type=Path, help="JSON image table (extends the defaults)")
    parser.add_argument("--ready-file", type=Path, help="written once the first list is done")
    args = parser.parse_args(argv)
    state_dir: Path = args.state_dir.resolve()
    state_dir.mkdir(parents=True, exist_ok=True)
    _setup_logging(state_dir / "executor.log")

    def fail(message: str) -> int:
        log.error("%s", message)
        print(f"executor: {message}", file=sys.stderr)
        return 2

    try:
        images = ImageTable.load(args.images)
    except (OSError, ValueError, TypeError) as exc:
        return fail(f"cannot load the image table: {exc}")
    bwrap, setpriv = shutil.which("bwrap"), shutil.which("setpriv")
    if bwrap is None or setpriv is None:
        return fail("needs bwrap (Debian package bubblewrap) and setpriv (util-linux) on PATH")
    if os.geteuid() != 0:
        return fail("must run as root: it switches each container to the pod's uid (setpriv)")
    stop = threading.Event()

    def on_signal(signum: int, _frame: object) -> None:
        log.info("received signal %d", signum)
        stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    api = KubeApi(args.kubeconfig)
    executor = Executor(api, state_dir, images, bwrap=bwrap, setpriv=setpriv)
    log.info("executor pid %d: apiserver %s, %s", os.getpid(), api.server, images.source)
    executor.start()
    while not stop.is_set() and not executor.synced.wait(0.2):
        pass
    if executor.synced.is_set() and args.ready_file is not None:
        tmp = args.ready_file.with_name(args.ready_file.name + ".tmp")
        tmp.write_text(f"{os.getpid()}\n")
        tmp.replace(args.ready_file)
        log.info("ready")
    while not stop.wait(1.0):
        pass
    executor.shutdown()
    api.close()
    return 0


# --------------------------------------------------------------------------- test harness side


class ExecutorError(RuntimeError):
    """The executor subprocess failed to start or stop cleanly; the message has its log tail."""


@dataclass
class ExecutorProcess:
    """A running executor subprocess (from ``run_executor``) and where its files are."""

    process: subprocess.Popen[bytes]
    state_dir: Path
    executor_log: Path

    def pod_dir(self, namespace: str, pod: str) -> Path:
        """Directory of the pod's files (logs, termination message)."""
        return self.state_dir / "pods" / namespace / pod

    def log_path(self, namespace: str, pod: str, container: str | None = None) -> Path:
        """The container's log file (stdout+stderr). Without ``container``: the pod's only log
        file; FileNotFoundError if there is none (yet) or several."""
        directory = self.pod_dir(namespace, pod)
        if container is not None:
            return directory / f"{container}.log"
        found = sorted(directory.glob("*.log"))
        if len(found) != 1:
            raise FileNotFoundError(
                f"expected one container log in {directory}, found {[p.name for p in found]}"
            )
        return found[0]

    def log_tail(self, lines: int = 60) -> str:
        """Last lines of the executor's own log and of its stderr, for failure messages."""
        parts = []
        for path in (self.executor_log, self.state_dir / "executor.stderr"):
            if path.exists():
                text = path.read_text(errors="replace").splitlines()[-lines:]
                parts.append(f"--- {path} ---\n" + "\n".join(text))
        return "\n".join(parts)


def _child_env() -> dict[str, str]:
    env = dict(os.environ)
    # The repository root must not be on sys.path (operator/ shadows the stdlib): import the
    # harness as e2e.cluster from tests/, and keep python -m from adding the cwd.
    inherited = [
        p
        for p in env.get("PYTHONPATH", "").split(os.pathsep)
        if p and os.path.realpath(p) != str(REPO_ROOT)
    ]
    env["PYTHONPATH"] = os.pathsep.join([str(TESTS_DIR), *inherited])
    env["PYTHONSAFEPATH"] = "1"
    return env


def _stop_process(proc: subprocess.Popen[bytes], timeout: float) -> bool:
    """SIGTERM the process group, SIGKILL after ``timeout``; True if it stopped in time."""
    if proc.poll() is not None:
        return True
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        return False
    return True


@contextlib.contextmanager
def run_executor(
    kubeconfig: Path,
    state_dir: Path,
    images: Path | None = None,
    *,
    ready_timeout: float = 60.0,
    stop_timeout: float = 30.0,
) -> Iterator[ExecutorProcess]:
    """Run the executor as a subprocess (own process group) until the block ends.

    Waits for its ready file (first pod list done); on exit SIGTERMs it (SIGKILL after
    ``stop_timeout``). Raises ``ExecutorError`` with its log tail if it does not become ready
    or does not stop cleanly.
    """
    state_dir = state_dir.resolve()
    state_dir.mkdir(parents=True, exist_ok=True)
    ready = state_dir / "ready"
    ready.unlink(missing_ok=True)
    command = [
        sys.executable,
        "-m",
        "e2e.cluster.executor",
        "--kubeconfig",
        str(kubeconfig),
        "--state-dir",
        str(state_dir),
        "--ready-file",
        str(ready),
    ]
    if images is not None:
        command += ["--images", str(images)]
    with (state_dir / "executor.stderr").open("ab") as stderr:
        proc = subprocess.Popen(
            command,
            stdin=subprocess.DEVNULL,
            stdout=stderr,
            stderr=subprocess.STDOUT,
            cwd=REPO_ROOT,
            env=_child_env(),
            start_new_session=True,
        )
    handle = ExecutorProcess(proc, state_dir, state_dir / "executor.log")
    deadline = time.monotonic() + ready_timeout
    while not ready.exists():
        if proc.poll() is not None or time.monotonic() > deadline:
            _stop_process(proc, 5.0)
            raise ExecutorError(
                f"the pod executor did not become ready (exit code {proc.returncode}):\n"
                + handle.log_tail()
            )
        time.sleep(0.1)
    try:
        yield handle
    finally:
        clean = _stop_process(proc, stop_timeout)
        if not clean or proc.returncode != 0:
            raise ExecutorError(
                f"the pod executor did not stop cleanly (exit code {proc.returncode}):\n"
                + handle.log_tail()
            )


if __name__ == "__main__":
    sys.exit(main())
