"""The drills stand on the e2e layer's fixtures: the CRDs and namespaces only a test's own operator
serves (the session operator leaves ``solo-*`` alone), and a PostgreSQL server of their own."""

from e2e.conftest import crds, private_postgres, solo_namespace

__all__ = ["crds", "private_postgres", "solo_namespace"]
