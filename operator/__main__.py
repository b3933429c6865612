"""``python -m nocturne_operator`` / ``nocturne-operator``: run the operator (standalone, one
active pod; the Deployment uses the Recreate strategy)."""

from __future__ import annotations

import os
import sys

import kopf

import nocturne_operator.handlers  # noqa: F401  (registers the handlers)


def main() -> int:
    """Run kopf with Nocturne's handlers until stopped."""
    namespaces = [n for n in os.environ.get("NOCTURNE_WATCH_NAMESPACES", "").split(",") if n]
    health = os.environ.get("NOCTURNE_HEALTH_ENDPOINT", "http://0.0.0.0:8080/healthz")
    kopf.configure(verbose=os.environ.get("NOCTURNE_LOG_LEVEL", "").upper() == "DEBUG")
    kopf.run(
        standalone=True,
        clusterwide=not namespaces,
        namespaces=namespaces,
        liveness_endpoint=health or None,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
