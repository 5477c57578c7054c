"""The server under test: ``python -m zimage_server serve`` in a subprocess, driven over HTTP.

Started the way a user starts it (``zimage_server.launcher``: the CLI, a free port), so the
numbers include HTTP, validation, the queue, the worker's pipe and the image encode.
"""

from __future__ import annotations

import base64
import io
import json
import threading
import time
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import numpy as np
from httpx_sse import EventSource
from PIL import Image
from prometheus_client.parser import text_string_to_metric_families

from zimage_server.bench.stats import Sample
from zimage_server.launcher import ServerProcess, ServerStartError, absolute_pythonpath

__all__ = ["BenchError", "BenchServer", "Client", "absolute_pythonpath"]

ENDPOINT = "/v1/z-image-turbo"


def device_memory_gib(metrics: str) -> dict[str, float]:
    """``{kind: GiB}`` of ``zimage_device_memory_bytes`` for the first worker it names."""
    found: dict[str, dict[str, float]] = {}
    for family in text_string_to_metric_families(metrics):
        for sample in family.samples:
            if sample.name == "zimage_device_memory_bytes":
                worker = found.setdefault(sample.labels["worker"], {})
                worker[sample.labels["kind"]] = round(sample.value / 2**30, 2)
    return found[min(found)] if found else {}


class BenchError(RuntimeError):
    """The benchmark cannot go on (server failed to start, a request failed, ...)."""


class BenchServer(ServerProcess):
    """A ``zimage serve`` subprocess; a context manager that stops it on exit."""

    def __init__(
        self,
        model_args: Sequence[str],
        env: Mapping[str, str],
        log_path: Path,
        ready_timeout_s: float = 900.0,
    ) -> None:
        super().__init__(model_args, env, log_path, ready_timeout_s=ready_timeout_s)

    def __enter__(self) -> BenchServer:
        try:
            self.start()
        except ServerStartError as exc:
            raise BenchError(str(exc)) from exc
        return self


class Client:
    """Times v1 requests against one server (thread-safe: httpx pools connections)."""

    def __init__(self, url: str, api_key: str | None = None, timeout_s: float = 600.0) -> None:
        headers = {"x-api-key": api_key} if api_key else {}
        # Keep-alive for every load-step client: with httpx's default 20, a 32-client step
        # closed and reopened connections all the time (and once failed with EBADF).
        limits = httpx.Limits(max_connections=128, max_keepalive_connections=64)
        self.http = httpx.Client(base_url=url, headers=headers, timeout=timeout_s, limits=limits)

    def close(self) -> None:
        self.http.close()

    def device_memory_gib(self) -> dict[str, float]:
        """The first worker's GPU memory after its last batch, from ``/metrics`` (none on
        a CPU): whether the weights are the size their dtype says, and the peak."""
        return device_memory_gib(self.http.get("/metrics").text)

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

    def streamed(self, body: Mapping[str, Any]) -> tuple[Sample, list[dict[str, Any]]]:
        """POST one request as an event stream (``Accept: text/event-stream``); the sample
        ends at the ``completed`` event. Also returns the step events' previews."""
        headers = {"Accept": "text/event-stream"}
        previews: list[dict[str, Any]] = []
        start = time.perf_counter()
        with self.http.stream(
            "POST", ENDPOINT, json={**body, "base_64": True}, headers=headers
        ) as r:
            if r.status_code != 200:
                raise BenchError(f"request failed with {r.status_code}: {r.read()[:500]!r}")
            for sse in EventSource(r).iter_sse():
                data = json.loads(sse.data) if sse.data else {}
                if sse.event == "step" and "preview" in data:
                    previews.append(data["preview"])
                elif sse.event == "completed":
                    stages = {k: float(v) for k, v in data.get("timings", {}).items()}
                    return Sample(time.perf_counter() - start, stages), previews
                elif sse.event in ("failed", "cancelled"):
                    raise BenchError(f"streamed request {sse.event}: {sse.data[:500]}")
        raise BenchError("the event stream ended before the image")

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
