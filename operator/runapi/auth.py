"""Who is calling the run API: a runner pod's projected token -> pod -> Job -> CronJob ->
AgentSchedule.

The token carries the audience ``TOKEN_AUDIENCE`` (useless against the apiserver) and is bound to
its pod. The apiserver verifies it (TokenReview) and names the pod; the owner chain, walked by
UID, names the Job and the schedule; the Job's pod template holds the task snapshot the run must
use. The request's ``RunRef`` must say exactly that, else 403: one tenant's pod never reports on
another's run. A verified identity is cached for at most ``CACHE_SECONDS`` and never past the
token's expiry.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import hashlib
import json
import logging
from collections import OrderedDict
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any, Protocol

import urllib3.exceptions
from kubernetes.client.exceptions import ApiException

from agent_runner.contract import (
    ENV_MANUAL_REQUEST,
    ENV_TASK,
    TOKEN_AUDIENCE,
    RunRef,
    TaskDocument,
    parse_task_document,
)
from nocturne_operator.api.model import API_VERSION, KIND

__all__ = [
    "CACHE_SECONDS",
    "Authenticator",
    "IdentityCache",
    "RefusalError",
    "RunAuthenticator",
    "RunIdentity",
    "TokenSubject",
    "check_run",
    "identity_from_objects",
    "token_expiry",
    "token_subject",
]

log = logging.getLogger(__name__)

CACHE_SECONDS = 300
_CACHE_ENTRIES = 20_000
_SA_PREFIX = "system:serviceaccount:"
_EXTRA_POD_NAME = "authentication.kubernetes.io/pod-name"
_EXTRA_POD_UID = "authentication.kubernetes.io/pod-uid"
RUNNER_CONTAINER = "runner"
# One message for every "not your run": it must not tell a caller what exists in other tenants.
_NOT_YOURS = "the token does not belong to the run the request names"


class RefusalError(Exception):
    """A run API request is refused: an HTTP ``status`` (here 401: no valid token, 403: not
    this run, 503: the apiserver could not be asked; the server adds its own), a CamelCase
    ``reason`` and a ``message`` safe to return to the caller."""

    def __init__(self, status: int, reason: str, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.reason = reason
        self.message = message


def _forbidden(message: str = _NOT_YOURS) -> RefusalError:
    return RefusalError(403, "Forbidden", message)


@dataclass(frozen=True)
class RunIdentity:
    """The run a verified token belongs to, and the task snapshot its Job was created with."""

    namespace: str
    schedule: str
    schedule_uid: str
    job_name: str
    job_uid: str
    pod_name: str
    pod_uid: str
    task: TaskDocument
    manual_request: str | None = None


@dataclass(frozen=True)
class TokenSubject:
    """What the apiserver says about a token: its ServiceAccount and the pod it is bound to."""

    namespace: str
    service_account: str
    pod_name: str
    pod_uid: str


class RunAuthenticator(Protocol):
    """What the server needs: the identity behind a bearer token (RefusalError otherwise)."""

    async def identify(self, token: str) -> RunIdentity: ...


# --------------------------------------------------------------------------------------------
# Pure checks


def token_subject(status: Mapping[str, Any]) -> TokenSubject:
    """The subject of a TokenReview ``status``; RefusalError 401 when not authenticated for our
    audience, 403 when the token is not a pod-bound ServiceAccount token."""
    if status.get("authenticated") is not True:
        raise RefusalError(401, "Unauthenticated", "the token is not valid for the run API")
    if TOKEN_AUDIENCE not in (status.get("audiences") or []):
        raise RefusalError(401, "Unauthenticated", f"the token's audience is not {TOKEN_AUDIENCE}")
    user = status.get("user") or {}
    username = str(user.get("username") or "")
    parts = username.removeprefix(_SA_PREFIX).split(":")
    if not username.startswith(_SA_PREFIX) or len(parts) != 2 or not all(parts):
        raise _forbidden("the token is not a ServiceAccount token of a runner pod")
    extra = user.get("extra") or {}
    pod_names = extra.get(_EXTRA_POD_NAME) or []
    pod_uids = extra.get(_EXTRA_POD_UID) or []
    if len(pod_names) != 1 or len(pod_uids) != 1 or not pod_names[0] or not pod_uids[0]:
        raise _forbidden("the token is not bound to a pod (use the runner's projected token)")
    return TokenSubject(parts[0], parts[1], str(pod_names[0]), str(pod_uids[0]))


def controller_ref(obj: Mapping[str, Any], kind: str, api_version: str) -> dict[str, Any]:
    """The controller ownerReference of ``obj``, which must be a ``kind`` of ``api_version``
    (the group's version, e.g. ``batch/v1``); RefusalError 403 otherwise."""
    refs = [
        ref
        for ref in (obj.get("metadata", {}).get("ownerReferences") or [])
        if ref.get("controller") is True
    ]
    if (
        len(refs) != 1
        or refs[0].get("kind") != kind
        or refs[0].get("apiVersion") != api_version
        or not refs[0].get("name")
        or not refs[0].get("uid")
    ):
        raise _forbidden(f"the token's pod is not run by a Nocturne schedule ({kind} owner)")
    return dict(refs[0])


def _check_object(obj: Mapping[str, Any] | None, ref: Mapping[str, Any]) -> Mapping[str, Any]:
    """``obj`` must exist and be the object ``ref`` names (same UID)."""
    if obj is None or obj.get("metadata", {}).get("uid") != ref["uid"]:
        raise _forbidden("the token's pod is not run by a Nocturne schedule (owner gone)")
    return obj


def _runner_env(job: Mapping[str, Any]) -> dict[str, str]:
    containers = job.get("spec", {}).get("template", {}).get("spec", {}).get("containers") or []
    for container in containers:
        if container.get("name") == RUNNER_CONTAINER:
            return {
                str(e.get("name")): str(e["value"])
                for e in container.get("env") or []
                if "value" in e
            }
    return {}


def identity_from_objects(
    subject: TokenSubject,
    pod: Mapping[str, Any] | None,
    job: Mapping[str, Any] | None,
    cronjob: Mapping[str, Any] | None,
) -> RunIdentity:
    """Check the owner chain pod -> Job -> CronJob -> AgentSchedule (by UID, controller
    references only) and read the task snapshot from the Job; RefusalError 403 on any break."""
    if pod is None or pod.get("metadata", {}).get("uid") != subject.pod_uid:
        raise _forbidden("the token's pod no longer exists")
    if pod["metadata"].get("namespace", subject.namespace) != subject.namespace:
        raise _forbidden()
    account = pod.get("spec", {}).get("serviceAccountName") or "default"
    if account != subject.service_account:
        raise _forbidden()
    job_ref = controller_ref(pod, "Job", "batch/v1")
    job = _check_object(job, job_ref)
    cron_ref = controller_ref(job, "CronJob", "batch/v1")
    cronjob = _check_object(cronjob, cron_ref)
    schedule_ref = controller_ref(cronjob, KIND, API_VERSION)
    env = _runner_env(job)
    if ENV_TASK not in env:
        raise _forbidden("the token's Job carries no task snapshot (made by another version?)")
    try:
        task = parse_task_document(env[ENV_TASK])
    except ValueError as exc:
        log.warning("Job %s/%s: unreadable task snapshot: %s", subject.namespace, job_ref, exc)
        raise _forbidden("the token's Job carries an unreadable task snapshot") from None
    named = task.schedule
    if (named.namespace, named.name, named.uid) != (
        subject.namespace,
        schedule_ref["name"],
        schedule_ref["uid"],
    ):
        raise _forbidden("the token's Job carries the task snapshot of another schedule")
    return RunIdentity(
        namespace=subject.namespace,
        schedule=str(schedule_ref["name"]),
        schedule_uid=str(schedule_ref["uid"]),
        job_name=str(job_ref["name"]),
        job_uid=str(job_ref["uid"]),
        pod_name=subject.pod_name,
        pod_uid=subject.pod_uid,
        task=task,
        manual_request=env.get(ENV_MANUAL_REQUEST) or None,
    )


def check_run(identity: RunIdentity, run: RunRef) -> None:
    """The request's RunRef must name exactly the identity's run; RefusalError 403 otherwise (the
    message does not say which part differs: that would confirm other tenants' names)."""
    if (run.namespace, run.schedule, run.schedule_uid, run.job_uid, run.pod_uid) != (
        identity.namespace,
        identity.schedule,
        identity.schedule_uid,
        identity.job_uid,
        identity.pod_uid,
    ):
        raise _forbidden()


def token_expiry(token: str) -> datetime | None:
    """The ``exp`` of a JWT's payload, not verified (the apiserver just verified the token);
    None when it cannot be read."""
    parts = token.split(".")
    if len(parts) != 3:
        return None
    payload = parts[1] + "=" * (-len(parts[1]) % 4)
    try:
        claims = json.loads(base64.urlsafe_b64decode(payload))
        exp = claims["exp"]
        if isinstance(exp, bool) or not isinstance(exp, int | float):
            return None
        return datetime.fromtimestamp(exp, UTC)
    except (binascii.Error, ValueError, TypeError, KeyError, OverflowError, OSError):
        return None


def token_digest(token: str) -> str:
    """The cache key of a token (the token itself is never kept)."""
    return hashlib.sha256(token.encode("utf-8", "replace")).hexdigest()


class IdentityCache:
    """Verified identities by token digest, each until min(now + ttl, the token's expiry)."""

    def __init__(
        self,
        ttl: timedelta = timedelta(seconds=CACHE_SECONDS),
        *,
        clock: Callable[[], datetime] = lambda: datetime.now(UTC),
        max_entries: int = _CACHE_ENTRIES,
    ) -> None:
        self._ttl = ttl
        self._clock = clock
        self._max = max_entries
        self._entries: OrderedDict[str, tuple[datetime, RunIdentity]] = OrderedDict()

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, token: str) -> RunIdentity | None:
        """The cached identity of ``token`` unless expired."""
        digest = token_digest(token)
        entry = self._entries.get(digest)
        if entry is None:
            return None
        if self._clock() >= entry[0]:
            del self._entries[digest]
            return None
        return entry[1]

    def put(self, token: str, identity: RunIdentity) -> None:
        """Remember ``identity``; a token whose expiry cannot be read is not cached."""
        now = self._clock()
        expiry = token_expiry(token)
        if expiry is None or expiry <= now:
            return
        until = min(now + self._ttl, expiry)
        digest = token_digest(token)
        self._entries.pop(digest, None)
        self._entries[digest] = (until, identity)
        # Insertion order is expiry order only roughly; dropping the oldest is enough to bound
        # memory, and an evicted identity is just verified again.
        while len(self._entries) > self._max:
            self._entries.popitem(last=False)


# --------------------------------------------------------------------------------------------
# The apiserver side


class TokenKube(Protocol):
    """The part of ``nocturne_operator.adapters.kube.Kube`` the authenticator needs."""

    def get(self, kind: str, namespace: str, name: str) -> dict[str, Any] | None: ...

    def review_token(self, token: str, audiences: list[str]) -> dict[str, Any]: ...


_UNREACHABLE = (ApiException, urllib3.exceptions.HTTPError, OSError)


class Authenticator:
    """Verifies runner tokens with the apiserver (TokenReview + the owner chain)."""

    def __init__(self, kube: TokenKube, *, cache: IdentityCache | None = None) -> None:
        self._kube = kube
        self._cache = cache or IdentityCache()

    async def identify(self, token: str) -> RunIdentity:
        """The run ``token`` belongs to; RefusalError 401/403/503."""
        cached = self._cache.get(token)
        if cached is not None:
            return cached
        identity = await asyncio.to_thread(self._identify, token)
        self._cache.put(token, identity)
        return identity

    def _identify(self, token: str) -> RunIdentity:
        try:
            status = self._kube.review_token(token, [TOKEN_AUDIENCE])
        except _UNREACHABLE as exc:
            raise _unavailable("TokenReview", exc) from None
        subject = token_subject(status)
        ns = subject.namespace
        try:
            pod = self._kube.get("Pod", ns, subject.pod_name)
            job = cronjob = None
            if pod is not None and pod["metadata"].get("uid") == subject.pod_uid:
                job_ref = controller_ref(pod, "Job", "batch/v1")
                job = self._kube.get("Job", ns, job_ref["name"])
                if job is not None and job["metadata"].get("uid") == job_ref["uid"]:
                    cron_ref = controller_ref(job, "CronJob", "batch/v1")
                    cronjob = self._kube.get("CronJob", ns, cron_ref["name"])
        except _UNREACHABLE as exc:
            raise _unavailable(f"reading the owners of pod {ns}/{subject.pod_name}", exc) from None
        return identity_from_objects(subject, pod, job, cronjob)


def _unavailable(what: str, exc: BaseException) -> RefusalError:
    status = getattr(exc, "status", None)
    log.warning(
        "run API: %s failed (%s%s)",
        what,
        type(exc).__name__,
        f" {status}" if status is not None else "",
    )
    return RefusalError(503, "KubernetesUnavailable", "the operator cannot verify tokens right now")
