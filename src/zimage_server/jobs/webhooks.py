"""Webhooks: who may be called, how bodies are signed, and the delivery loop.

Signature: ``X-Zimage-Signature: t=<unix seconds>,v1=<hex HMAC-SHA256(secret, "<t>.<body>")>``.
Receivers recompute it over the raw body and reject old timestamps (replay protection).
Deliveries live in the database and each attempt runs in a task of its own, retried with
exponential back-off, so a slow receiver never holds up rendering or another delivery, and
a restart loses nothing. Each attempt runs under a lease on its row (longer than an attempt
can take), so with many API processes each delivery is sent by one of them at a time, and
one whose process died is retried by a live one once the lease runs out. Delivery is
at least once: a process killed after the receiver answered but before the row was
updated leaves it to be sent again, under the same ``X-Zimage-Delivery`` id, which
receivers use to ignore repeats.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import hashlib
import hmac
import ipaddress
import logging
import time
from collections import Counter
from dataclasses import dataclass

import httpx

from zimage_server.core.config import Settings
from zimage_server.core.errors import InvalidRequest
from zimage_server.jobs.repository import JobRepository
from zimage_server.outbound import AddressPolicy, Destination, PinnedClient, Resolver
from zimage_server.outbound.policy import IPAddress
from zimage_server.store.models import WebhookDelivery

log = logging.getLogger("zimage.webhooks")
POLL_INTERVAL_S = 0.25
FIELD = "webhook_url"


def sign(secret: bytes, timestamp: int, body: bytes) -> str:
    digest = hmac.new(secret, f"{timestamp}.".encode() + body, hashlib.sha256).hexdigest()
    return f"t={timestamp},v1={digest}"


def verify(secret: bytes, header: str, body: bytes, tolerance_s: int = 300) -> bool:
    """What a receiver does (also used by our tests): constant-time, with a replay window."""
    try:
        fields = dict(part.split("=", 1) for part in header.split(","))
        timestamp = int(fields["t"])
    except (KeyError, ValueError):
        return False
    if abs(time.time() - timestamp) > tolerance_s:
        return False
    return hmac.compare_digest(sign(secret, timestamp, body), header)


@dataclass(frozen=True)
class WebhookPolicy:
    """Refuse targets the operator has not allowed: by default no private, loopback,
    link-local or reserved addresses (server-side request forgery).

    At submission only what needs no DNS is judged (syntax, literal addresses,
    ``localhost``): a tenant's slow name server must not hold up the request path, and
    answers about internal names would tell a caller which ones exist. Names are resolved
    at delivery, every address judged, and the delivery connects to the judged address.
    """

    enabled: bool
    allowed_hosts: frozenset[str]
    addresses: AddressPolicy

    @classmethod
    def from_settings(cls, settings: Settings) -> WebhookPolicy:
        return cls(
            settings.webhook_secret is not None,
            frozenset(host.lower().rstrip(".") for host in settings.webhook_allowed_hosts),
            AddressPolicy(settings.webhook_allow_private, tuple(settings.webhook_allowed_networks)),
        )

    def check(self, url: str) -> Destination:
        """At submission: 400 naming ``webhook_url`` for anything refused without DNS."""
        if not self.enabled:
            raise InvalidRequest(
                "Invalid 'webhook_url': webhooks are disabled on this server "
                "(the operator has not set ZIMAGE_WEBHOOK_SECRET).",
                field="webhook_url",
            )
        destination = Destination.parse(url, FIELD)
        name = destination.host.rstrip(".")
        if destination.literal is not None:
            self._judge(destination, [destination.literal])
        elif name == "localhost" or name.endswith(".localhost"):
            self._judge(destination, [ipaddress.ip_address("127.0.0.1")])
        return destination

    async def resolve(self, url: str, resolver: Resolver) -> tuple[Destination, list[IPAddress]]:
        """At delivery: the addresses to connect to, every one of them judged."""
        destination = self.check(url)
        if destination.literal is not None:
            return destination, [destination.literal]
        addresses = await resolver.resolve(destination.host, FIELD)
        self._judge(destination, addresses)
        return destination, addresses

    def _judge(self, destination: Destination, addresses: list[IPAddress]) -> None:
        if destination.host.rstrip(".") in self.allowed_hosts:
            return
        refused = [str(a) for a in addresses if not self.addresses.allows(a)]
        if refused:
            raise InvalidRequest(
                f"Invalid 'webhook_url': {destination.host} is (or resolves to) a private or "
                f"local address ({', '.join(refused)}) that the operator has not allowed "
                "(ZIMAGE_WEBHOOK_ALLOWED_HOSTS, ZIMAGE_WEBHOOK_ALLOWED_NETWORKS).",
                field=FIELD,
            )


class WebhookDeliverer:
    """Sends due deliveries, each in a task of its own: a receiver that never answers holds
    only its own delivery (cut at ``timeout_s``, resolution included), never another's.
    At most ``per_key`` deliveries of one API key and ``total`` in all are in flight;
    failures are retried with back-off ``base x 2^(attempt-1)``."""

    def __init__(
        self,
        repo: JobRepository,
        secret: bytes,
        policy: WebhookPolicy,
        resolver: Resolver,
        client: PinnedClient,
        limits: DeliveryLimits,
        replica: str = "local",
    ) -> None:
        self.repo, self.secret, self.policy = repo, secret, policy
        self.replica = replica
        self.resolver, self.client, self.limits = resolver, client, limits
        self._tasks: dict[int, asyncio.Task[None]] = {}
        self._per_key: Counter[str] = Counter()
        self._wake = asyncio.Event()

    @classmethod
    def from_settings(
        cls, repo: JobRepository, settings: Settings, replica: str
    ) -> WebhookDeliverer:
        if settings.webhook_secret is None:
            raise ValueError("webhooks are off without ZIMAGE_WEBHOOK_SECRET")
        timeout = settings.webhook_timeout_s
        return cls(
            repo,
            settings.webhook_secret.get_secret_value().encode(),
            WebhookPolicy.from_settings(settings),
            Resolver(settings.webhook_dns_servers, timeout),
            PinnedClient(timeout),
            DeliveryLimits(
                settings.webhook_max_attempts,
                settings.webhook_backoff_s,
                timeout,
                settings.webhook_max_in_flight_per_key,
                settings.webhook_max_in_flight,
            ),
            replica,
        )

    async def run_forever(self) -> None:
        while True:
            try:
                await self._dispatch()
            except Exception:
                log.exception("webhook delivery loop error")
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(POLL_INTERVAL_S):
                    await self._wake.wait()
            self._wake.clear()

    async def _dispatch(self) -> None:
        """Claim due deliveries that no process holds, for keys with room here, and start a
        task for each. A claimed one over its key's room goes back to the store."""
        room = self.limits.total - len(self._tasks)
        if room <= 0:
            return
        full = [key for key, n in self._per_key.items() if n >= self.limits.per_key]
        due = await asyncio.to_thread(
            self.repo.claim_deliveries, self.replica, self.limits.lease_s, room, full
        )
        for delivery, key in due:
            if self._per_key[key] >= self.limits.per_key:
                await asyncio.to_thread(self.repo.unclaim_delivery, delivery.id, self.replica)
                continue
            self._per_key[key] += 1
            task = asyncio.create_task(self._deliver(delivery))
            self._tasks[delivery.id] = task
            task.add_done_callback(functools.partial(self._done, delivery.id, key))

    def _done(self, delivery_id: int, key: str, _task: asyncio.Task[None]) -> None:
        del self._tasks[delivery_id]
        self._per_key[key] -= 1
        if not self._per_key[key]:
            del self._per_key[key]
        self._wake.set()  # room for the next one now, not at the next poll

    async def _deliver(self, delivery: WebhookDelivery) -> None:
        attempts = delivery.attempts + 1
        try:
            async with asyncio.timeout(self.limits.timeout_s):
                status = await self._send(delivery)
            if 200 <= status < 300:
                await asyncio.to_thread(self.repo.delivery_done, delivery.id, attempts)
                return
            error = f"HTTP {status}"
        except TimeoutError:
            error = f"no answer within {self.limits.timeout_s:g} s"
        except (httpx.HTTPError, InvalidRequest) as exc:
            error = f"{type(exc).__name__}: {exc}"
        retry_at = None
        if attempts < self.limits.max_attempts:
            retry_at = time.time() + self.limits.backoff_s * 2 ** (attempts - 1)
        log.warning(
            "webhook %s for job %s failed (attempt %d): %s",
            delivery.id,
            delivery.job_id,
            attempts,
            error,
        )
        await asyncio.to_thread(self.repo.delivery_failed, delivery.id, attempts, error, retry_at)

    async def _send(self, delivery: WebhookDelivery) -> int:
        """Resolve once, judge, and POST to the judged addresses in turn until one connects."""
        destination, addresses = await self.policy.resolve(delivery.url, self.resolver)
        body = delivery.payload.encode()
        headers = {
            "Content-Type": "application/json",
            "X-Zimage-Signature": sign(self.secret, int(time.time()), body),
            "X-Zimage-Delivery": str(delivery.id),
        }
        for address in addresses[:-1]:
            with contextlib.suppress(httpx.ConnectError):
                return await self.client.post(destination, address, body, headers)
        return await self.client.post(destination, addresses[-1], body, headers)

    async def close(self) -> None:
        for task in list(self._tasks.values()):
            task.cancel()
        await asyncio.gather(*self._tasks.values(), return_exceptions=True)
        await self.client.aclose()


@dataclass(frozen=True)
class DeliveryLimits:
    max_attempts: int
    backoff_s: float
    timeout_s: float  # one attempt, resolution included
    per_key: int  # deliveries in flight for one API key (in one process)
    total: int  # and for all keys

    @property
    def lease_s(self) -> float:
        """A claimed delivery's lease: longer than an attempt (cut at ``timeout_s``) plus
        its bookkeeping, so no live process's attempt is ever taken over."""
        return self.timeout_s * 2 + 10
