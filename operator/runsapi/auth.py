"""Who asks, and may they: delegated authentication and authorisation, as aggregated API
servers do it.

The kube-apiserver authenticates the user and proxies the request with its front-proxy client
certificate and the user in request headers (``X-Remote-User``, ``X-Remote-Group``,
``X-Remote-Extra-*``). Those headers are believed only from a TLS client certificate that chains
to the request-header CA and whose common name is an allowed name -- both read from the
ConfigMap ``kube-system/extension-apiserver-authentication`` the apiserver publishes. Anything
else is 401: a caller that reaches this port directly cannot claim to be someone.

Authorisation is a SubjectAccessReview of the request's verb on ``agentruns.runs.nocturne.dev``
in its namespace: RBAC on the user's side decides. Decisions are kept 10 s (as the apiserver's
delegating authoriser does), so a page-by-page listing costs one review.
"""

from __future__ import annotations

import functools
import json
import ssl
import threading
import time
import urllib.parse
from collections import OrderedDict
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from cryptography import x509
from cryptography.x509.oid import NameOID

from nocturne_operator.adapters.kube import Kube
from nocturne_operator.errors import NocturneError
from nocturne_operator.runsapi.resources import GROUP, RESOURCE

__all__ = [
    "AUTHENTICATION_CONFIGMAP",
    "AccessReviews",
    "FrontProxy",
    "FrontProxyError",
    "User",
]

AUTHENTICATION_CONFIGMAP = ("kube-system", "extension-apiserver-authentication")
_DECISION_TTL = 10.0
_DECISIONS_KEPT = 10_000
_HEADER_CHARS = 1024


class FrontProxyError(NocturneError):
    """The request-header configuration cannot be read or used."""


@dataclass(frozen=True)
class User:
    """The user the apiserver authenticated, as its headers say."""

    name: str
    groups: tuple[str, ...] = ()
    extra: tuple[tuple[str, tuple[str, ...]], ...] = ()

    def extra_dict(self) -> dict[str, list[str]]:
        return {k: list(v) for k, v in self.extra}


def _json_list(data: Mapping[str, str], key: str, default: list[str]) -> list[str]:
    raw = data.get(key)
    if not raw:
        return default
    try:
        value = json.loads(raw)
    except ValueError:
        raise FrontProxyError(f"{AUTHENTICATION_CONFIGMAP[1]}: {key} is not a JSON list") from None
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise FrontProxyError(f"{AUTHENTICATION_CONFIGMAP[1]}: {key} is not a list of strings")
    return value


@dataclass(frozen=True)
class FrontProxy:
    """The apiserver's request-header settings: whom to believe, and which headers."""

    client_ca: str
    allowed_names: tuple[str, ...]
    username_headers: tuple[str, ...] = ("X-Remote-User",)
    group_headers: tuple[str, ...] = ("X-Remote-Group",)
    extra_prefixes: tuple[str, ...] = ("X-Remote-Extra-",)

    @classmethod
    def from_configmap(cls, data: Mapping[str, str]) -> FrontProxy:
        """From ``extension-apiserver-authentication``'s data; FrontProxyError when the
        apiserver has no request-header CA (the aggregation layer is not configured)."""
        ca = data.get("requestheader-client-ca-file", "")
        if "BEGIN CERTIFICATE" not in ca:
            raise FrontProxyError(
                "the apiserver publishes no request-header CA "
                f"({'/'.join(AUTHENTICATION_CONFIGMAP)}: requestheader-client-ca-file): "
                "enable the aggregation layer (--requestheader-client-ca-file and the proxy "
                "client certificate)"
            )
        return cls(
            client_ca=ca,
            allowed_names=tuple(_json_list(data, "requestheader-allowed-names", [])),
            username_headers=tuple(
                _json_list(data, "requestheader-username-headers", ["X-Remote-User"])
            ),
            group_headers=tuple(
                _json_list(data, "requestheader-group-headers", ["X-Remote-Group"])
            ),
            extra_prefixes=tuple(
                _json_list(data, "requestheader-extra-headers-prefix", ["X-Remote-Extra-"])
            ),
        )

    @classmethod
    def load(cls, kube: Kube) -> FrontProxy:
        """Read the apiserver's published configuration."""
        found = kube.get("ConfigMap", *AUTHENTICATION_CONFIGMAP)
        if found is None:
            raise FrontProxyError(f"ConfigMap {'/'.join(AUTHENTICATION_CONFIGMAP)} not found")
        return cls.from_configmap(found.get("data") or {})

    def trust(self, context: ssl.SSLContext) -> None:
        """Ask TLS clients for a certificate and verify any against the request-header CA (a
        client without one may still connect: health checks; it is then nobody)."""
        context.verify_mode = ssl.CERT_OPTIONAL
        context.load_verify_locations(cadata=self.client_ca)

    def user(self, peercert: Mapping[str, Any] | None, headers: Mapping[str, str]) -> User | None:
        """The user a request speaks for, or None when it does not come from the front proxy
        (no verified client certificate, a name not allowed, or no user header)."""
        if not peercert:
            return None
        # TLS verified the chain against every CA ever trusted by this listener (a context only
        # adds CAs); the issuer must be one the apiserver publishes now (a rotation drops one).
        issuers = {
            value for rdn in peercert.get("issuer", ()) for key, value in rdn if key == "commonName"
        }
        if not issuers & _common_names(self.client_ca):
            return None
        names = {
            value
            for rdn in peercert.get("subject", ())
            for key, value in rdn
            if key == "commonName"
        }
        if self.allowed_names and not names & set(self.allowed_names):
            return None
        name = next((v for h in self.username_headers if (v := headers.get(h))), "")
        if not name or len(name) > _HEADER_CHARS:
            return None
        groups = tuple(
            value[:_HEADER_CHARS]
            for header in self.group_headers
            for value in _all(headers, header)
        )
        extra: dict[str, list[str]] = {}
        for header, value in _items(headers):
            for prefix in self.extra_prefixes:
                if header.lower().startswith(prefix.lower()):
                    key = urllib.parse.unquote(header[len(prefix) :]).lower()
                    extra.setdefault(key, []).append(value[:_HEADER_CHARS])
        return User(name, groups, tuple((k, tuple(v)) for k, v in sorted(extra.items())))


@functools.lru_cache(maxsize=8)
def _common_names(bundle: str) -> frozenset[str]:
    """The common names of the certificates in a PEM bundle (none if it does not parse)."""
    try:
        certificates = x509.load_pem_x509_certificates(bundle.encode())
    except ValueError:
        return frozenset()
    return frozenset(
        str(attribute.value)
        for certificate in certificates
        for attribute in certificate.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    )


def _all(headers: Mapping[str, str], name: str) -> list[str]:
    getall = getattr(headers, "getall", None)
    if getall is not None:
        return list(getall(name, []))
    value = headers.get(name)
    return [] if value is None else [value]


def _items(headers: Mapping[str, str]) -> list[tuple[str, str]]:
    return list(headers.items())


Review = Callable[[str, list[str], dict[str, list[str]], dict[str, str]], tuple[bool, str]]
"""(user, groups, extra, resource attributes) -> (allowed, reason): Kube.review_access."""


@dataclass
class AccessReviews:
    """SubjectAccessReviews of agentruns requests, decisions kept ``ttl`` seconds."""

    review: Review
    ttl: float = _DECISION_TTL
    clock: Callable[[], float] = time.monotonic
    _kept: OrderedDict[tuple[Any, ...], tuple[bool, str, float]] = field(
        default_factory=OrderedDict
    )
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def allowed(
        self, user: User, verb: str, namespace: str | None, name: str = ""
    ) -> tuple[bool, str]:
        """May ``user`` ``verb`` agentruns in ``namespace`` (None: every namespace)?"""
        key = (user, verb, namespace, name)
        now = self.clock()
        with self._lock:
            kept = self._kept.get(key)
            if kept is not None and now - kept[2] < self.ttl:
                self._kept.move_to_end(key)
                return kept[0], kept[1]
        attributes = {"verb": verb, "group": GROUP, "resource": RESOURCE}
        if namespace is not None:
            attributes["namespace"] = namespace
        if name:
            attributes["name"] = name
        allowed, reason = self.review(user.name, list(user.groups), user.extra_dict(), attributes)
        with self._lock:
            self._kept[key] = (allowed, reason, now)
            while len(self._kept) > _DECISIONS_KEPT:
                self._kept.popitem(last=False)
        return allowed, reason
