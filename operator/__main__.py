"""``python -m nocturne_operator`` / ``nocturne-operator``: run the operator. kopf runs standalone
(no peering: with equal priorities it would freeze every replica); of the Deployment's replicas
the holder of a Lease reconciles (``controller.lease``), every one serves the run API."""

from __future__ import annotations

import logging
import os
import socket
import sys

import kopf
from kopf._core.engines.peering import Identity  # kopf exports no public name for the type

import nocturne_operator.controller.handlers  # noqa: F401 - importing it registers the handlers
from nocturne_operator.controller import admission
from nocturne_operator.controller.memo import Memo
from nocturne_operator.settings import load_settings


class _QuietRoutine(logging.Filter):
    """Drop kopf's per-object "succeeded" lines of the event handlers: at one line per event of
    every schedule, CronJob and Job they would drown everything that matters."""

    _ROUTINE = (
        "Handler 'cronjob_event' succeeded",
        "Handler 'job_event' succeeded",
        "Handler 'schedule_event' succeeded",
    )

    # A refused admission is the webhook working, not an error: the operator logs it itself.
    _REFUSAL = (
        "Webhook 'agentschedules' failed permanently",
        "Webhook 'agentschedulepolicies' failed permanently",
    )

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        if message.startswith(self._REFUSAL):
            return False
        return not (record.levelno <= logging.INFO and message.startswith(self._ROUTINE))


def watch_patterns(value: str) -> list[str]:
    """kopf namespace patterns from NOCTURNE_WATCH_NAMESPACES. A plain list ("a,b") is several
    patterns, any of which may match. Exclusions ("!chart-*,!solo-*") must stay one pattern:
    as separate patterns each would let in the namespaces the other excludes."""
    parts = [p.strip() for p in value.split(",") if p.strip()]
    if any(p.startswith("!") for p in parts):
        return [", ".join(parts)]
    return parts


def main() -> int:
    """Run kopf with Nocturne's handlers until stopped."""
    namespaces = watch_patterns(os.environ.get("NOCTURNE_WATCH_NAMESPACES", ""))
    health = os.environ.get("NOCTURNE_HEALTH_ENDPOINT", "http://0.0.0.0:8080/healthz")
    kopf.configure(verbose=os.environ.get("NOCTURNE_LOG_LEVEL", "").upper() == "DEBUG")
    logging.getLogger("kopf.objects").addFilter(_QuietRoutine())
    # Bad settings end the process here, with the file and field named, before kopf starts.
    memo = Memo(settings=load_settings(), watch_patterns=tuple(namespaces))
    admission.register(memo.settings, namespaces)
    kopf.run(
        memo=memo,
        # Standalone mode does not peer; an explicit identity spares kopf a getpass lookup,
        # which fails for a uid without a passwd entry.
        identity=Identity(f"nocturne-operator@{socket.gethostname()}"),
        standalone=True,
        clusterwide=not namespaces,
        namespaces=namespaces,
        liveness_endpoint=health or None,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
