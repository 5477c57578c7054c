"""Render events as the SDK hands them out: one typed event per server-sent event.

The wire is parsed by ``httpx-sse``; this module only turns each event's JSON into a
``RenderEvent`` and a terminal failure into the SDK's typed errors, so the sync and async
clients share everything but the I/O.
"""

from __future__ import annotations

import base64
import json
from dataclasses import dataclass, field
from typing import Any

from httpx_sse import ServerSentEvent

from zimage_server.client._shared import GeneratedImage, image_of, job_failure
from zimage_server.client.errors import JobFailedError, error_for
from zimage_server.protocol import ImageResponse, JobResult

STREAM_HEADERS = {"Accept": "text/event-stream", "Cache-Control": "no-store"}
TERMINAL_EVENTS = frozenset({"completed", "failed", "cancelled"})


@dataclass(frozen=True)
class RenderEvent:
    """One step of a render's life: ``queued`` (``queue_position``, 1 = next),
    ``started``, ``step`` (``step`` of ``total``, ``preview`` WebP bytes when asked for)
    or ``completed`` (``image``; for a v2 job also ``result``). ``failed`` and
    ``cancelled`` are raised as errors instead."""

    kind: str
    request_id: str | None = None
    event_id: int | None = None
    queue_position: int | None = None
    step: int | None = None
    total: int | None = None
    preview: bytes | None = field(default=None, repr=False)
    preview_size: tuple[int, int] | None = None
    image: GeneratedImage | None = None
    result: JobResult | None = field(default=None, repr=False)
    data: dict[str, Any] = field(default_factory=dict, repr=False)

    @property
    def terminal(self) -> bool:
        return self.kind in TERMINAL_EVENTS

    @property
    def fraction(self) -> float | None:
        """Share of the steps done (0..1), once the render started."""
        if self.step is None or not self.total:
            return None
        return self.step / self.total


def decode(sse: ServerSentEvent) -> RenderEvent | None:
    """The event of one SSE frame; None for frames without data (``retry`` alone)."""
    if not sse.data:
        return None
    data: dict[str, Any] = json.loads(sse.data)
    preview = data.get("preview")
    return RenderEvent(
        kind=sse.event,
        request_id=data.get("request_id"),
        event_id=int(sse.id) if sse.id.isdigit() else None,
        queue_position=data.get("queue_position"),
        step=data.get("step"),
        total=data.get("total"),
        preview=base64.b64decode(preview["image"]) if preview else None,
        preview_size=(preview["width"], preview["height"]) if preview else None,
        data=data,
    )


def finish_v1(event: RenderEvent, request_id: str | None) -> RenderEvent:
    """A v1 stream's terminal event (its body names no request: ``request_id`` is the one
    the earlier events gave): the image, or the typed error of the failure."""
    if event.kind == "completed":
        image = image_of(ImageResponse.model_validate(event.data))
        return _completed(event, image, request_id=request_id)
    status = int(event.data.get("status_code", 500))
    raise error_for(status, _message(event.data), event.data.get("request_id") or request_id)


def v2_result(event: RenderEvent) -> JobResult:
    """A v2 job's terminal body; FAILED and CANCELLED raise ``JobFailedError`` (as
    ``wait`` does)."""
    result = JobResult.model_validate(event.data)
    if event.kind != "completed" or result.status != "COMPLETED":
        raise JobFailedError(422, job_failure(result.request_id, result), result.request_id)
    return result


def finish_v2(event: RenderEvent, result: JobResult, image: GeneratedImage) -> RenderEvent:
    return _completed(event, image, result)


def _completed(
    event: RenderEvent,
    image: GeneratedImage,
    result: JobResult | None = None,
    request_id: str | None = None,
) -> RenderEvent:
    return RenderEvent(
        kind=event.kind,
        request_id=result.request_id if result else request_id,
        event_id=event.event_id,
        image=image,
        result=result,
        data=event.data,
    )


def _message(data: dict[str, Any]) -> str:
    error = data.get("error")
    if isinstance(error, dict):
        return str(error.get("message", error))
    return str(error or "the render failed")


def image_format_of(data: bytes) -> str:
    """The format Pillow reads from the bytes (a v2 result does not name it)."""
    import io

    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(io.BytesIO(data)) as image:
            return (image.format or "webp").lower()
    except (UnidentifiedImageError, OSError):
        return "webp"
