"""Reading pod JSON: typed field access that fails the pod (not the executor) on malformed input,
``PodStartError`` for a pod that cannot run, and a pod's identity."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from harness.executor.reasons import REASON_CONFIG, REASON_INTERNAL

JSON = dict[str, Any]


class PodStartError(Exception):
    """The pod cannot run; ``reason`` and ``message`` go to its container and pod status."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason
        self.message = message


def config_error(message: str) -> PodStartError:
    """A CreateContainerConfigError: a missing object or key, or a setting that cannot work."""
    return PodStartError(REASON_CONFIG, message)


def _checked(obj: Mapping[str, Any], key: str, ok: Callable[[object], bool], what: str) -> Any:
    """``obj[key]`` (None if absent or null); a malformed value fails the pod, naming ``key``."""
    value = obj.get(key)
    if value is not None and not ok(value):
        raise PodStartError(REASON_INTERNAL, f"malformed pod: {key} is not {what}")
    return value


def _list_of(kind: type) -> Callable[[object], bool]:
    return lambda value: isinstance(value, list) and all(isinstance(v, kind) for v in value)


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def get_map(obj: Mapping[str, Any], key: str) -> JSON:
    """The object at ``key``; {} if absent."""
    value: JSON | None = _checked(obj, key, lambda v: isinstance(v, dict), "an object")
    return {} if value is None else value


def get_items(obj: Mapping[str, Any], key: str) -> list[JSON]:
    """The list of objects at ``key``; [] if absent."""
    value: list[JSON] | None = _checked(obj, key, _list_of(dict), "a list of objects")
    return [] if value is None else value


def get_text(obj: Mapping[str, Any], key: str, default: str = "") -> str:
    """The string at ``key``; ``default`` if absent."""
    value: str | None = _checked(obj, key, lambda v: isinstance(v, str), "a string")
    return default if value is None else value


def get_strings(obj: Mapping[str, Any], key: str) -> list[str]:
    """The list of strings at ``key``; [] if absent."""
    value: list[str] | None = _checked(obj, key, _list_of(str), "a list of strings")
    return [] if value is None else value


def get_int(obj: Mapping[str, Any], key: str) -> int | None:
    """The integer at ``key`` (a boolean is not one); None if absent."""
    value: int | None = _checked(obj, key, _is_int, "an integer")
    return value


def get_bool(obj: Mapping[str, Any], key: str) -> bool | None:
    """The boolean at ``key``; None if absent."""
    value: bool | None = _checked(obj, key, lambda v: isinstance(v, bool), "a boolean")
    return value


def get_str_map(obj: Mapping[str, Any], key: str) -> dict[str, str]:
    """The object at ``key`` (labels, annotations, resources) with keys and values as strings."""
    value = get_map(obj, key)
    return {str(k): str(v) for k, v in value.items()}


@dataclass(frozen=True)
class PodKey:
    """Identity of one pod incarnation (a recreated pod of the same name has a new uid)."""

    namespace: str
    name: str
    uid: str

    @classmethod
    def of(cls, pod: Mapping[str, Any]) -> PodKey:
        meta = get_map(pod, "metadata")
        return cls(get_text(meta, "namespace"), get_text(meta, "name"), get_text(meta, "uid"))

    def __str__(self) -> str:
        return f"{self.namespace}/{self.name}"


def now_rfc3339() -> str:
    """Current time as the API serialises metav1.Time (seconds, UTC, 'Z')."""
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
