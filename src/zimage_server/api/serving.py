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
import logging
import socket
import threading
import time
from types import FrameType

import uvicorn
from fastapi import FastAPI

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


def run(app: FastAPI, settings: Settings, sock: socket.socket) -> None:
    config = uvicorn.Config(
        app,
        host=settings.host,
        port=settings.port,
        log_level=settings.log_level,
        log_config=None,  # our handlers (JSON) format uvicorn's records too
        access_log=False,  # zimage.access writes one structured line per request
        timeout_graceful_shutdown=int(settings.shutdown_grace_s) + 5,
    )
    server = GracefulServer(config, app.state.drain, settings.shutdown_grace_s, app.state.engine)
    server.run(sockets=[sock])
