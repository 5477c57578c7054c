"""The outbound address policy and URL check, without any traffic: every IPv4-embedding
IPv6 form is judged by the IPv4 address inside, and malformed hosts are a 400 naming the
field, never an exception that becomes a 500."""

from __future__ import annotations

import asyncio
import ipaddress

import pytest

from zimage_server.core.errors import InvalidRequest
from zimage_server.jobs.webhooks import WebhookPolicy
from zimage_server.outbound import AddressPolicy, Destination, Resolver, embedded_ipv4

STRICT = AddressPolicy()


@pytest.mark.parametrize(
    ("address", "inner"),
    [
        ("::ffff:127.0.0.1", "127.0.0.1"),  # IPv4-mapped
        ("::127.0.0.1", "127.0.0.1"),  # IPv4-compatible (deprecated, still routed by some)
        ("64:ff9b::7f00:1", "127.0.0.1"),  # NAT64 well-known prefix
        ("64:ff9b::a9fe:a9fe", "169.254.169.254"),  # NAT64 to the cloud metadata service
        ("2002:0a00:0001::1", "10.0.0.1"),  # 6to4
        ("2001:0:4136:e378:8000:63bf:80ff:fffe", "127.0.0.1"),  # Teredo client
    ],
)
def test_ipv4_embedded_forms_are_judged_by_the_address_inside(address: str, inner: str) -> None:
    ip = ipaddress.ip_address(address)
    assert embedded_ipv4(ip) == ipaddress.ip_address(inner)
    assert not STRICT.allows(ip)


@pytest.mark.parametrize(
    "address",
    [
        "127.0.0.1",
        "10.1.2.3",
        "169.254.169.254",
        "100.64.0.1",
        "0.0.0.0",  # noqa: S104 - an address judged, not bound
        "224.0.0.1",
        "::1",
        "::",
        "fe80::1",
        "fc00::1",
        "64:ff9b:1::1",
    ],
)
def test_private_and_special_addresses_are_refused(address: str) -> None:
    assert not STRICT.allows(ipaddress.ip_address(address))


@pytest.mark.parametrize(
    "address", ["8.8.8.8", "2606:4700:4700::1111", "::ffff:8.8.8.8", "64:ff9b::808:808"]
)
def test_public_addresses_are_allowed(address: str) -> None:
    assert STRICT.allows(ipaddress.ip_address(address))


def test_allowed_networks_open_exactly_those_addresses() -> None:
    policy = AddressPolicy(allowed_networks=(ipaddress.ip_network("127.0.0.2/32"),))
    assert policy.allows(ipaddress.ip_address("127.0.0.2"))
    assert policy.allows(ipaddress.ip_address("::ffff:127.0.0.2"))
    assert not policy.allows(ipaddress.ip_address("127.0.0.3"))
    assert not policy.allows(ipaddress.ip_address("::ffff:127.0.0.3"))


@pytest.mark.parametrize(
    "url",
    [
        f"http://{'a' * 64}.example.com/hook",  # a label over 63 characters
        f"http://{'a.' * 130}com/hook",  # a name over 253 characters
        "http://a..b.example/hook",  # an empty label
        "http://-a.example/hook",
        "http://%41.example/hook",
        "http://xn--zz.example/hook",  # an invalid IDNA A-label
        "http://[::1/hook",
        "http://hooks.example:99999/hook",
        "http://1.2.3/hook",  # inet_aton would read it as 1.2.0.3
        "http:///hook",
        "ftp://hooks.example/hook",
        "hooks.example/hook",
        "http://" + "a" * 2000,
    ],
)
def test_malformed_urls_are_a_400_naming_the_field(url: str) -> None:
    with pytest.raises(InvalidRequest) as caught:
        Destination.parse(url, "webhook_url")
    assert caught.value.field == "webhook_url" and "'webhook_url'" in caught.value.message


def test_valid_hosts_parse_to_their_ascii_form() -> None:
    assert Destination.parse("https://Bücher.Example/h", "f").host == "xn--bcher-kva.example"
    assert Destination.parse("http://a:b@hooks.example.:8080/h", "f").host == "hooks.example."
    literal = Destination.parse("http://[::ffff:127.0.0.1]:80/h", "f").literal
    assert literal == ipaddress.ip_address("::ffff:127.0.0.1")


POLICY = WebhookPolicy(True, frozenset(), STRICT)


@pytest.mark.parametrize(
    "url",
    [
        "http://[64:ff9b::7f00:1]/h",
        "http://[2002:7f00:1::1]/h",
        "http://[::127.0.0.1]/h",
        "http://[::ffff:10.0.0.1]/h",
        "http://localhost/h",
        "http://hooks.localhost/h",
        "http://0x7f000001.localhost./h",
    ],
)
def test_submission_refuses_what_needs_no_dns(url: str) -> None:
    with pytest.raises(InvalidRequest, match="'webhook_url'"):
        POLICY.check(url)


def test_submission_does_not_resolve_names() -> None:
    class Refusing(Resolver):
        async def resolve(self, host: str, field: str = "url") -> list[ipaddress.IPv4Address]:
            raise AssertionError("resolved at submission")

    assert POLICY.check("https://hooks.example/h").host == "hooks.example"
    _, addresses = asyncio.run(
        POLICY.resolve("http://[2606:4700:4700::1111]/h", Refusing(["127.0.0.1"]))
    )
    assert addresses == [ipaddress.ip_address("2606:4700:4700::1111")]
