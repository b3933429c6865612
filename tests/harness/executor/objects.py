"""The API objects a pod start reads: Secrets and ConfigMaps (cached per pod start) and
service-account tokens, behind protocols that unit tests fill with plain dicts."""

from __future__ import annotations

import base64
import binascii
from typing import Protocol

from harness.executor.pod import JSON, config_error, get_map


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
        raise config_error(f"secret {secret!r} key {key!r} is not valid base64") from exc


class ObjectCache:
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
            return {k: _decode_secret_value(name, k, v) for k, v in get_map(obj, "data").items()}
        found = {k: str(v).encode() for k, v in get_map(obj, "data").items()}
        for k, v in get_map(obj, "binaryData").items():
            found[k] = _decode_secret_value(name, k, v)
        return found
