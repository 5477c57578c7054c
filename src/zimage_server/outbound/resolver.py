"""Asynchronous DNS (dnspython) for outbound hosts. Queries are sockets on the event loop,
never a thread: a name server that is slow for one host holds up only the delivery that
asked, not the request path nor its thread pool (``getaddrinfo`` can do neither)."""

from __future__ import annotations

import asyncio
import ipaddress
from collections.abc import Sequence
from urllib.parse import urlsplit

import dns.asyncresolver
import dns.exception
import dns.nameserver
import dns.resolver

from zimage_server.core.errors import InvalidRequest, StartupError
from zimage_server.outbound.policy import IPAddress

_LOOPBACK: tuple[IPAddress, ...] = (
    ipaddress.IPv4Address("127.0.0.1"),
    ipaddress.IPv6Address("::1"),
)


class Resolver:
    """A and AAAA answers for a hostname (A first). ``nameservers`` (``host[:port]``,
    ``[v6]:port``) replace the system's ``/etc/resolv.conf``."""

    def __init__(self, nameservers: Sequence[str] = (), timeout_s: float = 5.0) -> None:
        self.timeout_s = timeout_s
        if nameservers:
            self._dns = dns.asyncresolver.Resolver(configure=False)
            self._dns.nameservers = [_nameserver(spec) for spec in nameservers]
            return
        try:
            self._dns = dns.asyncresolver.Resolver()
        except dns.resolver.NoResolverConfiguration:
            raise StartupError(
                "No system DNS configuration (/etc/resolv.conf) for webhook hosts; set "
                "ZIMAGE_WEBHOOK_DNS_SERVERS."
            ) from None

    async def resolve(self, host: str, field: str = "url") -> list[IPAddress]:
        """Every address of ``host``; InvalidRequest (naming ``field``) if it has none."""
        name = host.rstrip(".")
        if name == "localhost" or name.endswith(".localhost"):  # RFC 6761: never asked
            return list(_LOOPBACK)
        a, aaaa = await asyncio.gather(self._query(name, "A"), self._query(name, "AAAA"))
        addresses = a + aaaa
        if not addresses:
            raise InvalidRequest(f"Invalid '{field}': cannot resolve host '{host}'.", field=field)
        return addresses

    async def _query(self, name: str, rdtype: str) -> list[IPAddress]:
        try:
            answer = await self._dns.resolve(
                name + ".", rdtype, search=False, lifetime=self.timeout_s
            )
        except dns.exception.DNSException:  # NXDOMAIN, no answer, timeout, SERVFAIL
            return []
        return [ipaddress.ip_address(record.address) for record in answer]


def _nameserver(spec: str) -> dns.nameserver.Do53Nameserver:
    """``127.0.0.1``, ``127.0.0.1:5353``, ``::1`` or ``[::1]:5353``."""
    try:
        return dns.nameserver.Do53Nameserver(str(ipaddress.ip_address(spec)), 53)
    except ValueError:
        pass
    try:
        parts = urlsplit("//" + spec)
        address = ipaddress.ip_address(parts.hostname or "")
        return dns.nameserver.Do53Nameserver(str(address), parts.port or 53)
    except ValueError:
        raise StartupError(
            f"Invalid DNS server '{spec}': use an IP address, with :port if not 53."
        ) from None
