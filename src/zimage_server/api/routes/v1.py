"""Segmind v1: ``POST /v1/z-image-turbo``, synchronous."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response

from zimage_server.images import Generated, GenerationParams, GenerationService

router = APIRouter(tags=["images"])

_ERROR = {"content": {"application/json": {"example": {"error": "Invalid 'steps': ..."}}}}
_RESPONSES: dict[int | str, dict[str, Any]] = {
    200: {
        "description": "JSON with the image URL (or base64 when `base_64` is true); the "
        "raw image when the request sends `Accept: image/*`.",
        "content": {
            "application/json": {
                "example": {
                    "image": "http://localhost:8000/v1/outputs/Xy...Q.webp",
                    "seed": 1234,
                    "width": 1024,
                    "height": 1024,
                    "image_format": "webp",
                    "generation_time": 0.71,
                }
            },
            "image/webp": {},
            "image/jpeg": {},
            "image/png": {},
        },
    },
    **{
        code: {"description": text, **_ERROR}
        for code, text in [
            (400, "Invalid parameter or body; the message names the field and allowed values"),
            (404, "Unknown model slug"),
            (429, "Queue full; retry after `Retry-After` seconds"),
            (502, "The worker died during the request"),
            (503, "Model still loading"),
            (504, "Deadline exceeded"),
        ]
    },
}
_BODY = {
    "requestBody": {
        "required": True,
        "content": {"application/json": {"schema": GenerationParams.model_json_schema()}},
    }
}


def wants_image_bytes(request: Request, default: str) -> bool:
    """Raw bytes for ``Accept: image/...`` (first preference), JSON otherwise."""
    accept = request.headers.get("accept", "")
    first = accept.split(",")[0].split(";")[0].strip().lower()
    if first.startswith("image/"):
        return True
    if first in ("", "*/*"):
        return default == "binary"
    return False


def _headers(generated: Generated) -> dict[str, str]:
    return {
        "X-Seed": str(generated.seed),
        "X-Generation-Time": f"{generated.generation_time:.4f}",
    }


@router.post(
    "/v1/{model}",
    summary="Generate an image (Segmind-compatible)",
    openapi_extra=_BODY,
    responses=_RESPONSES,
)
async def generate(model: str, request: Request) -> Response:
    service: GenerationService = request.app.state.generation
    service.check_model(model)
    params = service.parse(await request.body())
    generated = await service.generate(params)
    headers = _headers(generated)
    if wants_image_bytes(request, service.settings.v1_default_response):
        return Response(generated.data, media_type=generated.media_type, headers=headers)
    if params.base_64:
        image = generated.base64()
    else:
        output_id = await service.publish(generated)
        image = f"{public_base(request)}/v1/outputs/{output_id}"
    return JSONResponse({"image": image, **generated.summary()}, headers=headers)


def public_base(request: Request) -> str:
    configured: str | None = request.app.state.settings.public_url
    return configured or str(request.base_url).rstrip("/")
