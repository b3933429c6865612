"""Adapters to the outside: the Kubernetes API client and Prometheus metrics."""
