"""Outbound HTTP to addresses that users name (webhooks): judge the destination, resolve it
once without blocking anyone, and connect to exactly the address that was judged."""

from zimage_server.outbound.client import PinnedClient
from zimage_server.outbound.policy import AddressPolicy, Destination, embedded_ipv4
from zimage_server.outbound.resolver import Resolver

__all__ = ["AddressPolicy", "Destination", "PinnedClient", "Resolver", "embedded_ipv4"]
