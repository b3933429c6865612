"""The run API's own CA and serving certificate.

The Helm chart renders byte-identically (no random values, no ``lookup``), so the chart ships no
certificate: the operator creates an EC P-256 CA (10 years) and a serving certificate (1 year)
and keeps both in one Secret of its namespace (keys ``ca.crt``, ``ca.key``, ``tls.crt``,
``tls.key``). Every replica loads the same Secret; two replicas starting at once both try to
create it and the loser re-reads the winner's. The serving certificate is re-issued by the same
CA when it is close to expiry or its names changed; the CA is never rotated silently (runners
trust it through the bundle each Job carries).
"""

from __future__ import annotations

import base64
import binascii
import ipaddress
import logging
import os
import ssl
import tempfile
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, Protocol
from urllib.parse import urlsplit

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from nocturne_operator.errors import NocturneError
from nocturne_operator.settings import Settings

__all__ = [
    "CA_LIFETIME",
    "REISSUE_BEFORE",
    "SERVER_LIFETIME",
    "RunApiTls",
    "RunApiTlsError",
    "SecretStore",
    "server_hostnames",
]

log = logging.getLogger(__name__)

CA_LIFETIME = timedelta(days=3650)
SERVER_LIFETIME = timedelta(days=365)
REISSUE_BEFORE = timedelta(days=30)
"""A serving certificate expiring within this is re-issued at load."""
# Backdated so a replica or runner whose clock lags a little still accepts a fresh certificate.
_BACKDATE = timedelta(minutes=5)
_CA_NAME = "nocturne run API CA"
_KEYS = ("ca.crt", "ca.key", "tls.crt", "tls.key")
_ATTEMPTS = 5


class RunApiTlsError(NocturneError):
    """The run API's certificates cannot be loaded or stored; the message names the Secret."""


class SecretStore(Protocol):
    """The part of ``nocturne_operator.adapters.kube.Kube`` the certificates need."""

    def get(self, kind: str, namespace: str, name: str) -> dict[str, Any] | None: ...

    def create(self, obj: dict[str, Any]) -> dict[str, Any] | None: ...

    def replace(self, obj: dict[str, Any]) -> dict[str, Any] | None: ...


def server_hostnames(settings: Settings) -> list[str]:
    """The serving certificate's names: run_api_url's host, then run_api_hostnames and, with
    the admission webhook on, webhook_host (no duplicates, in order)."""
    names: list[str] = []
    host = urlsplit(settings.run_api_url).hostname
    webhook = [settings.webhook_host] if settings.webhook_port else []
    for raw in [host or "", *settings.run_api_hostnames, *webhook]:
        name = raw.strip().lower()
        if name and name not in names:
            names.append(name)
    if not names:
        raise RunApiTlsError(
            f"run_api_url {settings.run_api_url!r}: has no host name for the serving certificate"
        )
    return names


def _san_entries(hostnames: list[str]) -> list[x509.GeneralName]:
    entries: list[x509.GeneralName] = []
    for name in hostnames:
        try:
            entries.append(x509.IPAddress(ipaddress.ip_address(name.strip("[]"))))
        except ValueError:
            entries.append(x509.DNSName(name))
    return entries


def _san_set(cert: x509.Certificate) -> set[str]:
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return set()
    return {str(v).lower() for v in san.get_values_for_type(x509.DNSName)} | {
        str(v) for v in san.get_values_for_type(x509.IPAddress)
    }


def _wanted_sans(hostnames: list[str]) -> set[str]:
    wanted = set()
    for entry in _san_entries(hostnames):
        wanted.add(str(entry.value).lower())
    return wanted


def _new_key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def _cert_pem(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


def _new_ca(now: datetime) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    key = _new_key()
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, _CA_NAME)])
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - _BACKDATE)
        .not_valid_after(now + CA_LIFETIME)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=False,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
    return cert, key


def _issue_server_cert(
    ca_cert: x509.Certificate,
    ca_key: ec.EllipticCurvePrivateKey,
    hostnames: list[str],
    now: datetime,
) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    key = _new_key()
    # CN is capped at 64 characters by X.509; clients check the SANs anyway.
    subject = x509.Name(
        [x509.NameAttribute(NameOID.COMMON_NAME, hostnames[0])] if len(hostnames[0]) <= 64 else []
    )
    ski = ca_cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - _BACKDATE)
        .not_valid_after(min(now + SERVER_LIFETIME, ca_cert.not_valid_after_utc))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=False,
                crl_sign=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(x509.SubjectAlternativeName(_san_entries(hostnames)), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ski), critical=False
        )
        .sign(ca_key, hashes.SHA256())
    )
    return cert, key


@dataclass(frozen=True)
class RunApiTls:
    """The CA (its PEM is the bundle each Job carries) and the serving certificate."""

    ca_cert: x509.Certificate
    ca_key: ec.EllipticCurvePrivateKey
    cert: x509.Certificate
    key: ec.EllipticCurvePrivateKey

    def __repr__(self) -> str:  # never print key material
        return (
            f"RunApiTls(ca={self.ca_cert.subject.rfc4514_string()!r}, "
            f"sans={sorted(_san_set(self.cert))}, expires={self.cert.not_valid_after_utc})"
        )

    @property
    def ca_pem(self) -> str:
        """The CA certificate in PEM: what runners trust."""
        return _cert_pem(self.ca_cert).decode("ascii")

    @property
    def hostnames(self) -> set[str]:
        """DNS names and IP addresses the serving certificate is valid for."""
        return _san_set(self.cert)

    def server_context(self) -> ssl.SSLContext:
        """A TLS server context (TLS 1.2 or newer) serving the certificate."""
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.minimum_version = ssl.TLSVersion.TLSv1_2
        self.load_into(context)
        return context

    def load_into(self, context: ssl.SSLContext) -> None:
        """Serve this certificate from ``context`` (a listening server's too: connections made
        from now on get it, open ones keep theirs)."""
        # ssl loads a key only from a file: a private directory that lives for this call only.
        with tempfile.TemporaryDirectory(prefix="nocturne-tls-") as tmp:
            path = Path(tmp) / "server.pem"
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "wb") as handle:
                handle.write(_key_pem(self.key) + _cert_pem(self.cert))
            context.load_cert_chain(path)

    def write_pem(self, path: Path) -> None:
        """Write the key and certificate, PEM, to ``path`` (0600, replaced atomically): for a
        server that reads its certificate from a file (kopf's webhook server watches it)."""
        temporary = path.with_suffix(".tmp")
        fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "wb") as handle:
            handle.write(_key_pem(self.key) + _cert_pem(self.cert))
        temporary.replace(path)

    # ---- issuing --------------------------------------------------------------------------

    @classmethod
    def create(cls, hostnames: list[str], *, now: datetime | None = None) -> RunApiTls:
        """A new CA and a serving certificate for ``hostnames`` (DNS names or IP literals)."""
        moment = now or datetime.now(UTC)
        ca_cert, ca_key = _new_ca(moment)
        cert, key = _issue_server_cert(ca_cert, ca_key, hostnames, moment)
        return cls(ca_cert, ca_key, cert, key)

    def reissue_reason(self, hostnames: list[str], *, now: datetime | None = None) -> str | None:
        """Why the serving certificate must be re-issued (names, expiry, issuer), or None."""
        moment = now or datetime.now(UTC)
        if _san_set(self.cert) != _wanted_sans(hostnames):
            return f"its names {sorted(_san_set(self.cert))} differ from {sorted(hostnames)}"
        if self.cert.not_valid_after_utc - moment < REISSUE_BEFORE:
            return f"it expires at {self.cert.not_valid_after_utc.isoformat()}"
        if self.cert.not_valid_before_utc > moment:
            return f"it is not valid before {self.cert.not_valid_before_utc.isoformat()}"
        try:
            self.cert.verify_directly_issued_by(self.ca_cert)
        except (ValueError, TypeError, InvalidSignature):
            return "it was not issued by the CA"
        if self.cert.public_key() != self.key.public_key():
            return "its key does not match"
        return None

    def with_new_server_cert(
        self, hostnames: list[str], *, now: datetime | None = None
    ) -> RunApiTls:
        """The same CA with a fresh serving certificate for ``hostnames``."""
        moment = now or datetime.now(UTC)
        cert, key = _issue_server_cert(self.ca_cert, self.ca_key, hostnames, moment)
        return RunApiTls(self.ca_cert, self.ca_key, cert, key)

    # ---- the Secret ----------------------------------------------------------------------

    def secret_data(self) -> dict[str, str]:
        """The Secret's ``data`` (base64 of the PEM texts)."""
        texts = {
            "ca.crt": _cert_pem(self.ca_cert),
            "ca.key": _key_pem(self.ca_key),
            "tls.crt": _cert_pem(self.cert),
            "tls.key": _key_pem(self.key),
        }
        return {k: base64.b64encode(v).decode("ascii") for k, v in texts.items()}

    @classmethod
    def from_secret(cls, secret: dict[str, Any], where: str) -> RunApiTls:
        """The material of a Secret written by ``secret_data``; RunApiTlsError naming the key
        that is missing or unreadable (never its content)."""
        data = secret.get("data") or {}
        pems: dict[str, bytes] = {}
        for name in _KEYS:
            if name not in data:
                raise RunApiTlsError(f"{where}: has no key {name!r}")
            try:
                pems[name] = base64.b64decode(data[name], validate=True)
            except (binascii.Error, TypeError, ValueError):
                raise RunApiTlsError(f"{where}: key {name!r} is not base64") from None
        try:
            ca_cert = x509.load_pem_x509_certificate(pems["ca.crt"])
            cert = x509.load_pem_x509_certificate(pems["tls.crt"])
        except ValueError:
            raise RunApiTlsError(f"{where}: ca.crt or tls.crt is not a PEM certificate") from None
        keys = []
        for name in ("ca.key", "tls.key"):
            try:
                key = serialization.load_pem_private_key(pems[name], password=None)
            except (ValueError, TypeError):
                raise RunApiTlsError(f"{where}: {name} is not a PEM private key") from None
            if not isinstance(key, ec.EllipticCurvePrivateKey):
                raise RunApiTlsError(f"{where}: {name} is not an EC private key")
            keys.append(key)
        ca_key, key = keys
        if ca_cert.public_key() != ca_key.public_key():
            raise RunApiTlsError(f"{where}: ca.key does not belong to ca.crt")
        return cls(ca_cert, ca_key, cert, key)

    @classmethod
    def load_or_create(
        cls, kube: SecretStore | None, settings: Settings, *, now: datetime | None = None
    ) -> RunApiTls:
        """The certificates from the Secret ``run_api_tls_secret`` in ``run_api_tls_namespace``,
        created when missing; the serving certificate is re-issued (same CA) when its names
        changed or it expires within REISSUE_BEFORE. An empty namespace: an in-memory CA."""
        hostnames = server_hostnames(settings)
        namespace, name = settings.run_api_tls_namespace, settings.run_api_tls_secret
        if not namespace:
            log.warning(
                "run API: in-memory CA (run_api_tls_namespace is empty); runners of another "
                "replica or a restarted operator will not trust it - development only"
            )
            return cls.create(hostnames, now=now)
        if kube is None:
            raise RunApiTlsError("run API certificates: no Kubernetes client to store them")
        where = f"Secret {namespace}/{name}"
        for _ in range(_ATTEMPTS):
            secret = kube.get("Secret", namespace, name)
            if secret is None:
                tls = cls.create(hostnames, now=now)
                if kube.create(tls._secret(namespace, name)) is None:
                    continue  # another replica created it first: use theirs
                log.info("run API: created CA and serving certificate in %s", where)
                return tls
            tls = cls.from_secret(secret, where)
            moment = now or datetime.now(UTC)
            if tls.ca_cert.not_valid_after_utc - moment < REISSUE_BEFORE:
                raise RunApiTlsError(
                    f"{where}: the run API CA expires at "
                    f"{tls.ca_cert.not_valid_after_utc.isoformat()}; rotating it changes what "
                    "every runner trusts, so it is never done silently: delete the Secret and "
                    "restart the operator (running Jobs then fail their reports)"
                )
            reason = tls.reissue_reason(hostnames, now=now)
            if reason is None:
                return tls
            fresh = tls.with_new_server_cert(hostnames, now=now)
            updated = dict(secret)
            updated["data"] = {**(secret.get("data") or {}), **fresh.secret_data()}
            if kube.replace(updated) is None:
                continue  # changed under us (another replica): re-read
            log.info("run API: re-issued the serving certificate in %s: %s", where, reason)
            return fresh
        raise RunApiTlsError(f"{where}: kept changing while being read {_ATTEMPTS} times")

    def _secret(self, namespace: str, name: str) -> dict[str, Any]:
        return {
            "apiVersion": "v1",
            "kind": "Secret",
            "type": "Opaque",
            "metadata": {
                "name": name,
                "namespace": namespace,
                "labels": {
                    "app.kubernetes.io/managed-by": "nocturne-operator",
                    "app.kubernetes.io/component": "run-api-tls",
                },
            },
            "data": self.secret_data(),
        }
