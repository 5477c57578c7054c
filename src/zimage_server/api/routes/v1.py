"""Segmind v1: ``POST /v1/z-image-turbo``, synchronous."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Body, Depends, Request
from fastapi.responses import Response

from zimage_server.accounts import Admission
from zimage_server.api.auth import admit_generate, deadline_from
from zimage_server.api.bodies import BodyRoute, DocumentedAs
from zimage_server.api.disconnect import unless_disconnected
from zimage_server.api.errors import RENDER_FAILURES, Example, error_docs
from zimage_server.api.responses import image_json, is_large, model_response
from zimage_server.billing import format_credits
from zimage_server.images import Generated, GenerationService
from zimage_server.protocol import Flavour, GenerationParams, ImageResponse

router = APIRouter(tags=["images"], route_class=BodyRoute)
V1Body = Annotated[object, DocumentedAs(GenerationParams), Body(title="GenerationParams")]

_RESPONSES: dict[int | str, dict[str, Any]] = {
    200: {
        "description": "JSON with the image URL (or base64 when `base_64` is true); the "
        "raw image when the request sends `Accept: image/*`.",
        "content": {"image/webp": {}, "image/jpeg": {}, "image/png": {}},
    },
    **error_docs(Flavour.SEGMIND, Example.bad_steps, Example.unknown_model, *RENDER_FAILURES),
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
    response_model=ImageResponse,
    responses=_RESPONSES,
)
async def generate(
    model: str,
    body: V1Body,
    request: Request,
    admission: Annotated[Admission, Depends(admit_generate)],
) -> Response:
    service: GenerationService = request.app.state.generation
    service.check_model(model)
    params = service.validate(body)
    if service.settings.log_prompts:
        request.state.log_prompt = params.prompt
    raw = wants_image_bytes(request, service.settings.v1_default_response)
    generated = await unless_disconnected(
        request,
        service.generate(
            params, admission, store=not raw and not params.base_64, timeout=deadline_from(request)
        ),
    )
    headers = _headers(generated, admission)
    request.state.log_seed, request.state.log_timings = generated.seed, generated.timings
    if raw:
        return Response(generated.data, media_type=generated.media_type, headers=headers)
    if generated.output_id:
        image = request.app.state.outputs.url(generated.output_id, public_base(request))
        return model_response(generated.response(image), headers=headers)
    return await image_json(
        lambda: generated.response(generated.base64()),
        is_large(len(generated.data)),
        headers=headers,
    )


def public_base(request: Request) -> str:
    configured: str | None = request.app.state.settings.public_url
    return configured or str(request.base_url).rstrip("/")
