"""Segmind v1: ``POST /v1/z-image-turbo``, synchronous."""

from __future__ import annotations

import asyncio
from typing import Annotated, Any

from fastapi import APIRouter, Body, Depends, Request
from fastapi.responses import Response

from zimage_server.accounts import Admission
from zimage_server.api.auth import admit_generate, deadline_from, identify_caller
from zimage_server.api.bodies import BodyRoute, DocumentedAs
from zimage_server.api.disconnect import unless_disconnected
from zimage_server.api.errors import RENDER_FAILURES, Example, error_docs
from zimage_server.api.negotiation import negotiate
from zimage_server.api.responses import image_json, is_large, model_response
from zimage_server.api.sse import wants_stream
from zimage_server.api.streaming import stream_render
from zimage_server.billing import format_credits
from zimage_server.images import Generated, GenerationService
from zimage_server.images.inputs import InputImages
from zimage_server.protocol import Flavour, GenerationParams, ImageResponse, wire
from zimage_server.protocol.segmind import LORA_MAX_SCALE, LoraInfo, LoraList

router = APIRouter(tags=["images"], route_class=BodyRoute)
V1Body = Annotated[object, DocumentedAs(GenerationParams), Body(title="GenerationParams")]

_RESPONSES: dict[int | str, dict[str, Any]] = {
    200: {
        "description": "JSON with the image URL (or base64 when `base_64` is true); the "
        "raw image when `Accept` prefers an image type. Without `image_format` in the body, "
        "`Accept` picks the format (image/png, image/jpeg, image/webp; q-values honoured); "
        "the body's `image_format` wins over `Accept` (never 406, which means insufficient "
        "credits). With `Accept: text/event-stream`, the render's server-sent events, "
        "ending with `completed` (this JSON) or `failed`.",
        "content": {
            "image/webp": {},
            "image/jpeg": {},
            "image/png": {},
            "text/event-stream": {},
        },
    },
    **error_docs(Flavour.SEGMIND, Example.bad_steps, Example.unknown_model, *RENDER_FAILURES),
}


def negotiated(
    request: Request, params: GenerationParams, default: str
) -> tuple[bool, GenerationParams]:
    """Raw bytes or JSON, and the params with the format ``Accept`` chose when the body
    named none (``api/negotiation.py`` has the rules)."""
    choice = negotiate(
        request.headers.get("accept", ""), default, "image_format" in params.model_fields_set
    )
    if choice.image_format is not None:
        params = params.model_copy(update={"image_format": choice.image_format})
    return choice.raw, params


def _headers(generated: Generated, admission: Admission) -> dict[str, str]:
    headers = {
        "X-Seed": str(generated.seed),
        "X-Generation-Time": f"{generated.generation_time:.4f}",
        "X-Replica": generated.worker,
        "Vary": "Accept",
        **admission.headers,
    }
    if generated.credits_consumed is not None and generated.credits_remaining is not None:
        headers["x-credits-consumed"] = format_credits(generated.credits_consumed)
        headers["x-remaining-credits"] = format_credits(generated.credits_remaining)
    return headers


@router.get("/v1/loras", summary="The LoRA adapters installed on this server")
async def list_loras(
    request: Request, _caller: Annotated[Admission, Depends(identify_caller)]
) -> LoraList:
    service: GenerationService = request.app.state.generation
    settings = service.settings
    installed = await asyncio.to_thread(service.loras.installed)
    return LoraList(
        loras=[LoraInfo(name=lora.name, size_bytes=lora.size_bytes) for lora in installed],
        max_loras=settings.max_loras,
        max_scale=LORA_MAX_SCALE,
        max_rank=settings.lora_max_rank,
        urls_allowed=settings.lora_allow_urls,
    )


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
    params = await service.validate(body, model)
    if service.settings.log_prompts:
        request.state.log_prompt = params.prompt
    inputs = None
    if params.task != "text-to-image":  # fetching images can take long: stop if the client goes
        inputs = await unless_disconnected(request, service.load_inputs(params))
    if wants_stream(request):
        return await _stream(request, service, params, admission, inputs)
    raw, params = negotiated(request, params, service.settings.v1_default_response)
    store = not raw and not params.base_64
    generated = await unless_disconnected(
        request,
        service.generate(
            params, admission, store=store, timeout=deadline_from(request), inputs=inputs
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


async def _stream(
    request: Request,
    service: GenerationService,
    params: GenerationParams,
    admission: Admission,
    inputs: InputImages | None,
) -> Response:
    """``Accept: text/event-stream``: the render's events, then the JSON body as
    ``completed``."""
    deadline = deadline_from(request)

    async def run(render_id: str) -> Generated:
        store = not params.base_64
        return await service.generate(
            params, admission, store=store, timeout=deadline, stream_id=render_id, inputs=inputs
        )

    async def result(generated: Generated) -> dict[str, Any]:
        if generated.output_id:
            outputs = request.app.state.outputs  # a presigned bucket URL, or ours
            image = outputs.url(generated.output_id, public_base(request))
            return {**wire(generated.response(image)), **_credits(generated)}
        body = await asyncio.to_thread(lambda: wire(generated.response(generated.base64())))
        return {**body, **_credits(generated)}

    return await stream_render(request, run, result, headers=admission.headers)


def _credits(generated: Generated) -> dict[str, str]:
    """What a plain answer says in ``x-credits-*`` headers, in a stream's last event."""
    if generated.credits_consumed is None or generated.credits_remaining is None:
        return {}
    return {
        "credits_consumed": format_credits(generated.credits_consumed),
        "credits_remaining": format_credits(generated.credits_remaining),
    }


def public_base(request: Request) -> str:
    configured: str | None = request.app.state.settings.public_url
    return configured or str(request.base_url).rstrip("/")
