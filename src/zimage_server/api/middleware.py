"""Pure-ASGI middleware: cheap enough for the per-request overhead budget."""

from __future__ import annotations

import asyncio
import logging
import re
import secrets
import time
from collections.abc import Callable, Collection
from dataclasses import dataclass

from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from zimage_server.api.errors import render_error
from zimage_server.core.errors import InvalidRequest, NotReady, PayloadTooLarge, RequestTimeout
from zimage_server.telemetry import Metrics, context

_SAFE_ID = re.compile(r"^[A-Za-z0-9._:-]{1,128}$")
access_log = logging.getLogger("zimage.access")
PROBES = ("/healthz", "/readyz", "/metrics")


class RequestIdMiddleware:
    """Give every response an ``X-Request-ID`` (the client's if sane), count it in the
    metrics and write one structured access-log line per request."""

    def __init__(self, app: ASGIApp, metrics: Metrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start = time.perf_counter()
        incoming = dict(scope["headers"]).get(b"x-request-id", b"").decode("latin-1")
        request_id = incoming if _SAFE_ID.match(incoming) else secrets.token_hex(12)
        state = scope.setdefault("state", {})
        state["request_id"] = request_id
        context.request_id.set(request_id)  # the engine and the worker log it too
        status = 500

        async def send_with_id(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                message["headers"] = [
                    *message.get("headers", []),
                    (b"x-request-id", request_id.encode()),
                ]
            await send(message)

        try:
            await self.app(scope, receive, send_with_id)
        finally:
            self._record(scope, state, status, time.perf_counter() - start)

    def _record(self, scope: Scope, state: dict[str, object], status: int, seconds: float) -> None:
        route = getattr(scope.get("route"), "path", "unmatched")
        self.metrics.record_request(route, scope["method"], status, seconds)
        if scope["path"] in PROBES and status < 400:
            return
        access_log.info(
            "%s %s %d",
            scope["method"],
            scope["path"],
            status,
            extra={
                "request_id": state["request_id"],
                "method": scope["method"],
                "path": scope["path"],
                "status": status,
                "duration_ms": round(seconds * 1e3, 2),
                **{k: v for k, v in state.items() if k.startswith("log_")},
            },
        )


def takes_images(path: str) -> bool:
    """The routes whose bodies carry input images (a larger body limit applies)."""
    return path == "/v1/images/edits" or path.startswith(
        ("/v1/z-image-turbo-", "/v2/z-image-turbo-")
    )


class BodyLimitMiddleware:
    """413 for bodies over the limit, by ``Content-Length`` or while streaming; 408 for
    bodies still arriving ``timeout_s`` after the request began (a slow client holds a
    connection, a task and its buffers for as long as it likes otherwise).

    Either raises from ``receive``: an ``HTTPException``, so that FastAPI passes it on while
    reading a body and the app's handler renders it; one that escapes the app is answered
    here, the same way. Once the body is complete, ``receive`` (which then waits for the
    client to disconnect) is the server's own again, without a deadline.
    """

    def __init__(
        self,
        app: ASGIApp,
        max_bytes: int,
        timeout_s: float,
        image_max_bytes: int = 0,
        image_paths: Callable[[str], bool] = lambda _path: False,
    ) -> None:
        self.app = app
        self.max_bytes = max_bytes
        self.timeout_s = timeout_s
        self.image_max_bytes = image_max_bytes  # routes that take input images: larger
        self.image_paths = image_paths

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        limit = self.max_bytes
        if self.image_max_bytes > limit and self.image_paths(scope["path"]):
            limit = self.image_max_bytes
        length = dict(scope["headers"]).get(b"content-length")
        if length is not None and length.isdigit() and int(length) > limit:
            await render_error(PayloadTooLarge(self._message(limit)), scope)(scope, receive, send)
            return
        seen, complete = 0, False
        deadline = asyncio.get_running_loop().time() + self.timeout_s

        async def limited() -> Message:
            nonlocal seen, complete
            if complete:
                return await receive()
            try:  # asyncio.timeout, not wait_for: no task per receive
                async with asyncio.timeout_at(deadline):
                    message = await receive()
            except TimeoutError:
                raise BodyTooSlow(408, self._slow(), {"Connection": "close"}) from None
            seen += len(message.get("body", b""))
            complete = not message.get("more_body", False)
            if seen > limit:
                raise BodyTooLarge(413, self._message(limit))
            return message

        try:
            await self.app(scope, limited, send)
        except BodyTooLarge as exc:
            await render_error(PayloadTooLarge(exc.detail), scope)(scope, receive, send)
        except BodyTooSlow as exc:
            error = RequestTimeout(exc.detail, headers=exc.headers)
            await render_error(error, scope)(scope, receive, send)

    def _message(self, limit: int) -> str:
        return f"Request body too large: at most {limit} bytes."

    def _slow(self) -> str:
        return f"Request body not received within {self.timeout_s:g} s; send it at once."


class BodyTooLarge(HTTPException):
    pass


class BodyTooSlow(HTTPException):
    pass


@dataclass
class Drain:
    """Shutdown state shared by the middleware and the server's signal handling."""

    draining: bool = False
    in_flight: int = 0


class DrainMiddleware:
    """While draining for shutdown: 503 with ``Retry-After`` for new work, probes still
    answer, and in-flight requests are counted so the server knows when it may exit."""

    def __init__(self, app: ASGIApp, drain: Drain) -> None:
        self.app = app
        self.drain = drain

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        if self.drain.draining and scope["path"] not in PROBES:
            error = NotReady("The server is shutting down; retry on another instance.")
            await render_error(error, scope)(scope, receive, send)
            return
        self.drain.in_flight += 1
        try:
            await self.app(scope, receive, send)
        finally:
            self.drain.in_flight -= 1


HEALTH_PROBES = frozenset(PROBES)  # no URL in them is built from the Host header
MAX_HOST_CHARS = 255
_HOST = re.compile(r"^(?:\[(?P<ipv6>[0-9a-fA-F:.]+)\]|(?P<name>[A-Za-z0-9._-]+))(?::\d{1,5})?$")


class HostMiddleware:
    """400 unless the ``Host`` header names a host this server answers to.

    Absolute URLs in responses (image links, ``status_url``) and in stored jobs (their
    webhooks) are built from ``Host`` unless ``ZIMAGE_PUBLIC_URL`` is set, so a forged one
    would send clients elsewhere; and a page on another site whose name resolves to this
    machine (DNS rebinding) reaches it with its own name. ``allowed`` holds host names
    (without port), ``*.example.com`` for a domain's subdomains, or ``*`` for any. The
    probes, which build no URLs, answer whatever the name (load balancers and kubelets
    address a server by its IP).
    """

    def __init__(self, app: ASGIApp, allowed: Collection[str]) -> None:
        self.app = app
        names = {host.lower().rstrip(".") for host in allowed}
        self.any = "*" in names
        self.names = frozenset(name for name in names if not name.startswith("*."))
        self.suffixes = tuple(name[1:] for name in names if name.startswith("*."))

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["path"] not in HEALTH_PROBES:
            error = self._check(dict(scope["headers"]).get(b"host"))
            if error is not None:
                await render_error(error, scope)(scope, receive, send)
                return
        await self.app(scope, receive, send)

    def _check(self, raw: bytes | None) -> InvalidRequest | None:
        if raw is None:  # HTTP/1.0: URLs are built from the address the client reached
            return None
        host = raw.decode("latin-1")
        if len(host) > MAX_HOST_CHARS:
            return InvalidRequest(
                f"Invalid 'Host' header: at most {MAX_HOST_CHARS} characters (got {len(host)}).",
                field="Host",
            )
        match = _HOST.match(host)
        if match is None:
            return InvalidRequest(
                f"Invalid 'Host' header: must be a host name or address with an optional "
                f"port (got {host[:60]!r}).",
                field="Host",
            )
        name = (match["ipv6"] or match["name"]).lower().rstrip(".")
        if self.any or name in self.names or name.endswith(self.suffixes):
            return None
        return InvalidRequest(
            f"Host '{name[:60]}' is not served here: the operator can add it to "
            "ZIMAGE_ALLOWED_HOSTS.",
            field="Host",
        )
