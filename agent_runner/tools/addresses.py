"""SSRF guard: which IP addresses ``web_fetch`` may connect to, and name resolution with a timeout.

Only globally routable unicast addresses are allowed. IPv6 addresses that embed an IPv4 address
(IPv4-mapped ``::ffff:a.b.c.d``, NAT64 ``64:ff9b::/96``, 6to4 ``2002::/16``) are judged by that
IPv4 address, which is where their packets go. ``allow_private`` (cluster config, for in-cluster
sources) unlocks loopback, private (RFC 1918, IPv6 ULA) and shared (CGNAT) addresses — never
link-local (where cloud metadata endpoints such as 169.254.169.254 live), multicast, unspecified
or reserved ones.
"""

from __future__ import annotations

import concurrent.futures
import ipaddress
import socket
from collections.abc import Callable, Sequence

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network
Resolver = Callable[[str, int], Sequence[str]]

LOOPBACK = "loopback"
PRIVATE = "private"
SHARED = "shared (not globally routable)"
LINK_LOCAL = "link-local (cloud metadata endpoints live here)"
MULTICAST = "multicast"
UNSPECIFIED = "unspecified"
RESERVED = "reserved"
UNLOCKED_BY_ALLOW_PRIVATE = frozenset({LOOPBACK, PRIVATE, SHARED})

_THIS_NETWORK = ipaddress.IPv4Network("0.0.0.0/8")
_NAT64 = ipaddress.IPv6Network("64:ff9b::/96")
DNS_TIMEOUT = 5.0


class BlockedAddressError(Exception):
    """The address is not one ``web_fetch`` may connect to."""


def embedded_ipv4(ip: ipaddress.IPv6Address) -> ipaddress.IPv4Address | None:
    """The IPv4 address an IPv6 address carries (mapped, NAT64, 6to4), if any."""
    if ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    if ip in _NAT64:
        return ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF)
    return ip.sixtofour


_CATEGORIES: tuple[tuple[str, Callable[[IPAddress], bool]], ...] = (
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
    ip: IPAddress, *, allow_private: bool = False, allow_networks: Sequence[IPNetwork] = ()
) -> None:
    """Raise BlockedAddressError unless ``web_fetch`` may connect to ``ip``. ``allow_networks``
    lists networks allowed explicitly, whatever their category."""
    if any(ip.version == net.version and ip in net for net in allow_networks):
        return
    reason = classify(ip)
    if reason is None or (allow_private and reason in UNLOCKED_BY_ALLOW_PRIVATE):
        return
    hint = (
        " (allowed only with NOCTURNE_WEB_FETCH_ALLOW_PRIVATE)"
        if reason in (UNLOCKED_BY_ALLOW_PRIVATE)
        else ""
    )
    raise BlockedAddressError(f"address {ip} is {reason}{hint}")


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
