"""Webhooks: who may be called, how bodies are signed, and the delivery loop.

Signature: ``X-Zimage-Signature: t=<unix seconds>,v1=<hex HMAC-SHA256(secret, "<t>.<body>")>``.
Receivers recompute it over the raw body and reject old timestamps (replay protection).
Deliveries live in the database and are retried with exponential back-off by a task of
their own, so a slow receiver never holds up rendering and a restart loses nothing.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import ipaddress
import logging
import socket
import time
from dataclasses import dataclass
from urllib.parse import urlsplit

import httpx

from zimage_server.core.errors import InvalidRequest
from zimage_server.jobs.repository import JobRepository
from zimage_server.store.models import WebhookDelivery

log = logging.getLogger("zimage.webhooks")
POLL_INTERVAL_S = 0.25


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
    link-local or reserved addresses (server-side request forgery)."""

    enabled: bool
    allowed_hosts: frozenset[str]
    allow_private: bool

    def check(self, url: str) -> None:
        if not self.enabled:
            raise InvalidRequest(
                "Invalid 'webhook_url': webhooks are disabled on this server "
                "(the operator has not set ZIMAGE_WEBHOOK_SECRET).",
                field="webhook_url",
            )
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname or len(url) > 2000:
            raise InvalidRequest(
                "Invalid 'webhook_url': must be an absolute http(s) URL of at most 2000 "
                "characters.",
                field="webhook_url",
            )
        host = parts.hostname
        if host in self.allowed_hosts or self.allow_private:
            return
        for address in _addresses(host):
            if not address.is_global:
                raise InvalidRequest(
                    f"Invalid 'webhook_url': {host} resolves to a private or local address "
                    "that the operator has not allowed (ZIMAGE_WEBHOOK_ALLOWED_HOSTS).",
                    field="webhook_url",
                )


def _addresses(host: str) -> list[ipaddress.IPv4Address | ipaddress.IPv6Address]:
    try:
        return [ipaddress.ip_address(host)]
    except ValueError:
        pass
    try:
        infos = socket.getaddrinfo(host, None)
    except OSError:
        raise InvalidRequest(
            f"Invalid 'webhook_url': cannot resolve host '{host}'.", field="webhook_url"
        ) from None
    return [ipaddress.ip_address(str(info[4][0]).split("%")[0]) for info in infos]


class WebhookDeliverer:
    """Sends due deliveries; retries with back-off ``base x 2^(attempt-1)``."""

    def __init__(
        self,
        repo: JobRepository,
        secret: bytes,
        policy: WebhookPolicy,
        max_attempts: int,
        backoff_s: float,
        timeout_s: float,
    ) -> None:
        self.repo, self.secret, self.policy = repo, secret, policy
        self.max_attempts, self.backoff_s = max_attempts, backoff_s
        self.client = httpx.AsyncClient(timeout=timeout_s, follow_redirects=False)

    async def run_forever(self) -> None:
        while True:
            try:
                due = await asyncio.to_thread(self.repo.due_deliveries)
                await asyncio.gather(*(self._deliver(d) for d in due))
            except Exception:
                log.exception("webhook delivery loop error")
            await asyncio.sleep(POLL_INTERVAL_S)

    async def _deliver(self, delivery: WebhookDelivery) -> None:
        attempts = delivery.attempts + 1
        body = delivery.payload.encode()
        try:
            self.policy.check(delivery.url)  # again at send time: DNS may have changed
            response = await self.client.post(
                delivery.url,
                content=body,
                headers={
                    "Content-Type": "application/json",
                    "X-Zimage-Signature": sign(self.secret, int(time.time()), body),
                    "X-Zimage-Delivery": str(delivery.id),
                },
            )
            if 200 <= response.status_code < 300:
                await asyncio.to_thread(self.repo.delivery_done, delivery.id, attempts)
                return
            error = f"HTTP {response.status_code}"
        except (httpx.HTTPError, InvalidRequest) as exc:
            error = f"{type(exc).__name__}: {exc}"
        retry_at = None
        if attempts < self.max_attempts:
            retry_at = time.time() + self.backoff_s * 2 ** (attempts - 1)
        log.warning(
            "webhook %s for job %s failed (attempt %d): %s",
            delivery.id,
            delivery.job_id,
            attempts,
            error,
        )
        await asyncio.to_thread(self.repo.delivery_failed, delivery.id, attempts, error, retry_at)

    async def close(self) -> None:
        await self.client.aclose()
