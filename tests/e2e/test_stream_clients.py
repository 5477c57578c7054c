"""Watching renders from our clients, against the real tiny server: the SDK's ``stream``
and ``events`` (sync and async, with a ``Last-Event-ID`` resume) and ``zimage generate
--watch`` on a real pseudo-terminal."""

from __future__ import annotations

import asyncio
import io
import os
import pty
import select
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from PIL import Image

from tests.conftest import InProcessServer
from zimage_server.client import (
    AsyncZImageClient,
    BadRequestError,
    JobFailedError,
    RenderEvent,
    ServerError,
    ZImageClient,
)
from zimage_server.launcher import absolute_pythonpath

ENV = {
    "ZIMAGE_DEBUG_STEP_DELAY_S": "0.15",
    "ZIMAGE_DEBUG_FAULTS": "true",
    "ZIMAGE_MAX_BATCH_SIZE": "1",  # one render at a time: the next one waits its turn
    "ZIMAGE_STREAM_KEEPALIVE_S": "0.5",
}
SMALL: dict[str, Any] = {"width": 256, "height": 256, "steps": 3}


@pytest.fixture(scope="module")
def srv(tmp_path_factory: pytest.TempPathFactory) -> Iterator[InProcessServer]:
    server = InProcessServer(tmp_path_factory.mktemp("stream-clients"), env=ENV)
    yield server
    server.stop()


def kinds(events: list[RenderEvent]) -> list[str]:
    return [event.kind for event in events]


def blocker(client: ZImageClient, steps: int = 6) -> str:
    """A job that holds the only slot, so the next render is queued behind it."""
    return client.submit("blocker", width=256, height=256, steps=steps).request_id


def test_sdk_stream_yields_queue_steps_previews_and_the_image(srv: InProcessServer) -> None:
    with ZImageClient(srv.url) as client:
        first = blocker(client)
        events = list(client.stream("a fox", preview_size=64, seed=7, **SMALL))
        assert kinds(list(client.events(first)))[-1] == "completed"
    assert kinds(events) == ["queued", "started", "step", "step", "step", "completed"]
    assert events[0].queue_position is not None and events[0].queue_position >= 1
    steps = [event for event in events if event.kind == "step"]
    assert [(e.step, e.total, e.fraction) for e in steps] == [
        (1, 3, 1 / 3),
        (2, 3, 2 / 3),
        (3, 3, 1),
    ]
    previews = [Image.open(io.BytesIO(e.preview or b"")) for e in steps]
    assert all(p.format == "WEBP" and p.size == (64, 64) for p in previews)
    assert steps[0].preview_size == (64, 64) and steps[0].preview != steps[-1].preview
    ids = [event.event_id for event in events]
    assert all(ids) and ids == sorted(ids)  # type: ignore[type-var]
    image = events[-1].image
    assert image is not None and image.seed == 7 and image.to_pil().size == (256, 256)
    assert events[-1].request_id == events[0].request_id


def test_sdk_stream_errors_are_typed(srv: InProcessServer) -> None:
    with ZImageClient(srv.url) as client:
        with pytest.raises(BadRequestError, match="steps"):  # refused before any event
            list(client.stream("x", steps=0))
        seen: list[str] = []
        with pytest.raises(ServerError, match="injected"):  # failed mid-stream
            seen.extend(e.kind for e in client.stream("[[fault:error]] x", **SMALL))
        assert seen[:1] == ["queued"]
        job = client.submit("[[fault:error]] a job", **SMALL)
        with pytest.raises(JobFailedError, match="FAILED"):
            list(client.events(job.request_id))


class DropOnce(httpx.HTTPTransport):
    """The real transport, except that the first event stream breaks after its first
    step (a dropped connection); every request's ``Last-Event-ID`` is kept."""

    def __init__(self) -> None:
        super().__init__()
        self.resumed_from: list[str | None] = []

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        response = super().handle_request(request)
        if not request.url.path.endswith("/events"):
            return response
        self.resumed_from.append(request.headers.get("last-event-id"))
        if len(self.resumed_from) > 1:
            return response
        stream = response.stream

        def broken() -> Iterator[bytes]:
            for chunk in stream:  # type: ignore[union-attr]
                yield chunk
                if b"event: step" in chunk:
                    raise httpx.ReadError("connection reset (test)")

        response.stream = _Iter(broken(), stream)
        return response


class _Iter(httpx.SyncByteStream):
    def __init__(self, chunks: Iterator[bytes], inner: Any) -> None:
        self.chunks, self.inner = chunks, inner

    def __iter__(self) -> Iterator[bytes]:
        yield from self.chunks

    def close(self) -> None:
        self.inner.close()


def test_sdk_events_resume_with_last_event_id_after_a_drop(srv: InProcessServer) -> None:
    transport = DropOnce()
    with ZImageClient(srv.url, transport=transport, backoff_s=0.05) as client:
        job = client.submit("a resumed fox", preview=True, **SMALL)
        events = list(client.events(job.request_id))
    assert transport.resumed_from[0] is None and len(transport.resumed_from) == 2
    last_before = transport.resumed_from[1]
    assert last_before is not None and int(last_before) >= 3  # queued, started, step 1
    assert kinds(events)[-1] == "completed" and kinds(events).count("started") == 1
    done = events[-1]
    assert done.result is not None and done.result.status == "COMPLETED"
    assert done.image is not None and done.image.image_format == "webp"
    assert done.image.to_pil().size == (256, 256)
    assert [e.step for e in events if e.kind == "step"][-1] == 3


def test_async_stream_and_events(srv: InProcessServer) -> None:
    async def run() -> tuple[list[RenderEvent], list[RenderEvent]]:
        async with AsyncZImageClient(srv.url) as client:
            streamed = [e async for e in client.stream("async fox", preview=True, **SMALL)]
            job = await client.submit("async job", **SMALL)
            watched = [e async for e in client.events(job.request_id)]
            return streamed, watched

    streamed, watched = asyncio.run(run())
    assert kinds(streamed)[-1] == "completed" and streamed[-1].image is not None
    assert [e.preview_size for e in streamed if e.kind == "step"] == [(256, 256)] * 3
    assert kinds(watched)[-1] == "completed" and watched[-1].image is not None
    assert "step" in kinds(watched)


def run_on_terminal(args: list[str], env: dict[str, str], timeout: float = 90) -> str:
    """The command on a 120-column pseudo-terminal; everything it wrote, ANSI stripped."""
    import re

    master, slave = pty.openpty()
    env = {**os.environ, **absolute_pythonpath(), "TERM": "xterm-256color", **env}
    env.update({"COLUMNS": "120", "LINES": "30"})
    proc = subprocess.Popen(args, stdin=slave, stdout=slave, stderr=slave, env=env)
    os.close(slave)
    raw, deadline = b"", time.monotonic() + timeout
    while time.monotonic() < deadline:
        if select.select([master], [], [], 0.05)[0]:
            try:
                chunk = os.read(master, 65536)
            except OSError:
                break
            if not chunk:
                break
            raw += chunk
        elif proc.poll() is not None:
            break
    proc.wait(10)
    os.close(master)
    text = re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", raw.decode(errors="replace"))
    assert proc.returncode == 0, text
    return text


def test_cli_watch_shows_the_queue_then_the_steps(srv: InProcessServer, tmp_path: Path) -> None:
    with ZImageClient(srv.url) as client:
        first = blocker(client, steps=8)
    out = tmp_path / "watched.png"
    args = [sys.executable, "-m", "zimage_server", "generate", "a watched fox", "--watch"]
    args += ["-o", str(out), "--width", "256", "--height", "256", "--steps", "4", "--seed", "5"]
    text = run_on_terminal(args, {"ZIMAGE_URL": srv.url})
    assert "queued: position 1" in text, text
    assert "rendering" in text and "4/4" in text, text
    assert text.index("queued: position") < text.index("rendering")
    assert "seed 5" in text and "Traceback" not in text
    with Image.open(out) as image:
        assert image.format == "PNG" and image.size == (256, 256)
    with ZImageClient(srv.url) as client:
        assert client.status(first)["status"] == "COMPLETED"
