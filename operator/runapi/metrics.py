"""Prometheus metrics of the run API (same registry and naming rules as
``nocturne_operator.adapters.metrics``): requests by endpoint and HTTP code, and their latency.

Both label sets are closed: the three endpoints and the codes the server answers with."""

from __future__ import annotations

from prometheus_client import Counter, Histogram

from nocturne_operator.adapters.metrics import REGISTRY

ENDPOINTS = ("start", "progress", "finish")
CODES = ("200", "400", "401", "403", "409", "413", "422", "500", "503")

REQUESTS = Counter(
    "nocturne_run_api_requests",
    "Run API requests by endpoint and HTTP status code.",
    ["endpoint", "code"],
    registry=REGISTRY,
)
DURATION = Histogram(
    "nocturne_run_api_request_duration_seconds",
    "Time to answer one run API request (authentication and database included).",
    ["endpoint"],
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
    registry=REGISTRY,
)
for _endpoint in ENDPOINTS:
    DURATION.labels(_endpoint)
    for _code in CODES:
        REQUESTS.labels(_endpoint, _code)


def observe(endpoint: str, code: int, seconds: float) -> None:
    """Count one answered request."""
    REQUESTS.labels(endpoint, str(code)).inc()
    DURATION.labels(endpoint).observe(seconds)
