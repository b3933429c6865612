"""A thin adapter over the Kubernetes API for the few object kinds the operator writes.

Objects travel as plain dicts (what the apiserver speaks), which keeps comparisons with the pure
renderers simple. Server-side apply uses one field manager, so ownership of every field we set is
visible in ``managedFields``.
"""

from __future__ import annotations

import base64
import binascii
import json
from collections.abc import Callable, Mapping
from datetime import UTC, datetime
from typing import Any

from kubernetes import client, config
from kubernetes.client.exceptions import ApiException

from nocturne_operator.adapters.metrics import KUBE_REQUESTS
from nocturne_operator.api.model import GROUP, PLURAL, VERSION
from nocturne_operator.api.timestamps import rfc3339

FIELD_MANAGER = "nocturne-operator"
# What only the leading replica writes (issue 15): schedules' and policies' status, schedules'
# CronJobs and Jobs, runner pods' finalizer. Secrets (the run API's certificate), Leases and
# Events are not held.
LEADER_KINDS = frozenset({"AgentSchedule", "AgentSchedulePolicy", "CronJob", "Job", "Pod"})
_WRITES = frozenset({"PATCH", "POST", "PUT", "DELETE"})


class NotLeadingError(RuntimeError):
    """A write only the leading replica makes, refused because this one does not lead (now)."""


_PATHS = {
    "ConfigMap": "/api/v1/namespaces/{ns}/configmaps",
    "CronJob": "/apis/batch/v1/namespaces/{ns}/cronjobs",
    "Job": "/apis/batch/v1/namespaces/{ns}/jobs",
    "Pod": "/api/v1/namespaces/{ns}/pods",
    "Secret": "/api/v1/namespaces/{ns}/secrets",
    "Lease": "/apis/coordination.k8s.io/v1/namespaces/{ns}/leases",
    # Cluster-scoped: the namespace argument is ignored (its labels: which policies apply).
    "Namespace": "/api/v1/namespaces",
    "Event": "/api/v1/namespaces/{ns}/events",
    "AgentSchedule": f"/apis/{GROUP}/{VERSION}/namespaces/{{ns}}/{PLURAL}",
    # Cluster-scoped: the namespace argument is ignored.
    "AgentSchedulePolicy": f"/apis/{GROUP}/{VERSION}/agentschedulepolicies",
}


class Kube:
    """Typed-as-dict access to the objects Nocturne manages."""

    def __init__(self, api: client.ApiClient) -> None:
        self._api = api
        # Told of every object a write of ours returned (the operator's caches: ``Unseen``).
        self.on_write: Callable[[dict[str, Any]], None] | None = None
        # Asked before every write of a LEADER_KINDS object: False refuses it (NotLeadingError),
        # so a replica that lost the Lease stops writing at once, even mid-pass.
        self.may_write: Callable[[], bool] | None = None

    @classmethod
    def connect(cls) -> Kube:
        """In-cluster credentials when running in a pod, else the current kubeconfig."""
        try:
            config.load_incluster_config()
        except config.ConfigException:
            config.load_kube_config()
        return cls(client.ApiClient())

    def get(self, kind: str, namespace: str, name: str) -> dict[str, Any] | None:
        """The object, or None when it does not exist."""
        try:
            return self._call("GET", kind, namespace, name)
        except ApiException as exc:
            if exc.status == 404:
                return None
            raise

    def secret_value(self, namespace: str, name: str, key: str) -> str:
        """One key of a Secret, decoded; LookupError naming the Secret and key (never a value)
        when either is missing or the value is not UTF-8 text."""
        secret = self.get("Secret", namespace, name)
        where = f"Secret {namespace}/{name}"
        if secret is None:
            raise LookupError(f"{where} not found")
        encoded = (secret.get("data") or {}).get(key)
        if encoded is None:
            raise LookupError(f"{where} has no key {key!r}")
        try:
            return base64.b64decode(encoded, validate=True).decode().strip()
        except (binascii.Error, UnicodeDecodeError):
            raise LookupError(f"{where} key {key!r} is not UTF-8 text") from None

    def post_event(self, obj: Mapping[str, Any], type_: str, reason: str, message: str) -> None:
        """A core/v1 Event about ``obj`` (what ``kubectl describe`` and ``get events`` show).
        Works from any thread or task, unlike kopf.event, which needs a handler's context."""
        meta = obj["metadata"]
        stamp = rfc3339(datetime.now(UTC))
        self.create(
            {
                "apiVersion": "v1",
                "kind": "Event",
                "metadata": {"generateName": f"{meta['name']}.", "namespace": meta["namespace"]},
                "involvedObject": {
                    "apiVersion": obj.get("apiVersion", ""),
                    "kind": obj.get("kind", ""),
                    "name": meta["name"],
                    "namespace": meta["namespace"],
                    "uid": meta.get("uid", ""),
                },
                "type": type_,
                "reason": reason,
                "message": message[:1024],
                "source": {"component": FIELD_MANAGER},
                "reportingComponent": FIELD_MANAGER,
                "reportingInstance": FIELD_MANAGER,
                "firstTimestamp": stamp,
                "lastTimestamp": stamp,
                "count": 1,
            }
        )

    def list_objects(
        self, kind: str, namespace: str, label_selector: str = ""
    ) -> list[dict[str, Any]]:
        """Objects of ``kind`` in ``namespace``."""
        query = [("labelSelector", label_selector)] if label_selector else []
        items: list[dict[str, Any]] = self._call("GET", kind, namespace, query=query)["items"]
        return items

    def apply(self, obj: dict[str, Any]) -> dict[str, Any]:
        """Server-side apply ``obj`` as our field manager, taking over conflicting fields (a
        hand edit of a field we own is drift and gets repaired)."""
        meta = obj["metadata"]
        return self._call(
            "PATCH",
            obj["kind"],
            meta["namespace"],
            meta["name"],
            body=obj,
            content_type="application/apply-patch+yaml",
            query=[("fieldManager", FIELD_MANAGER), ("force", "true")],
        )

    def merge_patch(
        self, kind: str, namespace: str, name: str, patch: dict[str, Any], *, status: bool = False
    ) -> dict[str, Any]:
        """JSON merge patch of the object (or its status subresource)."""
        return self._call(
            "PATCH",
            kind,
            namespace,
            name,
            body=patch,
            content_type="application/merge-patch+json",
            subresource="status" if status else "",
            query=[("fieldManager", FIELD_MANAGER)],
        )

    def create(self, obj: dict[str, Any]) -> dict[str, Any] | None:
        """Create ``obj``; None when an object of that name already exists."""
        try:
            return self._call(
                "POST",
                obj["kind"],
                obj["metadata"]["namespace"],
                body=obj,
                query=[("fieldManager", FIELD_MANAGER)],
            )
        except ApiException as exc:
            if exc.status == 409:
                return None
            raise

    def delete(
        self, kind: str, namespace: str, name: str, *, propagation: str = "Background"
    ) -> bool:
        """Delete (dependents with ``propagation``: Background, or Foreground to take them
        first); False when it was already gone."""
        try:
            self._call(
                "DELETE",
                kind,
                namespace,
                name,
                body={"propagationPolicy": propagation},
            )
        except ApiException as exc:
            if exc.status == 404:
                return False
            raise
        return True

    def _call(
        self,
        method: str,
        kind: str,
        namespace: str,
        name: str = "",
        *,
        body: dict[str, Any] | None = None,
        content_type: str = "application/json",
        subresource: str = "",
        query: list[tuple[str, str]] | None = None,
    ) -> dict[str, Any]:
        if method in _WRITES and kind in LEADER_KINDS and self.may_write and not self.may_write():
            raise NotLeadingError(f"{method} {kind} {namespace}/{name}: this replica does not lead")
        path = _PATHS[kind].format(ns=namespace)
        if name:
            path += f"/{name}"
        if subresource:
            path += f"/{subresource}"
        data = self._request(method, path, body=body, content_type=content_type, query=query)
        if method in ("PATCH", "POST", "PUT") and self.on_write is not None:
            self.on_write(data)
        return data

    def _request(
        self,
        method: str,
        path: str,
        *,
        body: dict[str, Any] | None = None,
        content_type: str = "application/json",
        query: list[tuple[str, str]] | None = None,
        timeout: float | None = None,
    ) -> dict[str, Any]:
        """One API call with the client's credentials (at most ``timeout`` seconds, when
        given); ApiException unless 2xx."""
        method_, url, headers, payload, post = self._api.param_serialize(
            method=method,
            resource_path=path,
            query_params=query or [],
            header_params={"Accept": "application/json", "Content-Type": content_type},
            body=body,
            auth_settings=["BearerToken"],
        )
        resource = _resource(path)
        try:
            response = self._api.call_api(
                method_,
                url,
                header_params=headers,
                body=payload,
                post_params=post,
                _request_timeout=timeout,
            )
            response.read()
        except Exception:
            KUBE_REQUESTS.labels(method, resource, "error").inc()
            raise
        KUBE_REQUESTS.labels(method, resource, str(response.status)).inc()
        if not 200 <= response.status < 300:
            raise ApiException(http_resp=response)
        data: dict[str, Any] = json.loads(response.data or b"{}")
        return data

    def remove_finalizer(self, kind: str, namespace: str, name: str, finalizer: str) -> bool:
        """Take ``finalizer`` off the object (a strategic merge patch, so finalizers others
        hold stay); False when the object is already gone."""
        patch = {"metadata": {"$deleteFromPrimitiveList/finalizers": [finalizer]}}
        try:
            self._call(
                "PATCH",
                kind,
                namespace,
                name,
                body=patch,
                content_type="application/strategic-merge-patch+json",
            )
        except ApiException as exc:
            if exc.status == 404:
                return False
            raise
        return True

    # ---- the run API (issue 10) ------------------------------------------------------------

    def replace(self, obj: dict[str, Any]) -> dict[str, Any] | None:
        """PUT ``obj`` (optimistic concurrency through its ``metadata.resourceVersion``); None
        when the object changed since it was read (409), so the caller re-reads it."""
        meta = obj["metadata"]
        try:
            return self._call(
                "PUT",
                obj["kind"],
                meta["namespace"],
                meta["name"],
                body=obj,
                query=[("fieldManager", FIELD_MANAGER)],
            )
        except ApiException as exc:
            if exc.status == 409:
                return None
            raise

    def review_token(self, token: str, audiences: list[str]) -> dict[str, Any]:
        """The ``status`` of a TokenReview (authentication.k8s.io/v1) of ``token`` for
        ``audiences``: ``authenticated``, ``user`` (username, extra) and ``audiences``."""
        body = {
            "apiVersion": "authentication.k8s.io/v1",
            "kind": "TokenReview",
            "spec": {"token": token, "audiences": audiences},
        }
        review = self._request("POST", "/apis/authentication.k8s.io/v1/tokenreviews", body=body)
        status: dict[str, Any] = review.get("status") or {}
        return status

    # ---- leader election (issue 15) ----------------------------------------------------------

    def get_lease(self, namespace: str, name: str, timeout: float) -> dict[str, Any] | None:
        """The Lease, or None when there is none."""
        try:
            return self._request(
                "GET", f"{_PATHS['Lease'].format(ns=namespace)}/{name}", timeout=timeout
            )
        except ApiException as exc:
            if exc.status == 404:
                return None
            raise

    def write_lease(self, lease: dict[str, Any], timeout: float) -> dict[str, Any] | None:
        """Create the Lease (no resourceVersion) or replace it (at its resourceVersion); None
        when another replica wrote it first (409)."""
        meta = lease["metadata"]
        path = _PATHS["Lease"].format(ns=meta["namespace"])
        method = "PUT" if meta.get("resourceVersion") else "POST"
        if method == "PUT":
            path += f"/{meta['name']}"
        try:
            return self._request(method, path, body=lease, timeout=timeout)
        except ApiException as exc:
            if exc.status == 409:
                return None
            raise

    # ---- the agentruns API (issue 17) ------------------------------------------------------

    def read(self, path: str, query: list[tuple[str, str]] | None = None) -> dict[str, Any]:
        """GET an API path (e.g. an aggregated API's); ApiException unless 2xx."""
        return self._request("GET", path, query=query)

    def review_access(
        self,
        user: str,
        groups: list[str],
        extra: dict[str, list[str]],
        attributes: dict[str, str],
    ) -> tuple[bool, str]:
        """A SubjectAccessReview (authorization.k8s.io/v1) of ``attributes`` (verb, group,
        resource, namespace, name) for the user: (allowed, the authorizer's reason)."""
        body = {
            "apiVersion": "authorization.k8s.io/v1",
            "kind": "SubjectAccessReview",
            "spec": {
                "user": user,
                "groups": groups,
                "extra": extra,
                "resourceAttributes": attributes,
            },
        }
        review = self._request(
            "POST", "/apis/authorization.k8s.io/v1/subjectaccessreviews", body=body
        )
        status = review.get("status") or {}
        return bool(status.get("allowed")), str(status.get("reason") or "")

    def patch_api_service_ca(self, name: str, ca_pem: str) -> bool:
        """Set an APIService's ``caBundle`` (the CA that signed our serving certificate); False
        when there is no such APIService."""
        path = f"/apis/apiregistration.k8s.io/v1/apiservices/{name}"
        bundle = base64.b64encode(ca_pem.encode()).decode()
        try:
            self._request(
                "PATCH",
                path,
                body={"spec": {"caBundle": bundle}},
                content_type="application/merge-patch+json",
            )
        except ApiException as exc:
            if exc.status == 404:
                return False
            raise
        return True


def _resource(path: str) -> str:
    """The resource (and subresource) an API path names: ``cronjobs``, ``agentschedules/status``,
    ``tokenreviews``."""
    parts = path.strip("/").split("?")[0].split("/")
    if "namespaces" in parts and len(parts) > parts.index("namespaces") + 2:
        rest = parts[parts.index("namespaces") + 2 :]
    else:  # cluster-scoped: /api/v1/<resource> or /apis/<group>/<version>/<resource>
        rest = parts[2:] if parts[0] == "api" else parts[3:]
    if not rest:
        return "unknown"
    return f"{rest[0]}/{rest[2]}" if len(rest) > 2 else rest[0]
