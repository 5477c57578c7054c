"""The server under test: ``python -m zimage_server serve`` in a subprocess, driven over HTTP.

Started the way a user starts it (the CLI, a free port), so the numbers include HTTP,
validation, the queue, the worker's pipe and the image encode.
"""

from __future__ import annotations

import base64
import io
import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from types import TracebackType
from typing import Any

import httpx
import numpy as np
from PIL import Image

from zimage_server.bench.stats import Sample

ENDPOINT = "/v1/z-image-turbo"
LOG_TAIL_CHARS = 4000


class BenchError(RuntimeError):
    """The benchmark cannot go on (server failed to start, a request failed, ...)."""


def absolute_pythonpath() -> dict[str, str]:
    """``PYTHONPATH=src`` made absolute: the server starts in its data folder, where a
    relative entry would silently import some other installed copy (or nothing)."""
    path = os.environ.get("PYTHONPATH")
    if not path:
        return {}
    return {"PYTHONPATH": os.pathsep.join(os.path.abspath(p) for p in path.split(os.pathsep))}


class BenchServer:
    """A ``zimage serve`` subprocess; a context manager that stops it on exit."""

    def __init__(
        self,
        model_args: Sequence[str],
        env: Mapping[str, str],
        log_path: Path,
        ready_timeout_s: float = 900.0,
    ) -> None:
        self.log_path = log_path
        self.ready_timeout_s = ready_timeout_s
        command = [sys.executable, "-m", "zimage_server", "serve", *model_args, "--port", "0"]
        self._log = log_path.open("wb")
        self.proc = subprocess.Popen(  # noqa: S603 (our own interpreter and module)
            command,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            env={**os.environ, "PYTHONUNBUFFERED": "1", **absolute_pythonpath(), **env},
            cwd=log_path.parent,
        )
        self.url = ""

    def __enter__(self) -> BenchServer:
        try:
            self.url = self._wait_for_port()
            self._wait_ready()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(
        self, _t: type[BaseException] | None, _e: BaseException | None, _tb: TracebackType | None
    ) -> None:
        self.stop()

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def _fail(self, why: str) -> BenchError:
        return BenchError(f"{why}; server log tail:\n{self.log()[-LOG_TAIL_CHARS:]}")

    def _wait_for_port(self) -> str:
        deadline = time.monotonic() + self.ready_timeout_s
        while time.monotonic() < deadline:
            match = re.search(r"Uvicorn running on (http://[\d.]+:\d+)", self.log())
            if match:
                return match.group(1)
            if self.proc.poll() is not None:
                raise self._fail("the server exited before binding")
            time.sleep(0.1)
        raise self._fail("the server did not bind in time")

    def _wait_ready(self) -> None:
        deadline = time.monotonic() + self.ready_timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise self._fail("the server exited while loading")
            reply = httpx.get(self.url + "/readyz", timeout=10)
            if reply.status_code == 200:
                return
            if reply.json().get("status") == "FAILED":  # gave up loading: no point waiting
                raise self._fail(f"the model failed to load: {reply.json().get('reason')}")
            time.sleep(0.2)
        raise self._fail("the model did not become ready in time")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._log.close()


class Client:
    """Times v1 requests against one server (thread-safe: httpx pools connections)."""

    def __init__(self, url: str, api_key: str | None = None, timeout_s: float = 600.0) -> None:
        headers = {"x-api-key": api_key} if api_key else {}
        self.http = httpx.Client(base_url=url, headers=headers, timeout=timeout_s)

    def close(self) -> None:
        self.http.close()

    def render(self, body: Mapping[str, Any]) -> tuple[Sample, dict[str, Any]]:
        """POST one request; the sample's e2e is measured here, its stages by the server."""
        start = time.perf_counter()
        response = self.http.post(ENDPOINT, json={**body, "base_64": True})
        e2e = time.perf_counter() - start
        if response.status_code != 200:
            raise BenchError(f"request failed with {response.status_code}: {response.text[:500]}")
        data: dict[str, Any] = response.json()
        sample = Sample(
            e2e,
            {k: float(v) for k, v in data.get("timings", {}).items()},
            int(data.get("transformer_passes", 0)),
            int(data.get("prompt_tokens", 0)),
        )
        return sample, data

    def timed(self, body: Mapping[str, Any], warmup: int, iterations: int) -> list[Sample]:
        for _ in range(warmup):
            self.render(body)
        return [self.render(body)[0] for _ in range(iterations)]

    def pixels(self, body: Mapping[str, Any]) -> np.ndarray:
        """The decoded RGB of a lossless (PNG) render of ``body``."""
        _, data = self.render({**body, "image_format": "png"})
        image = Image.open(io.BytesIO(base64.b64decode(data["image"]))).convert("RGB")
        return np.asarray(image)

    def throughput(
        self, body: Mapping[str, Any], concurrency: int, requests: int
    ) -> tuple[float, list[Sample]]:
        """Images per second with ``concurrency`` clients sending ``requests`` in all."""
        lock, samples = threading.Lock(), []

        def one(index: int) -> None:
            sample, _ = self.render({**body, "seed": int(body.get("seed", 0)) + index})
            with lock:
                samples.append(sample)

        start = time.perf_counter()
        with ThreadPoolExecutor(concurrency) as pool:
            list(pool.map(one, range(requests)))
        return requests / (time.perf_counter() - start), samples
