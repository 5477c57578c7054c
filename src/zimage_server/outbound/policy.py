"""Which destinations may be called: one URL parser (httpx's, the one that connects), a
strict hostname check, and every address judged by the IPv4 address inside it if it
carries one (server-side request forgery)."""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass

import httpx
import idna

from zimage_server.core.errors import InvalidRequest

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
Network = ipaddress.IPv4Network | ipaddress.IPv6Network

MAX_URL_CHARS = 2000
# IPv6 forms that carry an IPv4 address in their low 32 bits (RFC 6052 NAT64, RFC 4291
# IPv4-compatible); ``ipaddress`` unwraps ::ffff:0:0/96, 2002::/16 and Teredo itself.
_NAT64 = ipaddress.IPv6Network("64:ff9b::/96")
_IPV4_COMPATIBLE = ipaddress.IPv6Network("::/96")
# Not globally reachable (IANA), though Python 3.11's ``is_global`` says otherwise.
_NOT_GLOBAL = (ipaddress.IPv6Network("64:ff9b:1::/48"),)  # local-use NAT64 (RFC 8215)
_LABEL = re.compile(r"[a-z0-9_]([a-z0-9_-]{0,61}[a-z0-9_])?")


def embedded_ipv4(address: IPAddress) -> ipaddress.IPv4Address | None:
    """The IPv4 address that an IPv6 address reaches (mapped, 6to4, Teredo client, NAT64,
    IPv4-compatible), or None."""
    if isinstance(address, ipaddress.IPv4Address):
        return None
    if address.ipv4_mapped is not None:
        return address.ipv4_mapped
    if address.sixtofour is not None:
        return address.sixtofour
    if address.teredo is not None:
        return address.teredo[1]  # (server, client): the client is where packets go
    if address in _NAT64 or address in _IPV4_COMPATIBLE:
        return ipaddress.IPv4Address(int(address) & 0xFFFFFFFF)
    return None


@dataclass(frozen=True)
class AddressPolicy:
    """Public unicast addresses only, unless the operator allows private ones (all, or
    some networks)."""

    allow_private: bool = False
    allowed_networks: tuple[Network, ...] = ()

    def allows(self, address: IPAddress) -> bool:
        if self.allow_private or any(address in net for net in self.allowed_networks):
            return True
        inner = embedded_ipv4(address)
        if inner is not None:  # judged by where it really goes
            return self.allows(inner)
        return (
            address.is_global
            and not address.is_multicast
            and not any(address in net for net in _NOT_GLOBAL)
        )


@dataclass(frozen=True)
class Destination:
    """A parsed http(s) URL: ``host`` is the ASCII (IDNA) hostname, ``literal`` its address
    when the URL names one."""

    url: httpx.URL
    host: str
    literal: IPAddress | None

    @classmethod
    def parse(cls, url: str, field: str) -> Destination:
        """Refuse (400 naming ``field``) anything but an absolute http(s) URL whose host is a
        valid hostname or IP address."""
        if len(url) > MAX_URL_CHARS:
            raise _invalid(field, f"must be at most {MAX_URL_CHARS} characters")
        try:
            parsed = httpx.URL(url)
        except (httpx.InvalidURL, ValueError):  # idna errors are ValueErrors
            raise _invalid(field, "must be an absolute http(s) URL") from None
        if parsed.scheme not in ("http", "https") or not parsed.raw_host:
            raise _invalid(field, "must be an absolute http(s) URL")
        if parsed.port is not None and not 0 < parsed.port < 65536:
            raise _invalid(field, "the port must be between 1 and 65535")
        host = parsed.raw_host.decode("ascii")
        literal = _literal(host)
        if literal is None:
            _check_hostname(host, field)
        return cls(parsed, host, literal)


def _literal(host: str) -> IPAddress | None:
    try:
        return ipaddress.ip_address(host)
    except ValueError:
        return None


def _check_hostname(host: str, field: str) -> None:
    """RFC 1123 labels (plus ``_``), 1..63 characters each, at most 253 in all, and not
    all-numeric at the end (``1.2.3`` is not an address here, nor a name)."""
    name = host[:-1] if host.endswith(".") else host
    labels = name.split(".")
    if len(name) > 253 or not all(_LABEL.fullmatch(label) for label in labels):
        raise _invalid(
            field,
            "the host is not a valid hostname (labels of 1 to 63 letters, digits, '-' or "
            "'_', at most 253 characters in all)",
        )
    if labels[-1].isdigit():
        raise _invalid(field, "the host is neither a hostname nor an IP address")
    if any(label.startswith("xn--") for label in labels):
        try:
            idna.decode(name)
        except idna.IDNAError:
            raise _invalid(field, "the host is not a valid internationalized name") from None


def _invalid(field: str, reason: str) -> InvalidRequest:
    return InvalidRequest(f"Invalid '{field}': {reason}.", field=field)
