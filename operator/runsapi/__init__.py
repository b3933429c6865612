"""The agentruns API (issue 17): run history served as a read-only Kubernetes API through API
aggregation (group ``runs.nocturne.dev``), from PostgreSQL, authorised by the apiserver."""
