"""The Kubernetes API as the executor uses it: a few raw JSON calls and a pod watch stream."""

from __future__ import annotations

import contextlib
import json
import threading
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from harness.executor.pod import JSON, config_error, get_map, get_text


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
                raise config_error(
                    f"token for serviceaccount {namespace}/{service_account}: {exc}"
                ) from exc
            raise
        token = get_map(answer, "status").get("token")
        if not isinstance(token, str) or not token:
            raise config_error(f"TokenRequest for {namespace}/{service_account} returned no token")
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
        rv = get_text(get_map(doc, "metadata"), "resourceVersion")
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
