"""The sweep tells an apiserver that is away from a failing reconcile."""

from __future__ import annotations

import pytest
import urllib3.exceptions
from kubernetes.client.exceptions import ApiException

from nocturne_operator.controller.sweep import apiserver_away


@pytest.mark.parametrize(
    "exc",
    [
        ApiException(status=503, reason="Service Unavailable"),
        ApiException(status=0, reason="connection refused"),
        urllib3.exceptions.MaxRetryError(None, "/apis", reason=None),  # type: ignore[arg-type]
        urllib3.exceptions.ProtocolError("Connection aborted."),
        ConnectionRefusedError(111, "Connection refused"),
        TimeoutError("timed out"),
    ],
)
def test_an_apiserver_that_is_away_is_transient(exc: BaseException) -> None:
    assert apiserver_away(exc)


@pytest.mark.parametrize(
    "exc",
    [
        ApiException(status=404, reason="Not Found"),
        ApiException(status=422, reason="Unprocessable Entity"),
        ApiException(status=500, reason="Internal Server Error"),
        KeyError("metadata"),
        ValueError("bad"),
    ],
)
def test_other_failures_are_not(exc: BaseException) -> None:
    assert not apiserver_away(exc)
