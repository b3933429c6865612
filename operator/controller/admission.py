"""Errors at ``kubectl apply`` time (issue 15): a validating admission webhook (kopf's) runs the
same validation the operator's passes run, so ``kubectl apply`` (``--dry-run=server`` too), Helm
and Argo CD fail with the same field-named message the schedule's status would carry.

``failurePolicy: Ignore`` by default: a stopped operator blocks nobody, and status remains the
second line of defence (``webhook_failure_policy: Fail`` makes the webhook mandatory). kopf
manages the ValidatingWebhookConfiguration (``webhook_configuration``): it points it at
``https://<webhook_host>:<webhook_port>/`` with the operator's own CA as ``caBundle`` (the run
API's; no key material in the chart). Every replica serves it behind one Service and keeps the
configuration the same way (one CA from one Secret, the Service's host), so two replicas never
flap its ``caBundle``; it is persistent, so a replica that stops leaves it to the other.
An UPDATE that leaves the spec alone (an annotation: run
now, pause's reason, a cancel) is never refused, so an already invalid schedule can still be
paused or annotated.
"""

from __future__ import annotations

import logging
import tempfile
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import kopf
from kopf._cogs.structs.references import NamespaceName, match_namespace

from nocturne_operator.api.model import GROUP, PLURAL, VERSION
from nocturne_operator.api.policy import POLICY_PLURAL
from nocturne_operator.controller.memo import Memo
from nocturne_operator.runapi.tls import RunApiTls
from nocturne_operator.schedule.policy import Policy
from nocturne_operator.schedule.validation import Limits, Peer, validate
from nocturne_operator.settings import Settings

__all__ = ["register", "serve"]

log = logging.getLogger(__name__)


def check(
    body: kopf.Body | dict[str, Any],
    old: kopf.Body | dict[str, Any] | None,
    memo: Memo,
    *,
    operation: str | None,
    now: datetime,
) -> list[str]:
    """The warnings of an admissible schedule; kopf.AdmissionError (422) naming every field,
    value and rule when it is not."""
    if operation == "UPDATE" and old is not None and old.get("spec") == body.get("spec"):
        return []
    meta = body.get("metadata") or {}
    namespace, name = str(meta.get("namespace") or ""), str(meta.get("name") or "")
    indexes = memo.indexes
    peers: list[Peer] | None = None
    limits: Limits | None = None
    if indexes is not None:
        peers = [p for p in indexes.peers.get(namespace, []) if p.name != name]
        created = str(meta.get("creationTimestamp") or now.strftime("%Y-%m-%dT%H:%M:%SZ"))
        peers.append(Peer(name, created))
        limits = indexes.limits(memo.settings, namespace, memo.kube)
    result = validate(body, memo.settings, now=now, peers=peers, prices=memo.prices, limits=limits)
    if result.errors:
        message = "; ".join(str(e) for e in result.errors)
        log.info("admission: refused %s %s/%s: %s", operation, namespace, name, message)
        raise kopf.AdmissionError(message, code=422)
    return list(result.warnings)


def serves(namespace: str, patterns: Sequence[str]) -> bool:
    """This operator serves ``namespace`` (kopf's namespace patterns; none: every one)."""
    return not patterns or any(match_namespace(NamespaceName(namespace), p) for p in patterns)


def register(settings: Settings, namespaces: Sequence[str] = ()) -> None:
    """Register the validating handler when the webhook is on (its failure policy is fixed at
    registration: kopf renders it into the configuration). The configuration selects every
    namespace; schedules in namespaces this operator does not serve (``namespaces``, its watch
    patterns) are admitted untouched: another operator, or none, decides there."""
    if not settings.webhook_port:
        return

    @kopf.on.validate(
        GROUP,
        VERSION,
        PLURAL,
        id="agentschedules",
        operations=["CREATE", "UPDATE"],
        ignore_failures=settings.webhook_failure_policy == "Ignore",
        # kopf takes a webhook out of the configuration when its operator stops, unless it is
        # persistent: with two replicas, one stopping (a rolling update) must leave the other's
        # webhook in place. With both stopped, failurePolicy decides, as it says.
        persistent=True,
    )
    def agentschedule(*, body: kopf.Body, memo: Memo, warnings: list[str], **kwargs: Any) -> None:
        """Refuse an AgentSchedule its validation refuses (``validation.validate``); kopf
        passes the request's ``operation`` and ``old`` object among the keyword arguments."""
        if not serves(str(body.get("metadata", {}).get("namespace") or ""), namespaces):
            return
        warnings.extend(
            check(
                body,
                kwargs.get("old"),
                memo,
                operation=kwargs.get("operation"),
                now=datetime.now(UTC),
            )
        )

    @kopf.on.validate(
        GROUP,
        VERSION,
        POLICY_PLURAL,
        id="agentschedulepolicies",
        operations=["CREATE", "UPDATE"],
        ignore_failures=settings.webhook_failure_policy == "Ignore",
        persistent=True,  # as the schedules' webhook: the other replica serves it
    )
    def agentschedulepolicy(*, body: kopf.Body, **kwargs: Any) -> None:
        """Refuse an AgentSchedulePolicy that cannot be read (a zone, an endpoint): applied, it
        would hold every schedule of the namespaces it selects."""
        check_policy(body, kwargs.get("old"), operation=kwargs.get("operation"))


def check_policy(
    body: kopf.Body | dict[str, Any],
    old: kopf.Body | dict[str, Any] | None = None,
    *,
    operation: str | None = "CREATE",
) -> None:
    """kopf.AdmissionError (422) naming every broken field of an AgentSchedulePolicy. An UPDATE
    that leaves the spec alone (a label, an annotation) is never refused."""
    if operation == "UPDATE" and old is not None and old.get("spec") == body.get("spec"):
        return
    name = str((body.get("metadata") or {}).get("name") or "")
    policy = Policy.parse(name, body.get("spec"))
    if policy.errors:
        message = "; ".join(policy.errors)
        log.info("admission: refused AgentSchedulePolicy %s: %s", name, message)
        raise kopf.AdmissionError(message, code=422)


def serve(
    settings: kopf.OperatorSettings, config: Settings, tls: RunApiTls
) -> tuple[kopf.WebhookServer, Path] | None:
    """Serve the webhook with the operator's certificate and let kopf keep the configuration:
    the server and the file it reads the certificate from (a renewal rewrites it and the
    server's ``cadata``; kopf then restarts the server and re-points the configuration), or
    None when the webhook is off."""
    if not config.webhook_port:
        return None
    # kopf's server loads its certificate from a file: a private directory for this process.
    pem = Path(tempfile.mkdtemp(prefix="nocturne-webhook-")) / "server.pem"
    tls.write_pem(pem)
    server = kopf.WebhookServer(
        addr=config.webhook_bind,
        port=config.webhook_port,
        host=config.webhook_host,
        certfile=pem,
        pkeyfile=pem,
        cadata=tls.ca_pem.encode(),
    )
    settings.admission.server = server
    settings.admission.managed = config.webhook_configuration
    return server, pem
