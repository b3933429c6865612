"""SSRF guard shared by the runner's ``web_fetch`` and the operator's webhook delivery: which IP
addresses may be connected to, name resolution with a timeout, and what a connection pinned to a
checked address sends as ``Host`` and TLS SNI.

Only globally routable unicast addresses are allowed. IPv6 addresses that embed an IPv4 address
(IPv4-mapped ``::ffff:a.b.c.d``, NAT64 ``64:ff9b::/96``, 6to4 ``2002::/16``) are judged by that
IPv4 address, which is where their packets go. ``allow_private`` (cluster config, for in-cluster
sources and receivers) unlocks loopback, private (RFC 1918, IPv6 ULA) and shared (CGNAT)
addresses — never cloud metadata endpoints (some of which sit in those very ranges:
``fd00:ec2::254``, ``100.100.100.200``), link-local, multicast, unspecified or reserved ones.

A leaf module (stdlib only): the operator imports it without importing the runner's tools.
"""

from __future__ import annotations

import concurrent.futures
import ipaddress
import socket
from collections.abc import Callable, Sequence
from dataclasses import dataclass

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network
Resolver = Callable[[str, int], Sequence[str]]

METADATA = "a cloud metadata endpoint"
LOOPBACK = "loopback"
PRIVATE = "private"
SHARED = "shared (not globally routable)"
LINK_LOCAL = "link-local (cloud metadata endpoints live here)"
MULTICAST = "multicast"
UNSPECIFIED = "unspecified"
RESERVED = "reserved"
UNLOCKED_BY_ALLOW_PRIVATE = frozenset({LOOPBACK, PRIVATE, SHARED})
# Not even an explicitly allowed network reaches these: instance credentials live there.
NEVER_UNLOCKED = frozenset({METADATA, LINK_LOCAL})

# The one list of metadata endpoints, for both guards. Listed one by one because several sit in
# ranges allow_private unlocks (ULA, CGNAT, IETF protocol assignments) or in public space.
METADATA_ADDRESSES: frozenset[IPAddress] = frozenset(
    ipaddress.ip_address(address)
    for address in (
        "169.254.169.254",  # AWS, GCP, Azure, OpenStack, Oracle, DigitalOcean (also link-local)
        "169.254.170.2",  # AWS ECS task metadata and credentials (also link-local)
        "fd00:ec2::254",  # AWS IMDS over IPv6 (a ULA: private otherwise)
        "fd20:ce::254",  # Google Cloud metadata over IPv6 (a ULA: private otherwise)
        "100.100.100.200",  # Alibaba Cloud (CGNAT space: shared otherwise)
        "192.0.0.192",  # Oracle Cloud, legacy (IETF protocol assignments: shared otherwise)
        "168.63.129.16",  # Azure WireServer (globally routable otherwise)
    )
)

_THIS_NETWORK = ipaddress.IPv4Network("0.0.0.0/8")
_NAT64 = ipaddress.IPv6Network("64:ff9b::/96")
DNS_TIMEOUT = 5.0


class BlockedAddressError(Exception):
    """The address is not one the guard lets a connection go to."""

    def __init__(self, address: IPAddress, reason: str, hint: str = "") -> None:
        super().__init__(f"address {address} is {reason}{hint}")
        self.address = address
        self.reason = reason
        self.hint = hint


class ResolveError(Exception):
    """The host name has no usable addresses; the message names the host, never a URL."""


def embedded_ipv4(ip: ipaddress.IPv6Address) -> ipaddress.IPv4Address | None:
    """The IPv4 address an IPv6 address carries (mapped, NAT64, 6to4), if any."""
    if ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    if ip in _NAT64:
        return ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF)
    return ip.sixtofour


_CATEGORIES: tuple[tuple[str, Callable[[IPAddress], bool]], ...] = (
    (METADATA, lambda ip: ip in METADATA_ADDRESSES),
    (
        UNSPECIFIED,
        lambda ip: (
            ip.is_unspecified or (isinstance(ip, ipaddress.IPv4Address) and ip in _THIS_NETWORK)
        ),
    ),
    (LOOPBACK, lambda ip: ip.is_loopback),
    (
        LINK_LOCAL,
        lambda ip: (
            ip.is_link_local or (isinstance(ip, ipaddress.IPv6Address) and ip.scope_id is not None)
        ),
    ),
    (MULTICAST, lambda ip: ip.is_multicast),
    (RESERVED, lambda ip: ip.is_reserved),
    (
        PRIVATE,
        lambda ip: ip.is_private or (isinstance(ip, ipaddress.IPv6Address) and ip.is_site_local),
    ),
    (SHARED, lambda ip: not ip.is_global),
)


def classify(ip: IPAddress) -> str | None:
    """Why ``ip`` is not a public address (a category constant), or None when it is public."""
    if isinstance(ip, ipaddress.IPv6Address):
        inner = embedded_ipv4(ip)
        if inner is not None:  # the packets go to the IPv4 address (DNS64/NAT64 clusters too)
            return classify(inner)
    return next((name for name, test in _CATEGORIES if test(ip)), None)


def check_address(
    ip: IPAddress,
    *,
    allow_private: bool = False,
    allow_networks: Sequence[IPNetwork] = (),
    setting: str = "",
) -> None:
    """Raise BlockedAddressError unless a connection may go to ``ip``. ``allow_networks`` lists
    networks allowed explicitly, whatever their category — except metadata and link-local
    addresses, which nothing unlocks. ``setting`` names the switch behind ``allow_private``
    for the error's hint."""
    reason = classify(ip)
    if reason in NEVER_UNLOCKED:
        raise BlockedAddressError(ip, str(reason))
    if any(ip.version == net.version and ip in net for net in allow_networks):
        return
    if reason is None or (allow_private and reason in UNLOCKED_BY_ALLOW_PRIVATE):
        return
    hint = (
        f" (allowed only with {setting})" if setting and reason in UNLOCKED_BY_ALLOW_PRIVATE else ""
    )
    raise BlockedAddressError(ip, reason, hint)


def system_resolver(host: str, port: int) -> list[str]:
    """The host's addresses from the system resolver, in its order, within ``DNS_TIMEOUT``."""
    pool = concurrent.futures.ThreadPoolExecutor(max_workers=1)
    try:
        future = pool.submit(socket.getaddrinfo, host, port, type=socket.SOCK_STREAM)
        infos = future.result(timeout=DNS_TIMEOUT)
    finally:
        pool.shutdown(wait=False)
    addresses: list[str] = []
    for *_, sockaddr in infos:
        address = str(sockaddr[0])
        if address not in addresses:
            addresses.append(address)
    return addresses


@dataclass(frozen=True)
class Destination:
    """Where a request goes: the URL's host (ASCII/IDNA name or IP literal) and port, and the
    addresses it resolved to once. Connect to one of ``addresses`` (checked), never to the
    name again: a DNS answer that changes in between (rebinding) then cannot move the
    connection."""

    host: str
    port: int
    literal: bool
    addresses: tuple[IPAddress, ...]

    def host_header(self, scheme: str) -> str:
        """The ``Host`` header a connection pinned to an address sends for the URL's host."""
        shown = f"[{self.host}]" if ":" in self.host else self.host
        return shown if self.port == default_port(scheme) else f"{shown}:{self.port}"

    def sni_hostname(self, scheme: str) -> str | None:
        """The TLS server name (certificates are verified against it); None for IP literals
        and plain http."""
        return self.host if scheme == "https" and not self.literal else None


def default_port(scheme: str) -> int:
    """443 for https, 80 for http."""
    return 443 if scheme == "https" else 80


def resolve(host: str, port: int, resolver: Resolver = system_resolver) -> Destination:
    """``host`` resolved once: an IP literal is its own address; a name goes to ``resolver``.
    ResolveError when the name does not resolve to at least one IP address."""
    try:
        return Destination(host, port, True, (ipaddress.ip_address(host),))
    except ValueError:
        pass
    try:
        names = resolver(host, port)
    except (OSError, concurrent.futures.TimeoutError, UnicodeError) as exc:
        reason = exc.strerror if isinstance(exc, socket.gaierror) else type(exc).__name__
        raise ResolveError(f"{host}: cannot resolve the host name ({reason})") from exc
    addresses: list[IPAddress] = []
    for name in names:
        try:
            addresses.append(ipaddress.ip_address(name))
        except ValueError as exc:
            raise ResolveError(f"{host}: the resolver returned {name!r}") from exc
    if not addresses:
        raise ResolveError(f"{host}: the host name has no addresses")
    return Destination(host, port, False, tuple(addresses))
