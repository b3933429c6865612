"""The operator counts its own Kubernetes API requests by verb, resource and code
(``nocturne_kube_requests_total``): the figure behind "at idle it reads nothing"."""

from __future__ import annotations

from typing import Any, cast

import pytest
import urllib3.exceptions
from kubernetes import client
from kubernetes.client.exceptions import ApiException

from nocturne_operator.adapters import kube
from nocturne_operator.adapters.kube import Kube
from nocturne_operator.adapters.metrics import REGISTRY


@pytest.mark.parametrize(
    ("path", "resource"),
    [
        ("/apis/nocturne.dev/v1alpha1/namespaces/team-a/agentschedules/digest", "agentschedules"),
        (
            "/apis/nocturne.dev/v1alpha1/namespaces/team-a/agentschedules/digest/status",
            "agentschedules/status",
        ),
        ("/apis/batch/v1/namespaces/team-a/cronjobs", "cronjobs"),
        ("/api/v1/namespaces/team-a/pods/p-1", "pods"),
        ("/api/v1/namespaces/team-a/events", "events"),
        ("/apis/authentication.k8s.io/v1/tokenreviews", "tokenreviews"),
        ("/api/v1/namespaces", "namespaces"),
        ("/api/v1/namespaces/team-a", "namespaces"),
        ("/apis", "unknown"),
    ],
)
def test_the_resource_a_path_names(path: str, resource: str) -> None:
    assert kube._resource(path) == resource


class Response:
    def __init__(self, status: int, data: bytes) -> None:
        self.status, self.data, self.reason = status, data, "x"
        self.headers: dict[str, str] = {}

    def read(self) -> bytes:
        return self.data


class Api:
    """The two calls of kubernetes.client.ApiClient that Kube makes, answering in turn."""

    def __init__(self, *answers: Response | Exception) -> None:
        self.answers = list(answers)

    def param_serialize(self, **kwargs: Any) -> tuple[str, str, dict[str, str], Any, list[Any]]:
        return kwargs["method"], kwargs["resource_path"], {}, kwargs["body"], []

    def call_api(self, *_args: Any, **_kwargs: Any) -> Response:
        answer = self.answers.pop(0)
        if isinstance(answer, Exception):
            raise answer
        return answer


def count(verb: str, resource: str, code: str) -> float:
    labels = {"verb": verb, "resource": resource, "code": code}
    return REGISTRY.get_sample_value("nocturne_kube_requests_total", labels) or 0.0


def test_each_request_is_counted_with_its_outcome() -> None:
    api = Api(
        Response(200, b'{"kind": "CronJob"}'),
        Response(404, b"{}"),
        urllib3.exceptions.ProtocolError("Connection aborted."),
        Response(409, b"{}"),
    )
    before = {
        key: count(*key)
        for key in [
            ("GET", "cronjobs", "200"),
            ("GET", "cronjobs", "404"),
            ("GET", "agentschedules", "error"),
            ("POST", "events", "409"),
        ]
    }
    k = Kube(cast(client.ApiClient, api))
    assert k.get("CronJob", "team-a", "digest") == {"kind": "CronJob"}
    assert k.get("CronJob", "team-a", "gone") is None
    with pytest.raises(urllib3.exceptions.ProtocolError):
        k.get("AgentSchedule", "team-a", "digest")
    with pytest.raises(ApiException):
        k._request("POST", "/api/v1/namespaces/team-a/events", body={})
    assert {key: count(*key) - n for key, n in before.items()} == dict.fromkeys(before, 1.0)
