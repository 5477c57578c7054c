"""Event streams over real HTTP on the tiny model: the order of events, reconnects with
``Last-Event-ID``, previews (decoded), and readers that never read."""

from __future__ import annotations

import base64
import io
import json
import os
import socket
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from PIL import Image

from tests.conftest import InProcessServer

STEP_DELAY_S = 0.15
ENV = {
    "ZIMAGE_DEBUG_STEP_DELAY_S": str(STEP_DELAY_S),
    "ZIMAGE_DEBUG_FAULTS": "true",
    "ZIMAGE_MAX_BATCH_SIZE": "1",  # one render at a time: the second waits in the queue
    "ZIMAGE_MAX_QUEUE": "64",
    "ZIMAGE_STREAM_KEEPALIVE_S": "0.5",
}
JOB: dict[str, Any] = {"prompt": "a fox, streamed", "width": 256, "height": 256, "steps": 3}
Event = tuple[int | None, str, dict[str, Any]]


@pytest.fixture(scope="module")
def srv(tmp_path_factory: pytest.TempPathFactory) -> Iterator[InProcessServer]:
    server = InProcessServer(tmp_path_factory.mktemp("streams"), env=ENV)
    yield server
    server.stop()


def submit(srv: InProcessServer, **fields: Any) -> str:
    r = httpx.post(f"{srv.url}/v2/z-image-turbo", json={**JOB, **fields}, timeout=30)
    assert r.status_code == 202, r.text
    return str(r.json()["request_id"])


def parse(lines: Iterator[str]) -> Iterator[Event]:
    """Server-sent events as (id, event, data); comments and ``retry`` skipped."""
    event_id: int | None = None
    name, data = "", ""
    for line in lines:
        if line.startswith("id: "):
            event_id = int(line[4:])
        elif line.startswith("event: "):
            name = line[7:]
        elif line.startswith("data: "):
            data = line[6:]
        elif line == "" and name:
            yield event_id, name, json.loads(data)
            event_id, name, data = None, "", ""


def stream(srv: InProcessServer, job_id: str, last: int | None = None) -> list[Event]:
    headers = {"Last-Event-ID": str(last)} if last is not None else {}
    url = f"{srv.url}/v2/requests/{job_id}/events"
    with httpx.stream("GET", url, headers=headers, timeout=30) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        return list(parse(r.iter_lines()))


def names(events: list[Event]) -> list[str]:
    return [name for _, name, _ in events]


def wait_started(srv: InProcessServer, job_id: str) -> None:
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        body = httpx.get(f"{srv.url}/v2/requests/{job_id}/status", timeout=10).json()
        if body.get("progress", {}).get("step", 0) >= 1:
            return
        time.sleep(0.02)
    raise AssertionError("the job never started")


def decode(preview: dict[str, Any]) -> Image.Image:
    image = Image.open(io.BytesIO(base64.b64decode(preview["image"])))
    image.load()
    return image


def test_a_queued_job_streams_every_event_in_order_with_previews(srv: InProcessServer) -> None:
    blocker = submit(srv, steps=4)
    job_id = submit(srv, preview_size=64, width=512, height=256)
    events = stream(srv, job_id)
    assert names(events) == ["queued", "started", "step", "step", "step", "completed"], events
    ids = [event_id for event_id, _, _ in events]
    assert ids == sorted(ids) and len(set(ids)) == len(ids)
    assert events[0][2]["queue_position"] >= 1
    steps = [data for _, name, data in events if name == "step"]
    assert [(s["step"], s["total"]) for s in steps] == [(1, 3), (2, 3), (3, 3)]
    images = [decode(s["preview"]) for s in steps]
    assert all(image.format == "WEBP" and image.size == (64, 32) for image in images)
    assert images[0].tobytes() != images[-1].tobytes()  # the preview changes as it renders
    assert all(s["preview"]["compute_ms"] >= 0 for s in steps)
    final = httpx.get(f"{srv.url}/v2/requests/{job_id}", timeout=10).json()
    assert events[-1][2] == final and final["status"] == "COMPLETED"
    assert names(stream(srv, blocker))[-1] == "completed"


def test_without_previews_no_preview_bytes_are_sent(srv: InProcessServer) -> None:
    job_id = submit(srv)
    with httpx.stream("GET", f"{srv.url}/v2/requests/{job_id}/events", timeout=30) as r:
        raw = r.read()
    assert b'"preview"' not in raw and b"event: completed" in raw
    assert b"event: step" in raw


def test_a_cancelled_job_ends_its_stream_with_cancelled(srv: InProcessServer) -> None:
    job_id = submit(srv, steps=20)
    wait_started(srv, job_id)
    httpx.post(f"{srv.url}/v2/requests/{job_id}/cancel", timeout=30)
    events = stream(srv, job_id)
    assert names(events)[-1] == "cancelled" and events[-1][2]["status"] == "CANCELLED"
    assert names(events)[:2] == ["queued", "started"]


def test_a_failed_job_ends_its_stream_with_failed(srv: InProcessServer) -> None:
    job_id = submit(srv, prompt="[[fault:error]] a fox")
    events = stream(srv, job_id)
    assert names(events) == ["queued", "started", "failed"], events
    assert events[-1][2]["status"] == "FAILED" and "injected" in events[-1][2]["error"]


def test_a_reader_that_reconnects_gets_the_rest(srv: InProcessServer) -> None:
    job_id = submit(srv, steps=6, preview=True)
    url = f"{srv.url}/v2/requests/{job_id}/events"
    with httpx.stream("GET", url, timeout=30) as r:
        first = []
        for event in parse(r.iter_lines()):
            first.append(event)
            if event[1] == "step":
                break  # the connection drops mid-render
    last = first[-1][0]
    assert last is not None
    rest = stream(srv, job_id, last=last)
    assert rest and all(event_id is not None and event_id > last for event_id, _, _ in rest)
    assert names(rest)[-1] == "completed"
    assert rest[-2][1] == "step" and rest[-2][2]["step"] == 6
    assert decode(rest[-2][2]["preview"]).size == (256, 256)
    # A finished job's stream, even past its terminal event, sends that event and ends.
    again = stream(srv, job_id, last=rest[-1][0])
    assert names(again) == ["completed"]


def _rss_kib() -> int:
    for line in Path(f"/proc/{os.getpid()}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


def test_fifty_unread_streams_neither_slow_renders_nor_grow_memory(
    srv: InProcessServer,
) -> None:
    big = {"steps": 6, "preview_size": 512}
    start = time.monotonic()
    baseline = submit(srv, **big)
    assert names(stream(srv, baseline))[-1] == "completed"
    alone_s = time.monotonic() - start
    before = _rss_kib()
    jobs = [submit(srv, **big) for _ in range(2)]
    readers = []
    for index in range(50):
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        sock.connect(("127.0.0.1", int(srv.url.rsplit(":", 1)[1])))
        path = f"/v2/requests/{jobs[index % 2]}/events"
        sock.sendall(f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n".encode())
        readers.append(sock)  # and never read
    start = time.monotonic()
    try:
        for job_id in jobs:
            deadline = time.monotonic() + 60
            while httpx.get(f"{srv.url}/v2/requests/{job_id}/status").json()["status"] in (
                "QUEUED",
                "PROCESSING",
            ):
                assert time.monotonic() < deadline
                time.sleep(0.05)
        took = time.monotonic() - start
        hub = srv.app.state.events
        buffered = [
            sub.buffered for job_id in jobs for sub in hub.get(job_id).subscribers
        ]  # the readers still connected, their unread events
        assert max(buffered, default=0) <= srv.settings.stream_buffer_events + 3
    finally:
        for sock in readers:
            sock.close()
    assert took < 2 * alone_s * len(jobs) + 5, (took, alone_s)
    assert _rss_kib() - before < 200_000  # KiB: the unread streams hold no image backlog


def post_stream(srv: InProcessServer, path: str, body: dict[str, Any]) -> list[Event]:
    headers = {"Accept": "text/event-stream"}
    with httpx.stream("POST", srv.url + path, json=body, headers=headers, timeout=30) as r:
        assert r.status_code == 200, r.read()
        return list(parse(r.iter_lines()))


def test_v1_streams_the_same_events_and_ends_with_its_body(srv: InProcessServer) -> None:
    events = post_stream(srv, "/v1/z-image-turbo", {**JOB, "preview_size": 32})
    assert names(events) == ["queued", "started", "step", "step", "step", "completed"]
    assert decode(events[2][2]["preview"]).size == (32, 32)
    body = events[-1][2]
    assert body["steps"] == 3 and body["image"].startswith(srv.url + "/v1/outputs/")
    # Bad input is still an ordinary 400 naming the field, not a stream.
    r = httpx.post(
        f"{srv.url}/v1/z-image-turbo",
        json={**JOB, "preview_size": 5000},
        headers={"Accept": "text/event-stream"},
    )
    assert r.status_code == 400 and "preview_size" in r.text


def test_openai_streams_partial_images_and_the_completed_image(srv: InProcessServer) -> None:
    body = {"prompt": "a fox", "size": "256x256", "num_inference_steps": 2}
    events = post_stream(
        srv, "/v1/images/generations", {**body, "stream": True, "partial_images": 2}
    )
    assert names(events) == [
        "queued",
        "started",
        "step",
        "image_generation.partial_image",
        "step",
        "image_generation.partial_image",
        "image_generation.completed",
    ]
    partial = events[3][2]
    assert partial["type"] == "image_generation.partial_image"
    assert partial["partial_image_index"] == 0 and decode({"image": partial["b64_json"]})
    done = events[-1][2]
    assert done["type"] == "image_generation.completed" and done["size"] == "256x256"
    assert decode({"image": done["b64_json"]}).size == (256, 256)
    r = httpx.post(f"{srv.url}/v1/images/generations", json={**body, "stream": True, "n": 2})
    assert r.status_code == 400 and "'n'" in r.text
