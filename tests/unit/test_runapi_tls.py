"""The run API's CA and serving certificate: names, re-issue rules and the Secret round trip."""

from __future__ import annotations

import contextlib
import copy
import ipaddress
import logging
import ssl
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from cryptography import x509

from nocturne_operator.runapi.tls import (
    REISSUE_BEFORE,
    RunApiTls,
    RunApiTlsError,
    server_hostnames,
)
from nocturne_operator.settings import Settings

NOW = datetime(2026, 3, 1, 9, 0, tzinfo=UTC)


def sans(tls: RunApiTls) -> tuple[list[str], list[Any]]:
    ext = tls.cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    return ext.get_values_for_type(x509.DNSName), ext.get_values_for_type(x509.IPAddress)


class FakeSecrets:
    """Only the Secret store: get/create (None on AlreadyExists)/replace (None on a stale
    resourceVersion), as the apiserver does."""

    def __init__(self) -> None:
        self.objects: dict[tuple[str, str], dict[str, Any]] = {}
        self.version = 0
        self.creates = 0
        self.replaces = 0

    def get(self, kind: str, namespace: str, name: str) -> dict[str, Any] | None:
        assert kind == "Secret"
        obj = self.objects.get((namespace, name))
        return copy.deepcopy(obj)

    def create(self, obj: dict[str, Any]) -> dict[str, Any] | None:
        self.creates += 1
        key = (obj["metadata"]["namespace"], obj["metadata"]["name"])
        if key in self.objects:
            return None
        self.version += 1
        stored = copy.deepcopy(obj)
        stored["metadata"]["resourceVersion"] = str(self.version)
        self.objects[key] = stored
        return copy.deepcopy(stored)

    def replace(self, obj: dict[str, Any]) -> dict[str, Any] | None:
        self.replaces += 1
        key = (obj["metadata"]["namespace"], obj["metadata"]["name"])
        current = self.objects[key]
        if current["metadata"]["resourceVersion"] != obj["metadata"]["resourceVersion"]:
            return None
        self.version += 1
        stored = copy.deepcopy(obj)
        stored["metadata"]["resourceVersion"] = str(self.version)
        self.objects[key] = stored
        return copy.deepcopy(stored)


def settings(**overrides: Any) -> Settings:
    values: dict[str, Any] = {
        "run_api_url": "https://nocturne-run-api.nocturne-system.svc:8443",
        "run_api_tls_namespace": "nocturne-system",
        **overrides,
    }
    return Settings(**values)


def test_names_come_from_the_url_then_the_extra_hostnames_without_duplicates() -> None:
    s = settings(run_api_hostnames=["Nocturne-Run-API.nocturne-system.svc", "10.0.0.7", "::1"])
    assert server_hostnames(s) == ["nocturne-run-api.nocturne-system.svc", "10.0.0.7", "::1"]


def test_ip_literals_become_ip_sans_and_names_dns_sans() -> None:
    tls = RunApiTls.create(["run-api.example", "10.0.0.7", "::1"], now=NOW)
    dns, ips = sans(tls)
    assert dns == ["run-api.example"]
    assert ips == [ipaddress.ip_address("10.0.0.7"), ipaddress.ip_address("::1")]


def test_lifetimes_and_constraints() -> None:
    tls = RunApiTls.create(["run-api.example"], now=NOW)
    assert tls.ca_cert.not_valid_after_utc - NOW == timedelta(days=3650)
    assert tls.cert.not_valid_after_utc - NOW == timedelta(days=365)
    ca = tls.ca_cert.extensions.get_extension_for_class(x509.BasicConstraints).value
    leaf = tls.cert.extensions.get_extension_for_class(x509.BasicConstraints).value
    assert ca.ca
    assert not leaf.ca
    tls.cert.verify_directly_issued_by(tls.ca_cert)
    assert tls.ca_pem.startswith("-----BEGIN CERTIFICATE-----")
    assert "PRIVATE" not in tls.ca_pem
    assert "PRIVATE" not in repr(tls)


def handshake(server: ssl.SSLContext, ca_pem: str, host: str) -> dict[str, Any]:
    """A TLS handshake in memory with the strict default client context (the runner's) that
    trusts ``ca_pem``; the server certificate the client accepted."""
    client = ssl.create_default_context(cadata=ca_pem)
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    s_in, s_out = ssl.MemoryBIO(), ssl.MemoryBIO()
    c = client.wrap_bio(incoming, outgoing, server_hostname=host)
    s = server.wrap_bio(s_in, s_out, server_side=True)
    for _ in range(10):
        for side in (c, s):
            with contextlib.suppress(ssl.SSLWantReadError):
                side.do_handshake()
        s_in.write(outgoing.read())
        incoming.write(s_out.read())
    c.do_handshake()
    peer = c.getpeercert()
    assert peer is not None
    return dict(peer)


def test_server_context_loads_and_a_client_trusting_the_ca_verifies_the_chain() -> None:
    tls = RunApiTls.create(["run-api.example"])
    server = tls.server_context()
    assert server.minimum_version >= ssl.TLSVersion.TLSv1_2
    handshake(server, tls.ca_pem, "run-api.example")


def test_a_renewed_certificate_is_served_from_the_same_listening_context() -> None:
    """The operator renews the serving certificate in place: later handshakes get the new one
    (an operator running past the first certificate's year keeps serving a valid one)."""
    tls = RunApiTls.create(["run-api.example"])
    server = tls.server_context()
    before = handshake(server, tls.ca_pem, "run-api.example")
    renewed = tls.with_new_server_cert(["run-api.example"])
    renewed.load_into(server)
    after = handshake(server, tls.ca_pem, "run-api.example")
    assert int(before["serialNumber"], 16) == tls.cert.serial_number
    assert int(after["serialNumber"], 16) == renewed.cert.serial_number


def test_reissue_reasons() -> None:
    tls = RunApiTls.create(["run-api.example"], now=NOW)
    assert tls.reissue_reason(["run-api.example"], now=NOW) is None
    assert "names" in (tls.reissue_reason(["other.example"], now=NOW) or "")
    near_expiry = tls.cert.not_valid_after_utc - REISSUE_BEFORE + timedelta(seconds=1)
    assert "expires" in (tls.reissue_reason(["run-api.example"], now=near_expiry) or "")
    other = RunApiTls.create(["run-api.example"], now=NOW)
    mixed = RunApiTls(tls.ca_cert, tls.ca_key, other.cert, other.key)
    assert "not issued by the CA" in (mixed.reissue_reason(["run-api.example"], now=NOW) or "")


def test_empty_namespace_is_an_in_memory_ca_with_a_warning(
    caplog: pytest.LogCaptureFixture,
) -> None:
    with caplog.at_level(logging.WARNING):
        tls = RunApiTls.load_or_create(None, settings(run_api_tls_namespace=""), now=NOW)
    assert tls.hostnames == {"nocturne-run-api.nocturne-system.svc"}
    assert "development only" in caplog.text


def test_secret_is_created_once_and_reused() -> None:
    store = FakeSecrets()
    first = RunApiTls.load_or_create(store, settings(), now=NOW)
    second = RunApiTls.load_or_create(store, settings(), now=NOW + timedelta(days=1))
    assert second.ca_pem == first.ca_pem
    assert second.cert == first.cert
    secret = store.objects[("nocturne-system", "nocturne-run-api-tls")]
    assert set(secret["data"]) == {"ca.crt", "ca.key", "tls.crt", "tls.key"}
    assert (store.creates, store.replaces) == (1, 0)


def test_a_replica_that_loses_the_create_race_uses_the_winners_secret() -> None:
    store = FakeSecrets()
    winner = RunApiTls.create(["nocturne-run-api.nocturne-system.svc"], now=NOW)
    real_get = store.get
    calls = 0

    def get_after_race(kind: str, namespace: str, name: str) -> dict[str, Any] | None:
        nonlocal calls
        calls += 1
        if calls == 1:  # we saw no Secret, then the other replica created it
            store.objects[(namespace, name)] = {
                **winner._secret(namespace, name),
                "metadata": {"name": name, "namespace": namespace, "resourceVersion": "7"},
            }
            return None
        return real_get(kind, namespace, name)

    store.get = get_after_race  # type: ignore[method-assign]
    tls = RunApiTls.load_or_create(store, settings(), now=NOW)
    assert tls.ca_pem == winner.ca_pem
    assert tls.cert == winner.cert


def test_near_expiry_or_new_names_reissue_the_serving_cert_with_the_same_ca() -> None:
    store = FakeSecrets()
    first = RunApiTls.load_or_create(store, settings(), now=NOW)
    later = first.cert.not_valid_after_utc - timedelta(days=10)
    renewed = RunApiTls.load_or_create(store, settings(), now=later)
    assert renewed.ca_pem == first.ca_pem
    assert renewed.cert != first.cert
    assert renewed.cert.not_valid_after_utc > first.cert.not_valid_after_utc
    renamed = RunApiTls.load_or_create(store, settings(run_api_hostnames=["10.1.2.3"]), now=later)
    assert renamed.ca_pem == first.ca_pem
    assert renamed.hostnames == {"nocturne-run-api.nocturne-system.svc", "10.1.2.3"}
    assert store.replaces == 2
    # What the Secret holds now is what the next replica loads.
    again = RunApiTls.load_or_create(store, settings(run_api_hostnames=["10.1.2.3"]), now=later)
    assert again.cert == renamed.cert


def test_the_ca_is_never_rotated_silently() -> None:
    store = FakeSecrets()
    first = RunApiTls.load_or_create(store, settings(), now=NOW)
    with pytest.raises(RunApiTlsError, match="never done silently"):
        RunApiTls.load_or_create(store, settings(), now=first.ca_cert.not_valid_after_utc)
    secret = store.objects[("nocturne-system", "nocturne-run-api-tls")]
    del secret["data"]["ca.key"]
    with pytest.raises(RunApiTlsError, match=r"has no key 'ca\.key'"):
        RunApiTls.load_or_create(store, settings(), now=NOW)
