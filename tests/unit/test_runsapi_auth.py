"""Delegated authentication of the agentruns API (issue 17): user headers are believed only from
the apiserver's front-proxy certificate; the request-header settings come from the ConfigMap the
apiserver publishes; access decisions are kept briefly, per user and request."""

from __future__ import annotations

import json

import pytest
from cryptography import x509
from cryptography.x509.oid import NameOID
from multidict import CIMultiDict

from nocturne_operator.runapi.tls import RunApiTls
from nocturne_operator.runsapi.auth import AccessReviews, FrontProxy, FrontProxyError, User

CA = RunApiTls.create(["localhost"]).ca_pem  # a real CA: its name is the issuer checked
CA_NAME = next(
    str(a.value)
    for a in x509.load_pem_x509_certificate(CA.encode()).subject.get_attributes_for_oid(
        NameOID.COMMON_NAME
    )
)
PROXY = FrontProxy.from_configmap(
    {
        "requestheader-client-ca-file": CA,
        "requestheader-allowed-names": json.dumps(["front-proxy-client"]),
        "requestheader-username-headers": json.dumps(["X-Remote-User"]),
        "requestheader-group-headers": json.dumps(["X-Remote-Group"]),
        "requestheader-extra-headers-prefix": json.dumps(["X-Remote-Extra-"]),
    }
)


def cert(common_name: str, issuer: str = CA_NAME) -> dict[str, object]:
    """A verified peer certificate as Python's ssl module describes it."""
    return {
        "subject": ((("organizationName", "x"),), (("commonName", common_name),)),
        "issuer": ((("commonName", issuer),),),
    }


def headers(*pairs: tuple[str, str]) -> CIMultiDict[str]:
    return CIMultiDict(pairs)


def test_the_front_proxy_speaks_for_the_user_in_its_headers() -> None:
    user = PROXY.user(
        cert("front-proxy-client"),
        headers(
            ("X-Remote-User", "system:serviceaccount:team-a:reader"),
            ("X-Remote-Group", "system:serviceaccounts"),
            ("X-Remote-Group", "system:authenticated"),
            ("X-Remote-Extra-Authentication.kubernetes.io%2fpod-name", "p1"),
        ),
    )
    assert user == User(
        "system:serviceaccount:team-a:reader",
        ("system:serviceaccounts", "system:authenticated"),
        (("authentication.kubernetes.io/pod-name", ("p1",)),),
    )


@pytest.mark.parametrize(
    ("peer", "sent"),
    [
        (None, headers(("X-Remote-User", "admin"))),  # no client certificate: a direct caller
        ({}, headers(("X-Remote-User", "admin"))),
        (cert("kubelet"), headers(("X-Remote-User", "admin"))),  # not an allowed name
        (cert("front-proxy-client"), headers()),  # no user named
        # Issued by a CA the apiserver no longer publishes (rotated away).
        (cert("front-proxy-client", issuer="old-ca"), headers(("X-Remote-User", "admin"))),
        (cert("front-proxy-client"), headers(("X-Remote-User", "x" * 2000))),
    ],
)
def test_anyone_else_is_nobody(peer: dict[str, object] | None, sent: CIMultiDict[str]) -> None:
    assert PROXY.user(peer, sent) is None


@pytest.mark.parametrize(
    ("data", "says"),
    [
        ({}, "publishes no request-header CA"),
        ({"requestheader-client-ca-file": CA, "requestheader-allowed-names": "[1]"}, "list of"),
        ({"requestheader-client-ca-file": CA, "requestheader-allowed-names": "{"}, "JSON list"),
    ],
)
def test_unusable_request_header_settings_say_why(data: dict[str, str], says: str) -> None:
    with pytest.raises(FrontProxyError, match=says):
        FrontProxy.from_configmap(data)


def test_decisions_are_kept_ten_seconds_per_user_and_request() -> None:
    asked: list[dict[str, str]] = []
    now = [0.0]

    def review(
        user: str, groups: list[str], extra: dict[str, list[str]], attributes: dict[str, str]
    ) -> tuple[bool, str]:
        asked.append(attributes)
        return attributes.get("namespace") == "team-a", "RBAC"

    reviews = AccessReviews(review, clock=lambda: now[0])
    reader = User("reader", ("g",))
    assert reviews.allowed(reader, "list", "team-a") == (True, "RBAC")
    assert reviews.allowed(reader, "list", "team-a") == (True, "RBAC")
    assert reviews.allowed(reader, "list", "team-b")[0] is False
    assert reviews.allowed(reader, "list", None)[0] is False  # every namespace: no namespace
    assert len(asked) == 3
    assert asked[0] == {
        "verb": "list",
        "group": "runs.nocturne.dev",
        "resource": "agentruns",
        "namespace": "team-a",
    }
    assert "namespace" not in asked[2]
    now[0] = 10.0
    reviews.allowed(reader, "list", "team-a")
    assert len(asked) == 4  # asked again once the decision is 10 s old
