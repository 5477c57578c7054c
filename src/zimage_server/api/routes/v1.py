"""Segmind v1: ``POST /v1/z-image-turbo``, synchronous."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse, Response

from zimage_server.accounts import Admission
from zimage_server.api.auth import admit_generate, deadline_from
from zimage_server.api.responses import image_json, is_large
from zimage_server.billing import format_credits
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


def _headers(generated: Generated, admission: Admission) -> dict[str, str]:
    headers = {
        "X-Seed": str(generated.seed),
        "X-Generation-Time": f"{generated.generation_time:.4f}",
        "X-Replica": generated.worker,
        **admission.headers,
    }
    if generated.credits_consumed is not None and generated.credits_remaining is not None:
        headers["x-credits-consumed"] = format_credits(generated.credits_consumed)
        headers["x-remaining-credits"] = format_credits(generated.credits_remaining)
    return headers


@router.post(
    "/v1/{model}",
    summary="Generate an image (Segmind-compatible)",
    openapi_extra=_BODY,
    responses=_RESPONSES,
)
async def generate(
    model: str, request: Request, admission: Annotated[Admission, Depends(admit_generate)]
) -> Response:
    service: GenerationService = request.app.state.generation
    service.check_model(model)
    params = service.parse(await request.body())
    if service.settings.log_prompts:
        request.state.log_prompt = params.prompt
    raw = wants_image_bytes(request, service.settings.v1_default_response)
    generated = await service.generate(
        params, admission, store=not raw and not params.base_64, timeout=deadline_from(request)
    )
    headers = _headers(generated, admission)
    request.state.log_seed, request.state.log_timings = generated.seed, generated.timings
    if raw:
        return Response(generated.data, media_type=generated.media_type, headers=headers)
    if generated.output_id:
        image = f"{public_base(request)}/v1/outputs/{generated.output_id}"
        return JSONResponse({"image": image, **generated.summary()}, headers=headers)
    return await image_json(
        lambda: {"image": generated.base64(), **generated.summary()},
        is_large(len(generated.data)),
        headers=headers,
    )


def public_base(request: Request) -> str:
    configured: str | None = request.app.state.settings.public_url
    return configured or str(request.base_url).rstrip("/")
