"""Every test layer gets the harness's fixtures (a cluster, PostgreSQL, kubectl, namespaces)."""

pytest_plugins = ["harness.fixtures"]
