"""Run the app under uvicorn with a graceful shutdown.

On the first SIGTERM/SIGINT the server keeps listening but answers new work with 503 and
``Retry-After`` (so a load balancer moves on), lets in-flight requests finish for up to
``shutdown_grace_s``, then exits 0. Queued async jobs stay in the store for the next start.
A second signal exits at once.

Once it listens and the model is ready it says where to go: one ``ready:`` line with the
playground, docs and API URLs, with the port really bound (``--port 0`` picks one).
"""

from __future__ import annotations

import asyncio
import json
import logging
import socket
import threading
import time
from types import FrameType

import uvicorn
from fastapi import FastAPI
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from zimage_server.api.middleware import Drain
from zimage_server.core.config import Settings
from zimage_server.core.errors import StartupError
from zimage_server.engine import EngineLike, EngineState

log = logging.getLogger("zimage.api")


class GracefulServer(uvicorn.Server):
    def __init__(
        self, config: uvicorn.Config, drain: Drain, grace_s: float, engine: EngineLike
    ) -> None:
        super().__init__(config)
        self.drain = drain
        self.grace_s = grace_s
        self.engine = engine
        self._announcer: asyncio.Task[None] | None = None

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        """Start, then say where (uvicorn is silent about sockets it did not open)."""
        await super().startup(sockets)
        if not self.should_exit and sockets:
            host, port = sockets[0].getsockname()[:2]
            log.info("listening on http://%s:%d (Ctrl-C to stop)", _bracketed(host), port)
            self._announcer = asyncio.create_task(self._announce(_browsable(host), port))

    async def _announce(self, host: str, port: int) -> None:
        """The last start-up line: where to go once the model is ready, or why not."""
        while self.engine.state == EngineState.STARTING:
            await asyncio.sleep(0.1)
        url = f"http://{host}:{port}"
        if self.engine.state == EngineState.READY:
            log.info(
                "ready: playground %s/  docs %s/docs  API %s/v1/z-image-turbo",
                url,
                url,
                url,
                extra={"url": url},
            )
        elif self.engine.state == EngineState.FAILED:
            log.error(
                "not serving: the model failed to load (%s); %s/readyz says FAILED",
                self.engine.failure,
                url,
            )

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        if self.drain.draining:
            super().handle_exit(sig, frame)  # second signal: stop now
            return
        self.drain.draining = True
        log.info("draining: %d requests in flight, up to %.0fs", self.drain.in_flight, self.grace_s)
        threading.Thread(target=self._exit_when_drained, daemon=True).start()

    def _exit_when_drained(self) -> None:
        deadline = time.monotonic() + self.grace_s
        while self.drain.in_flight > 0 and time.monotonic() < deadline:
            time.sleep(0.05)
        if self.drain.in_flight:
            log.warning("grace period over with %d requests in flight", self.drain.in_flight)
        self.should_exit = True


def _bracketed(host: str) -> str:
    return f"[{host}]" if ":" in host else host


def _browsable(host: str) -> str:
    """A URL host a browser on this machine can open: loopback for 'every interface'."""
    return {"0.0.0.0": "127.0.0.1", "::": "[::1]"}.get(host, _bracketed(host))  # noqa: S104


def listen(settings: Settings) -> socket.socket:
    """Take the port before anything else starts: a port in use is one line at once, not an
    error buried under a model that keeps loading."""
    family = socket.AF_INET6 if ":" in settings.host else socket.AF_INET
    try:
        return socket.create_server((settings.host, settings.port), family=family)
    except OSError as exc:
        reason = exc.strerror or str(exc)
        raise StartupError(
            f"Cannot listen on {settings.host}:{settings.port}: {reason}. Is another server "
            "running there? Choose another with --port (0 picks a free one)."
        ) from None


class HeaderTimeoutProtocol(HttpToolsProtocol):
    """uvicorn's HTTP/1.1 protocol, which waits for a request's line and headers for as long
    as the client takes to send them (its keep-alive timeout only runs between requests);
    this one gives them ``header_timeout_s`` from the connection, or from the first byte of
    the next request on a kept-alive one. Then: 408 (silence when nothing came) and close.
    """

    header_timeout_s = 10.0
    _header_timer: asyncio.TimerHandle | None = None
    _partial = False  # some of a request has arrived, not all of its headers

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._arm()

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self._partial = True
        self._arm()

    def on_headers_complete(self) -> None:
        self._partial = False
        self._disarm()
        super().on_headers_complete()

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        super().connection_lost(exc)

    def _arm(self) -> None:
        if self._header_timer is None:
            self._header_timer = self.loop.call_later(self.header_timeout_s, self._timed_out)

    def _disarm(self) -> None:
        if self._header_timer is not None:
            self._header_timer.cancel()
            self._header_timer = None

    def _timed_out(self) -> None:
        self._header_timer = None
        if self._partial and not self.transport.is_closing():
            message = f"Request headers not received within {self.header_timeout_s:g} s."
            body = json.dumps({"error": message, "request_id": ""}).encode()
            head = (
                "HTTP/1.1 408 Request Timeout\r\ncontent-type: application/json\r\n"
                f"content-length: {len(body)}\r\nconnection: close\r\n\r\n"
            )
            self.transport.write(head.encode() + body)
        self.transport.close()


def _protocol(timeout_s: float) -> type[HeaderTimeoutProtocol]:
    class Protocol(HeaderTimeoutProtocol):
        header_timeout_s = timeout_s

    return Protocol


def uvicorn_config(app: FastAPI, settings: Settings) -> uvicorn.Config:
    """How ``zimage serve`` runs the app. Forwarded headers are left to the app (see
    ``ZIMAGE_TRUSTED_PROXIES``): uvicorn would believe any from loopback."""
    return uvicorn.Config(
        app,
        host=settings.host,
        port=settings.port,
        http=_protocol(settings.header_timeout_s),
        proxy_headers=False,
        log_level=settings.log_level,
        log_config=None,  # our handlers (JSON) format uvicorn's records too
        access_log=False,  # zimage.access writes one structured line per request
        timeout_graceful_shutdown=int(settings.shutdown_grace_s) + 5,
    )


def run(app: FastAPI, settings: Settings, sock: socket.socket) -> None:
    config = uvicorn_config(app, settings)
    server = GracefulServer(config, app.state.drain, settings.shutdown_grace_s, app.state.engine)
    server.run(sockets=[sock])
