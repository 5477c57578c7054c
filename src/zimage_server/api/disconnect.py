"""Stop work whose client has gone: a render nobody waits for must not run on, or be paid.

uvicorn reports a closed connection as an ``http.disconnect`` message on the request's
``receive`` channel once the body has been read; watching it beside the work lets a
route cancel the work (the engine stops the render between denoising steps, and the
billing block releases the hold) instead of finishing an image nobody will get.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Coroutine
from typing import Any, TypeVar

from starlette.requests import Request

from zimage_server.core.errors import ClientDisconnected

T = TypeVar("T")


async def unless_disconnected(request: Request, work: Coroutine[Any, Any, T]) -> T:
    """Await ``work``; if the client disconnects first, cancel it and raise
    ``ClientDisconnected`` (after the work's own cleanup, e.g. its refund, has run)."""
    task = asyncio.ensure_future(work)
    watcher = asyncio.create_task(_disconnected(request))
    try:
        await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watcher.cancel()
        if not task.done():
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
    if task.cancelled():
        raise ClientDisconnected("The client closed the connection; the render was stopped.")
    return task.result()


async def _disconnected(request: Request) -> None:
    while (await request.receive())["type"] != "http.disconnect":
        pass
