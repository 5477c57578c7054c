"""Server-sent events: a hub subscription written as an ``text/event-stream`` body.

Each event carries its channel's ``id`` (for ``Last-Event-ID``); a comment line goes out
when nothing happened for ``keepalive_s``, so proxies keep the connection and a vanished
reader is noticed. Previews are encoded to WebP in a worker thread, once per event however
many readers get it. The terminal event's body is built by the route (``finish``): each
API has its own result shape.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

from fastapi.responses import StreamingResponse
from starlette.requests import Request

from zimage_server.api.responses import render_json
from zimage_server.streams import EventSource, StreamEvent

KEEPALIVE = b": keep-alive\n\n"
RETRY_MS = 2000
Frames = list[tuple[str, dict[str, Any]]]
Finish = Callable[[StreamEvent], Awaitable[Frames]]
Shape = Callable[[str, dict[str, Any]], Frames]


def frame(name: str, data: dict[str, Any], event_id: int | None = None) -> bytes:
    head = f"id: {event_id}\n" if event_id is not None else ""
    return f"{head}event: {name}\ndata: ".encode() + render_json(data) + b"\n\n"


def wants_stream(request: Request) -> bool:
    """``Accept: text/event-stream`` as the first preference."""
    accept = request.headers.get("accept", "")
    return accept.split(",")[0].split(";")[0].strip().lower() == "text/event-stream"


def last_event_id(request: Request) -> int | None:
    """The ``Last-Event-ID`` a reconnecting reader sends; None when absent or not ours
    (ids fit in 18 digits: a taken-over job's continue from a millisecond clock)."""
    raw = request.headers.get("last-event-id", "").strip()
    return int(raw) if raw.isdigit() and len(raw) <= 18 else None


async def with_preview(event: StreamEvent) -> dict[str, Any]:
    """The event's data, with its preview as base64 WebP (encoded on first use, in a
    thread; an event read back from Redis arrives encoded)."""
    encoded = event.encoded
    if encoded is None and event.preview is not None:
        encoded = await asyncio.to_thread(event.encode)
    return event.data if encoded is None else {**event.data, "preview": encoded}


def _same(name: str, data: dict[str, Any]) -> Frames:
    return [(name, data)]


async def event_frames(
    subscription: EventSource, finish: Finish, keepalive_s: float, shape: Shape = _same
) -> AsyncIterator[bytes]:
    """Write events until the terminal one (then end), keep-alives between."""
    try:
        yield f"retry: {RETRY_MS}\n\n".encode()
        while True:
            event = await subscription.next(keepalive_s)
            if event is None:
                yield KEEPALIVE
            elif event.terminal:
                for name, data in await finish(event):
                    yield frame(name, data, event.id)
                return
            else:
                for name, data in shape(event.name, await with_preview(event)):
                    yield frame(name, data, event.id)
    finally:
        subscription.close()


def event_stream(
    body: AsyncIterator[bytes], headers: dict[str, str] | None = None
) -> StreamingResponse:
    """The response: no caching, no proxy buffering."""
    extra = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no", **(headers or {})}
    return StreamingResponse(body, media_type="text/event-stream", headers=extra)
