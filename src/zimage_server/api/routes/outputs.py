"""Stored images, by unguessable id."""

from __future__ import annotations

import asyncio

from fastapi import APIRouter, Request
from fastapi.responses import FileResponse, Response, StreamingResponse

from zimage_server.api.errors import Example, error_docs
from zimage_server.images.encode import MEDIA_TYPES
from zimage_server.protocol import Flavour
from zimage_server.store import Outputs

router = APIRouter(tags=["images"])


@router.get(
    "/v1/outputs/{output_id}",
    summary="Download a generated image",
    response_class=FileResponse,
    responses={
        200: {"content": {media_type: {} for media_type in MEDIA_TYPES.values()}},
        **error_docs(Flavour.SEGMIND, Example.expired_output),
    },
)
async def get_output(output_id: str, request: Request) -> Response:
    """From the local folder, or streamed from the bucket (Starlette iterates the chunks
    in its thread pool)."""
    outputs: Outputs = request.app.state.outputs
    stored = await asyncio.to_thread(outputs.open, output_id)
    headers = {"Cache-Control": f"private, max-age={outputs.ttl_s}"}
    if stored.path is not None:
        return FileResponse(stored.path, media_type=stored.media_type, headers=headers)
    if stored.size is not None:
        headers["Content-Length"] = str(stored.size)
    assert stored.chunks is not None  # noqa: S101 - a Stored is a path or chunks
    return StreamingResponse(stored.chunks, media_type=stored.media_type, headers=headers)
