"""Where an alert's webhook may point: an http(s) URL on a public address.

The call is made by a control worker, inside the cluster, next to Redis, the database and
the cloud's metadata service. A provider who could point a webhook at ``127.0.0.1:6379`` or
``169.254.169.254`` would have the platform make requests for them there. So a URL is checked
twice: when the rule is set (its form, and a literal address or ``localhost``, for an early
answer) and before every call (the host resolved, every address it resolves to checked, since
a name may point anywhere, and may change). ``webhook_allow_private`` lifts the address rule,
for a platform whose receivers live on a private network (and for tests).

Left to the operator: the check and httpx's own connection resolve the name separately, so a
name whose records change between the two (DNS rebinding) is not caught here; an egress
firewall on the control workers catches it.
"""

from __future__ import annotations

import ipaddress
import socket
from urllib.parse import urlsplit

from cipherpool.errors import InvalidInput, RefusedDestination

SCHEMES = ("http", "https")
DEFAULT_PORTS = {"http": 80, "https": 443}
IpAddress = ipaddress.IPv4Address | ipaddress.IPv6Address


# IPv6 ranges that carry an IPv4 address by a transition mechanism (a packet to them reaches,
# or is translated to, that IPv4 address): each is checked as the IPv4 address it embeds.
IPV4_MAPPED = ipaddress.IPv6Network("::ffff:0:0/96")  # ::ffff:a.b.c.d
IPV4_TRANSLATED = ipaddress.IPv6Network("::ffff:0:0:0/96")  # ::ffff:0:a.b.c.d (SIIT, RFC 2765)
IPV4_COMPATIBLE = ipaddress.IPv6Network("::/96")  # ::a.b.c.d (deprecated), e.g. ::7f00:1
NAT64 = ipaddress.IPv6Network("64:ff9b::/96")  # the well-known NAT64 prefix (RFC 6052)
NAT64_LOCAL = ipaddress.IPv6Network("64:ff9b:1::/48")  # local-use NAT64 (RFC 8215): the IPv4 may sit anywhere
SIX_TO_FOUR = ipaddress.IPv6Network("2002::/16")  # 2002:AABB:CCDD::/48 (RFC 3056)
TEREDO = ipaddress.IPv6Network("2001::/32")  # server and (inverted) client IPv4 (RFC 4380)
ISATAP_IDS = (0x00005EFE, 0x02005EFE)  # an interface id ::0:5efe:a.b.c.d or ::200:5efe:a.b.c.d (RFC 5214)
LOW_32 = 0xFFFFFFFF


def embedded_ipv4(address: ipaddress.IPv6Address) -> list[ipaddress.IPv4Address]:
    """Every IPv4 address ``address`` carries by a transition mechanism: IPv4-mapped,
    IPv4-translated, IPv4-compatible, NAT64 (well-known prefix), 6to4, Teredo (server and
    client) and ISATAP."""
    value = int(address)
    found = []
    if address in IPV4_MAPPED or address in IPV4_TRANSLATED or address in IPV4_COMPATIBLE or address in NAT64:
        found.append(ipaddress.IPv4Address(value & LOW_32))
    if address in SIX_TO_FOUR:
        found.append(ipaddress.IPv4Address((value >> 80) & LOW_32))
    if address in TEREDO:
        found.append(ipaddress.IPv4Address((value >> 64) & LOW_32))  # the server
        found.append(ipaddress.IPv4Address(~value & LOW_32))  # the client, obfuscated
    if (value >> 32) & LOW_32 in ISATAP_IDS:
        found.append(ipaddress.IPv4Address(value & LOW_32))
    return found


def public(address: IpAddress) -> bool:
    """A global unicast address: not loopback, private, link-local, multicast, reserved,
    unspecified or shared (carrier-grade NAT). An IPv6 address that embeds an IPv4 address
    (:func:`embedded_ipv4`) is public only if every IPv4 address it embeds is; one in the
    local-use NAT64 prefix never is (where its IPv4 sits is the local network's choice)."""
    if isinstance(address, ipaddress.IPv6Address):
        if address in NAT64_LOCAL:
            return False
        embedded = embedded_ipv4(address)
        if address in IPV4_MAPPED or address in IPV4_TRANSLATED or address in IPV4_COMPATIBLE:
            return bool(embedded) and all(public(v4) for v4 in embedded)  # the IPv4 address is the destination
        if not all(public(v4) for v4 in embedded):
            return False
    return address.is_global and not address.is_multicast


def check_url(url: str, allow_private: bool = False) -> str:
    """``url`` if it is an absolute http(s) URL with a host (and, unless ``allow_private``, no
    literal non-public address nor ``localhost``); InvalidInput saying what is wrong."""
    if any(c.isspace() or ord(c) < 32 for c in url):
        raise InvalidInput("A webhook URL has no spaces or control characters.")
    try:
        parts = urlsplit(url)
        parts.port  # noqa: B018 - raises ValueError for a port that is not a number in range
    except ValueError as exc:
        raise InvalidInput(f"Invalid webhook URL: {exc}.") from None
    if parts.scheme not in SCHEMES or not parts.hostname:
        raise InvalidInput(f"A webhook URL is http:// or https:// with a host, not {url[:100]!r}.")
    if parts.username is not None or parts.password is not None:
        raise InvalidInput("A webhook URL carries no user or password: the call is signed instead.")
    if not allow_private:
        _check_literal(parts.hostname)
    return url


def _check_literal(host: str) -> None:
    if host == "localhost" or host.endswith(".localhost"):
        raise RefusedDestination(f"Webhooks to {host} are refused: it is this platform's own host.")
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return  # a name: resolved and checked before each call
    if not public(address):
        raise RefusedDestination(f"Webhooks to {host} are refused: it is not a public address.")


def check_resolved(url: str, allow_private: bool = False) -> None:
    """Resolve the URL's host and refuse it if any address is not public (unless
    ``allow_private``). OSError when the name does not resolve (a retry may succeed)."""
    parts = urlsplit(check_url(url, allow_private))
    if allow_private:
        return
    host, port = parts.hostname or "", parts.port or DEFAULT_PORTS[parts.scheme]
    infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    for info in infos:
        address = ipaddress.ip_address(str(info[4][0]).split("%", 1)[0])  # drop an IPv6 zone
        if not public(address):
            raise RefusedDestination(f"Webhooks to {host} are refused: it resolves to {address}, not a public address.")
    if not infos:
        raise OSError(f"{host} resolves to no address")
