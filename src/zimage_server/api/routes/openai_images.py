"""OpenAI-compatible images API: the official ``openai`` client works unchanged."""

from __future__ import annotations

import time
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Request
from fastapi.responses import Response

from zimage_server.accounts import Admission
from zimage_server.api.auth import admit_generate, identify_caller
from zimage_server.api.responses import image_json, is_large
from zimage_server.api.routes.v1 import public_base
from zimage_server.billing import format_credits
from zimage_server.images import GenerationService
from zimage_server.images.openai_compat import ImageGenerationRequest, to_params
from zimage_server.images.params import MODEL_SLUG, parse_json

router = APIRouter(tags=["openai"])
STARTED = int(time.time())


@router.post(
    "/v1/images/generations",
    summary="Generate images (OpenAI-compatible)",
    openapi_extra={
        "requestBody": {
            "required": True,
            "content": {"application/json": {"schema": ImageGenerationRequest.model_json_schema()}},
        }
    },
)
async def generations(
    request: Request, admission: Annotated[Admission, Depends(admit_generate)]
) -> Response:
    service: GenerationService = request.app.state.generation
    body, batch = to_params(parse_json(await request.body()))
    service.check_prompt(body.prompt)
    as_url = body.response_format == "url"
    images = await service.generate_many(batch, admission, store=as_url)
    base = public_base(request)
    width, height = batch[0].width, batch[0].height
    headers = dict(admission.headers)
    if images[0].credits_remaining is not None:
        consumed = sum(g.credits_consumed or 0 for g in images)
        headers["x-credits-consumed"] = format_credits(consumed)
        headers["x-remaining-credits"] = format_credits(images[0].credits_remaining)

    def content() -> dict[str, Any]:
        data: list[dict[str, Any]] = [
            {"url": f"{base}/v1/outputs/{g.output_id}"} if as_url else {"b64_json": g.base64()}
            for g in images
        ]
        for item, generated in zip(data, images, strict=True):
            item.update(revised_prompt=body.prompt, seed=generated.seed)
        return {
            "created": int(time.time()),
            "data": data,
            "output_format": body.output_format,
            "size": f"{width}x{height}",
            "quality": "auto",
        }

    inline = 0 if as_url else sum(len(g.data) for g in images)
    return await image_json(content, is_large(inline), headers=headers)


@router.get("/v1/models", summary="List models (OpenAI-compatible)")
async def models(_caller: Annotated[Admission, Depends(identify_caller)]) -> dict[str, Any]:
    return {
        "object": "list",
        "data": [
            {"id": MODEL_SLUG, "object": "model", "created": STARTED, "owned_by": "zimage-server"}
        ],
    }
