"""The drills stand on the e2e layer's fixtures: the CRDs and namespaces only a test's own operator
serves (the session operator leaves ``solo-*`` alone)."""

from e2e.conftest import crds, solo_namespace

__all__ = ["crds", "solo_namespace"]
