"""Downward-API values (``fieldRef``, ``resourceFieldRef``) for env and downwardAPI volumes, and
the host capacity that resource limits default to."""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from decimal import ROUND_CEILING, Decimal
from pathlib import Path
from typing import Any

from harness.executor.pod import config_error, get_items, get_map, get_str_map, get_text
from harness.executor.quantity import parse_quantity


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


_KEYED_FIELD = re.compile(r"^metadata\.(labels|annotations)\['(.*)'\]$")


def format_map(values: Mapping[str, str]) -> str:
    """Labels/annotations as the downward API writes them: sorted ``key="value"`` lines."""
    return "\n".join(f"{k}={json.dumps(values[k], ensure_ascii=False)}" for k in sorted(values))


def field_value(pod: Mapping[str, Any], path: str) -> str:
    """Value of a downward-API ``fieldRef.fieldPath`` for ``pod`` (unbound: no node, no IPs)."""
    meta = get_map(pod, "metadata")
    spec = get_map(pod, "spec")
    keyed = _KEYED_FIELD.match(path)
    if keyed:
        return get_str_map(meta, keyed.group(1)).get(keyed.group(2), "")
    simple: dict[str, Callable[[], str]] = {
        "metadata.name": lambda: get_text(meta, "name"),
        "metadata.namespace": lambda: get_text(meta, "namespace"),
        "metadata.uid": lambda: get_text(meta, "uid"),
        "metadata.labels": lambda: format_map(get_str_map(meta, "labels")),
        "metadata.annotations": lambda: format_map(get_str_map(meta, "annotations")),
        "spec.nodeName": lambda: get_text(spec, "nodeName"),
        "spec.serviceAccountName": lambda: get_text(spec, "serviceAccountName"),
        "status.hostIP": lambda: "",
        "status.hostIPs": lambda: "",
        "status.podIP": lambda: "",
        "status.podIPs": lambda: "",
    }
    if path not in simple:
        raise config_error(f"unsupported fieldRef.fieldPath {path!r}")
    return simple[path]()


def resource_value(
    pod: Mapping[str, Any], container_name: str, ref: Mapping[str, Any], capacity: HostCapacity
) -> str:
    """Value of a ``resourceFieldRef`` like the kubelet: ceil(quantity / divisor), limits default
    to the host's capacity."""
    target = get_text(ref, "containerName") or container_name
    containers = get_items(get_map(pod, "spec"), "containers")
    container = next((c for c in containers if get_text(c, "name") == target), None)
    if container is None:
        raise config_error(f"resourceFieldRef names unknown container {target!r}")
    resource = get_text(ref, "resource")
    kind, _, name = resource.partition(".")
    if kind not in ("limits", "requests") or name not in ("cpu", "memory", "ephemeral-storage"):
        raise config_error(f"unsupported resourceFieldRef.resource {resource!r}")
    raw_divisor = ref.get("divisor") or "1"
    try:
        divisor = parse_quantity(str(raw_divisor))
        given = get_str_map(get_map(container, "resources"), kind).get(name)
        quantity = parse_quantity(given) if given is not None else None
    except ValueError as exc:
        raise config_error(f"resourceFieldRef {resource}: {exc}") from exc
    if divisor <= 0:
        raise config_error(f"resourceFieldRef {resource}: divisor must be positive")
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


def downward_value(
    pod: Mapping[str, Any], container_name: str, source: Mapping[str, Any], capacity: HostCapacity
) -> str | None:
    """The value that the ``fieldRef`` or ``resourceFieldRef`` of ``source`` (an env
    ``valueFrom`` or a downwardAPI volume item) selects; None if it has neither."""
    if "fieldRef" in source:
        return field_value(pod, get_text(get_map(source, "fieldRef"), "fieldPath"))
    if "resourceFieldRef" in source:
        return resource_value(pod, container_name, get_map(source, "resourceFieldRef"), capacity)
    return None
