"""``zimage serve`` in a subprocess, started the way a user starts it: the CLI, a port the
OS picks, ready when ``/readyz`` says so.

The one launcher of the benchmark (``zimage_server.bench``) and of the tests that need a
real server process (signals, restarts, the CLI's own output).
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from types import TracebackType

import httpx

_BOUND = re.compile(r"listening on (http://[\d.]+:\d+)")
LOG_TAIL_CHARS = 4000


class ServerStartError(RuntimeError):
    """The server exited, failed to load its model, or was not ready in time."""


def absolute_pythonpath() -> dict[str, str]:
    """``PYTHONPATH=src`` made absolute: the server starts in its data folder, where a
    relative entry would silently import some other installed copy (or nothing)."""
    path = os.environ.get("PYTHONPATH")
    if not path:
        return {}
    return {"PYTHONPATH": os.pathsep.join(os.path.abspath(p) for p in path.split(os.pathsep))}


class ServerProcess:
    """``python -m zimage_server serve <args> --port 0``, its output in ``log_path``.

    The process starts at construction; ``start`` (or ``with``) waits until it is bound
    and, by default, ready. ``stop`` sends SIGINT, then kills after ``stop_timeout_s``.
    ``module`` runs another server with the same contract (prints ``listening on URL``,
    answers ``/readyz``): the benchmark's bare-FastAPI floor.
    """

    def __init__(
        self,
        args: Sequence[str],
        env: Mapping[str, str],
        log_path: Path,
        *,
        cwd: Path | None = None,
        ready_timeout_s: float = 900.0,
        stop_timeout_s: float = 60.0,
        module: str = "zimage_server",
    ) -> None:
        self.log_path = log_path
        self.ready_timeout_s = ready_timeout_s
        self.stop_timeout_s = stop_timeout_s
        self.url = ""
        serve = ["serve", *args, "--port", "0"] if module == "zimage_server" else list(args)
        command = [sys.executable, "-m", module, *serve]
        self._log = log_path.open("wb")
        self.proc = subprocess.Popen(  # noqa: S603 (our own interpreter and module)
            command,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            env={**os.environ, "PYTHONUNBUFFERED": "1", **absolute_pythonpath(), **env},
            cwd=cwd or log_path.parent,
        )

    def start(self, ready: bool = True) -> ServerProcess:
        """Wait for the bound URL (and readiness); on failure stop the process and raise."""
        try:
            self.wait_for_url()
            if ready:
                self.wait_ready()
        except BaseException:
            self.stop()
            raise
        return self

    def __enter__(self) -> ServerProcess:
        return self.start()

    def __exit__(
        self, _t: type[BaseException] | None, _e: BaseException | None, _tb: TracebackType | None
    ) -> None:
        self.stop()

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def _fail(self, why: str) -> ServerStartError:
        return ServerStartError(f"{why}; server log tail:\n{self.log()[-LOG_TAIL_CHARS:]}")

    def wait_for_url(self) -> str:
        """The ``http://host:port`` uvicorn reports once bound."""
        deadline = time.monotonic() + self.ready_timeout_s
        while time.monotonic() < deadline:
            match = _BOUND.search(self.log())
            if match:
                self.url = match.group(1)
                return self.url
            if self.proc.poll() is not None:
                raise self._fail("the server exited before binding")
            time.sleep(0.05)
        raise self._fail("the server did not bind in time")

    def wait_ready(self, timeout_s: float | None = None) -> None:
        """Poll ``/readyz`` until 200; give up at once if the model failed to load."""
        deadline = time.monotonic() + (timeout_s or self.ready_timeout_s)
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise self._fail("the server exited while loading")
            try:
                reply = httpx.get(self.url + "/readyz", timeout=10)
            except httpx.ConnectError:  # bound, not listening yet
                time.sleep(0.1)
                continue
            if reply.status_code == 200:
                return
            if reply.json().get("status") == "FAILED":  # gave up loading: no point waiting
                raise self._fail(f"the model failed to load: {reply.json().get('reason')}")
            time.sleep(0.1)
        raise self._fail("the model did not become ready in time")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(timeout=self.stop_timeout_s)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._log.close()
