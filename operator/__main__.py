"""``python -m nocturne_operator`` / ``nocturne-operator``: run the operator (standalone, one
active pod; the Deployment uses the Recreate strategy)."""

from __future__ import annotations

import logging
import os
import socket
import sys

import kopf
from kopf._core.engines.peering import Identity  # kopf exports no public name for the type

import nocturne_operator.handlers  # noqa: F401  (registers the handlers)


class _QuietRoutine(logging.Filter):
    """Drop kopf's per-object "succeeded" lines for the drift timer and CronJob events: at one
    line per schedule per minute they would drown everything that matters."""

    _ROUTINE = (
        "Handler 'cronjob_event' succeeded",
        "Handler 'job_event' succeeded",
        "Handler 'schedule_deleted' succeeded",
    )

    def filter(self, record: logging.LogRecord) -> bool:
        return not (
            record.levelno <= logging.INFO and record.getMessage().startswith(self._ROUTINE)
        )


def main() -> int:
    """Run kopf with Nocturne's handlers until stopped."""
    namespaces = [n for n in os.environ.get("NOCTURNE_WATCH_NAMESPACES", "").split(",") if n]
    health = os.environ.get("NOCTURNE_HEALTH_ENDPOINT", "http://0.0.0.0:8080/healthz")
    kopf.configure(verbose=os.environ.get("NOCTURNE_LOG_LEVEL", "").upper() == "DEBUG")
    logging.getLogger("kopf.objects").addFilter(_QuietRoutine())
    kopf.run(
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
