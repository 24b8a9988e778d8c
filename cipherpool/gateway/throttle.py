"""Failed authentications, counted per source address: a guesser is throttled for nothing.

Every credential the gateway has not cached costs a database lookup (a SHA-256 digest looked
up among API keys or tokens), so guessing credentials would cost the platform a lookup per
guess. The guard therefore counts each failed authentication (a missing, malformed, unknown,
revoked, expired or disabled credential; a wrong metrics token) against its source address,
in Redis so that every gateway shares the count: fixed windows of ``auth_failure_window_s``
(INCR + EXPIRE in one round trip). Once a source has failed ``auth_failure_burst`` times in a
window, every request from it that would need a lookup is answered 429 ``rate_limited`` with
``Retry-After`` (the end of the window) after one Redis read, before the lookup; a credential
this gateway holds in its cache costs no lookup and is served as usual. 0 turns it off.
With Redis out of reach the throttle lets requests through (logged): the operator's
``/metrics`` and ``/v1/platform/status`` must answer during that very outage, and every other
request needs Redis for its rate anyway.

**The source address.** The peer's address, unless the peer is a trusted proxy
(``CIPHERPOOL_TRUSTED_PROXIES``, CIDRs): then ``X-Forwarded-For`` is read from the right, each
address a trusted proxy added skipped, and the first one that is not a trusted proxy's is the
source (what the nearest trusted proxy saw). A client cannot choose its source by sending the
header itself: a header from an untrusted peer is ignored, and what a client writes in it
stands left of what the trusted proxies appended.
"""

from __future__ import annotations

import ipaddress
import logging
import math
import time
from collections.abc import Iterable, Mapping

from redis import Redis
from redis.exceptions import RedisError

from cipherpool.errors import RateLimited
from cipherpool.names import AUTH_FAILURE_PREFIX

log = logging.getLogger("cipherpool.gateway")
Network = ipaddress.IPv4Network | ipaddress.IPv6Network
MAX_FORWARDED_HOPS = 32  # addresses read from X-Forwarded-For, right to left


def networks(cidrs: Iterable[str]) -> list[Network]:
    """The trusted proxies' networks (``10.0.0.0/8``, ``192.0.2.7``, ``fd00::/8``)."""
    return [ipaddress.ip_network(cidr.strip(), strict=False) for cidr in cidrs if cidr.strip()]


def _address(text: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    text = text.strip()
    if text.startswith("[") and "]" in text:  # [v6]:port
        text = text[1 : text.index("]")]
    elif text.count(":") == 1:  # v4:port
        text = text.partition(":")[0]
    try:
        address = ipaddress.ip_address(text.split("%", 1)[0])
    except ValueError:
        return None
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped
    return address


class AuthThrottle:
    def __init__(self, redis: Redis, burst: int, window_s: int, trusted_proxies: Iterable[str] = ()):
        self._redis = redis
        self.burst, self.window_s = burst, max(1, window_s)
        self._trusted = networks(trusted_proxies)

    def _trusted_address(self, address: ipaddress.IPv4Address | ipaddress.IPv6Address | None) -> bool:
        return address is not None and any(address.version == net.version and address in net for net in self._trusted)

    def source(self, peer: str | None, headers: Mapping[str, str]) -> str:
        """The address a request counts against: the peer's, or, behind trusted proxies, the
        nearest address in ``X-Forwarded-For`` that is not a trusted proxy's."""
        peer_address = _address(peer or "")
        if not self._trusted_address(peer_address):
            return str(peer_address) if peer_address is not None else (peer or "unknown")
        source = str(peer_address)
        forwarded = headers.get("x-forwarded-for", "")
        for hop in reversed(forwarded.split(",")[-MAX_FORWARDED_HOPS:]):
            address = _address(hop)
            if address is None:
                break  # not an address: nothing left of it can be believed
            source = str(address)
            if not self._trusted_address(address):
                break
        return source

    def _key(self, source: str, window: int) -> str:
        return f"{AUTH_FAILURE_PREFIX}{source}:{window}"

    def check(self, source: str) -> None:
        """RateLimited if ``source`` has used up its failures in this window: one Redis read."""
        if self.burst <= 0:
            return
        now = time.time()
        window = int(now // self.window_s)
        try:
            failures = self._redis.get(self._key(source, window))
        except RedisError as exc:
            log.warning("failed authentications not checked (Redis): %s", exc)
            return
        if failures is not None and int(failures) >= self.burst:
            retry = max(1, math.ceil((window + 1) * self.window_s - now))
            raise RateLimited(f"Too many failed authentications from this address; retry in {retry} s.", retry_after_s=retry)

    def failed(self, source: str) -> None:
        """Count one failed authentication of ``source`` in this window."""
        if self.burst <= 0:
            return
        key = self._key(source, int(time.time() // self.window_s))
        try:
            with self._redis.pipeline(transaction=False) as pipe:
                pipe.incr(key)
                pipe.expire(key, 2 * self.window_s)
                pipe.execute()
        except RedisError as exc:
            log.warning("a failed authentication not counted (Redis): %s", exc)
