"""Pure-ASGI middleware: cheap enough for the per-request overhead budget."""

from __future__ import annotations

import logging
import re
import secrets
import time
from dataclasses import dataclass

from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from zimage_server.api.errors import render_error
from zimage_server.core.errors import NotReady, PayloadTooLarge
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


class BodyLimitMiddleware:
    """413 for bodies over the limit, by ``Content-Length`` or while streaming.

    A streamed body that grows too large raises ``BodyTooLarge`` from ``receive``: an
    ``HTTPException``, so that FastAPI passes it on while reading a body and the app's
    handler renders it; one that escapes the app is answered here, the same way.
    """

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        length = dict(scope["headers"]).get(b"content-length")
        if length is not None and length.isdigit() and int(length) > self.max_bytes:
            await render_error(PayloadTooLarge(self._message()), scope)(scope, receive, send)
            return
        seen = 0

        async def limited() -> Message:
            nonlocal seen
            message = await receive()
            seen += len(message.get("body", b""))
            if seen > self.max_bytes:
                raise BodyTooLarge(413, self._message())
            return message

        try:
            await self.app(scope, limited, send)
        except BodyTooLarge as exc:
            await render_error(PayloadTooLarge(exc.detail), scope)(scope, receive, send)

    def _message(self) -> str:
        return f"Request body too large: at most {self.max_bytes} bytes."


class BodyTooLarge(HTTPException):
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
