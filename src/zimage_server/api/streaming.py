"""A synchronous request answered as an event stream (``Accept: text/event-stream``).

The render runs as a task beside the stream, under a fresh render id the hub follows.
Until its first event (``queued``) the request is an ordinary one: a refusal (no credits,
rate limit, full queue) is answered with its usual status and body. After that the
response is a 200 stream that ends with the result (``completed``) or the error
(``failed``, the usual error body plus ``status_code``). A reader that leaves stops the
render and is refunded, as a plain request whose client hangs up.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import secrets
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, TypeVar

from fastapi.responses import Response
from starlette.requests import Request

from zimage_server.api.errors import render_error
from zimage_server.api.sse import Shape, event_frames, event_stream
from zimage_server.core.errors import ZImageError
from zimage_server.streams import ProgressHub, StreamEvent

T = TypeVar("T")
log = logging.getLogger("zimage.api")


async def stream_render(
    request: Request,
    run: Callable[[str], Awaitable[T]],
    result: Callable[[T], Awaitable[dict[str, Any]]],
    names: dict[str, str] | None = None,
    shape: Shape | None = None,
    headers: dict[str, str] | None = None,
) -> Response:
    """Run ``run(render_id)``; stream its events, then ``result(value)`` as ``completed``
    (terminal events renamed by ``names``, others reshaped by ``shape``). ``headers`` go
    on the stream's response (the key's rate-limit headers, as on a plain answer)."""
    hub: ProgressHub = request.app.state.events
    render_id = secrets.token_hex(16)
    subscription = hub.subscribe(render_id)
    task = asyncio.ensure_future(run(render_id))
    waiter = asyncio.create_task(subscription.wait())
    await asyncio.wait({task, waiter}, return_when=asyncio.FIRST_COMPLETED)
    waiter.cancel()
    if task.done() and task.exception() is not None:  # refused before it was queued
        subscription.close()
        hub.discard(render_id)
        task.result()
    finisher = asyncio.create_task(_finish(request, hub, render_id, task, result))

    async def finish(event: StreamEvent) -> list[tuple[str, dict[str, Any]]]:
        return [((names or {}).get(event.name, event.name), event.data)]

    async def body() -> AsyncIterator[bytes]:
        try:
            keepalive = request.app.state.settings.stream_keepalive_s
            frames = event_frames(subscription, finish, keepalive, *([shape] if shape else []))
            async for chunk in frames:
                yield chunk
        finally:
            task.cancel()  # no-op once finished; a reader who left stops the render
            with contextlib.suppress(asyncio.CancelledError):
                await finisher
            hub.discard(render_id)

    return event_stream(body(), headers)


async def _finish(
    request: Request,
    hub: ProgressHub,
    render_id: str,
    task: asyncio.Future[T],
    result: Callable[[T], Awaitable[dict[str, Any]]],
) -> None:
    """End the channel with the task's outcome (its result, or its error's body)."""
    try:
        value = await task
        hub.finish(render_id, "completed", await result(value))
    except ZImageError as exc:
        hub.finish(render_id, "failed", _error_data(exc, request))
    except asyncio.CancelledError:
        hub.finish(render_id, "cancelled", {"request_id": render_id})
    except Exception:
        log.exception("streamed render %s failed", render_id)
        hub.finish(render_id, "failed", {"status_code": 500, "error": "internal error"})


def _error_data(exc: ZImageError, request: Request) -> dict[str, Any]:
    response = render_error(exc, request.scope)
    return {"status_code": response.status_code, **json.loads(bytes(response.body))}
