"""Stored images, by unguessable id."""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import FileResponse

from zimage_server.api.errors import Example, error_docs
from zimage_server.images.encode import MEDIA_TYPES
from zimage_server.protocol import Flavour
from zimage_server.store import OutputStore

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
async def get_output(output_id: str, request: Request) -> FileResponse:
    outputs: OutputStore = request.app.state.outputs
    path = outputs.path(output_id)
    return FileResponse(
        path,
        media_type=MEDIA_TYPES[path.suffix.lstrip(".")],
        headers={"Cache-Control": f"private, max-age={outputs.ttl_s}"},
    )
