"""Protocol models as JSON responses; bodies with base64 images are rendered off the event
loop when large.

Base64 plus ``json.dumps`` of a 1024x1024 image cost milliseconds of CPU (a ~300 KB WebP:
about 5 ms on a slow core; a ~2 MB PNG: about 30 ms). On the event loop that would stall
every other request and the engine's dispatch of the next batch to the GPU, so such bodies
are built in a worker thread. Small ones are built inline, where the thread hop would cost
more than it saves.

The bytes are those Starlette's ``JSONResponse`` would send for the model's ``wire`` dict.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable, Mapping
from typing import Any

from fastapi.responses import Response
from pydantic import BaseModel

from zimage_server.protocol.wire import wire

INLINE_MAX_BYTES = 16 * 1024  # image bytes; their base64 and JSON take ~0.2 ms or less


def render_json(content: Any) -> bytes:
    """The bytes Starlette's ``JSONResponse`` would send for ``content``."""
    return json.dumps(
        content, ensure_ascii=False, allow_nan=False, indent=None, separators=(",", ":")
    ).encode("utf-8")


def render_model(model: BaseModel) -> bytes:
    return render_json(wire(model))


def model_response(
    model: BaseModel, status_code: int = 200, headers: Mapping[str, str] | None = None
) -> Response:
    return Response(render_model(model), status_code, headers, media_type="application/json")


def is_large(image_bytes: int) -> bool:
    return image_bytes > INLINE_MAX_BYTES


async def image_json(
    build: Callable[[], BaseModel],
    off_loop: bool,
    status_code: int = 200,
    headers: Mapping[str, str] | None = None,
) -> Response:
    """``build()`` (which base64-encodes the image) as a JSON response; with ``off_loop``
    (see ``is_large``) both it and the rendering run in a worker thread."""
    if off_loop:
        body = await asyncio.to_thread(lambda: render_model(build()))
    else:
        body = render_model(build())
    return Response(body, status_code, headers, media_type="application/json")
