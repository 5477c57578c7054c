"""Run the app under uvicorn with a graceful shutdown.

On the first SIGTERM/SIGINT the server keeps listening but answers new work with 503 and
``Retry-After`` (so a load balancer moves on), lets in-flight requests finish for up to
``shutdown_grace_s``, then exits 0. Queued async jobs stay in the store for the next start.
A second signal exits at once.
"""

from __future__ import annotations

import logging
import threading
import time
from types import FrameType

import uvicorn
from fastapi import FastAPI

from zimage_server.api.middleware import Drain
from zimage_server.core.config import Settings

log = logging.getLogger("zimage.api")


class GracefulServer(uvicorn.Server):
    def __init__(self, config: uvicorn.Config, drain: Drain, grace_s: float) -> None:
        super().__init__(config)
        self.drain = drain
        self.grace_s = grace_s

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


def run(app: FastAPI, settings: Settings) -> None:
    config = uvicorn.Config(
        app,
        host=settings.host,
        port=settings.port,
        log_level=settings.log_level,
        log_config=None,  # our handlers (JSON) format uvicorn's records too
        access_log=False,  # zimage.access writes one structured line per request
        timeout_graceful_shutdown=int(settings.shutdown_grace_s) + 5,
    )
    GracefulServer(config, app.state.drain, settings.shutdown_grace_s).run()
