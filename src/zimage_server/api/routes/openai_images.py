"""OpenAI-compatible images API: the official ``openai`` client works unchanged."""

from __future__ import annotations

import asyncio
import time
from typing import Annotated, Any

from fastapi import APIRouter, Body, Depends, Request
from fastapi.responses import Response

from zimage_server.accounts import Admission
from zimage_server.api.auth import admit_generate, identify_caller
from zimage_server.api.bodies import BodyRoute, DocumentedAs, refuse_cross_site
from zimage_server.api.disconnect import unless_disconnected
from zimage_server.api.errors import RENDER_FAILURES, Example, error_docs
from zimage_server.api.responses import image_json, is_large, model_response
from zimage_server.api.routes.v1 import public_base
from zimage_server.api.sse import Frames, wants_stream
from zimage_server.api.streaming import stream_render
from zimage_server.billing import format_credits
from zimage_server.core.errors import InvalidRequest
from zimage_server.images import Generated, GenerationService
from zimage_server.images.openai_compat import to_edit_params, to_params
from zimage_server.images.service import check_strength
from zimage_server.protocol import (
    MODEL_SLUG,
    Flavour,
    GenerationParams,
    ImageGenerationRequest,
    ImageObject,
    ImagesResponse,
    Model,
    ModelList,
)
from zimage_server.protocol.segmind import json_value

router = APIRouter(tags=["openai"], route_class=BodyRoute)
STARTED = int(time.time())
OpenAIBody = Annotated[
    object, DocumentedAs(ImageGenerationRequest), Body(title="ImageGenerationRequest")
]


@router.post(
    "/v1/images/generations",
    summary="Generate images (OpenAI-compatible)",
    response_model=ImagesResponse,
    responses={
        200: {
            "description": "The images; with `stream` (n = 1), server-sent events: "
            "`image_generation.partial_image` per step when `partial_images` > 0, then "
            "`image_generation.completed`.",
            "content": {"text/event-stream": {}},
        },
        **error_docs(Flavour.OPENAI, Example.bad_size, *RENDER_FAILURES),
    },
)
async def generations(
    body: OpenAIBody,
    request: Request,
    admission: Annotated[Admission, Depends(admit_generate)],
) -> Response:
    service: GenerationService = request.app.state.generation
    openai_request, batch = to_params(json_value(body))
    service.check_prompt(openai_request.prompt)
    await service.check_loras(batch[0])
    as_url = openai_request.response_format == "url"
    if openai_request.stream or wants_stream(request):
        return await _stream(request, service, openai_request, batch[0], admission)
    images = await unless_disconnected(
        request, service.generate_many(batch, admission, store=as_url)
    )
    return await _images_response(request, openai_request, images, admission)


async def _stream(
    request: Request,
    service: GenerationService,
    openai_request: ImageGenerationRequest,
    params: GenerationParams,
    admission: Admission,
) -> Response:
    """OpenAI's streaming shape: a step's preview as ``image_generation.partial_image``,
    the image as ``image_generation.completed``; queue and step events as on v1."""
    if openai_request.n > 1:
        raise InvalidRequest(
            f"Invalid 'n': a streamed request makes one image (got {openai_request.n}).",
            field="n",
        )
    as_url = openai_request.response_format == "url"
    size = f"{params.width}x{params.height}"
    common = {"size": size, "quality": "auto", "background": "opaque"}

    async def run(render_id: str) -> Generated:
        return await service.generate(params, admission, store=as_url, stream_id=render_id)

    async def result(g: Generated) -> dict[str, Any]:
        image = (
            {"url": request.app.state.outputs.url(g.output_id, public_base(request))}
            if as_url
            else {"b64_json": await asyncio.to_thread(g.base64)}
        )
        return {
            "type": "image_generation.completed",
            **image,
            "created_at": int(time.time()),
            "output_format": openai_request.output_format,
            "seed": g.seed,
            **common,
        }

    def shape(name: str, data: dict[str, Any]) -> Frames:
        preview = data.get("preview")
        if name != "step" or preview is None:
            return [(name, data)]
        partial = {
            "type": "image_generation.partial_image",
            "b64_json": preview["image"],
            "partial_image_index": data["step"] - 1,
            "created_at": int(time.time()),
            "output_format": "webp",
            **common,
        }
        step = {k: v for k, v in data.items() if k != "preview"}
        return [("step", step), ("image_generation.partial_image", partial)]

    names = {"completed": "image_generation.completed"}
    return await stream_render(request, run, result, names, shape, admission.headers)


_EDIT_FORM = {
    "type": "object",
    "required": ["image", "prompt"],
    "properties": {
        "image": {"type": "string", "format": "binary", "description": "PNG, JPEG or WebP."},
        "mask": {
            "type": "string",
            "format": "binary",
            "description": "PNG with alpha: its transparent pixels are edited.",
        },
        "prompt": {"type": "string"},
        "n": {"type": "integer", "minimum": 1, "maximum": 4, "default": 1},
        "size": {"type": "string", "description": "'WxH', or 'auto' (the input's size)."},
        "response_format": {"type": "string", "enum": ["url", "b64_json"]},
        "strength": {"type": "number", "description": "Extension: how far from the input."},
    },
}


@router.post(
    "/v1/images/edits",
    summary="Edit an image (OpenAI-compatible, multipart)",
    response_model=ImagesResponse,
    responses=error_docs(Flavour.OPENAI, Example.bad_size, *RENDER_FAILURES),
    openapi_extra={
        "requestBody": {
            "required": True,
            "content": {"multipart/form-data": {"schema": _EDIT_FORM}},
        }
    },
)
async def edits(
    request: Request, admission: Annotated[Admission, Depends(admit_generate)]
) -> Response:
    """``image`` (and ``image[]``, the first), an optional ``mask`` whose transparent
    pixels are edited, and the generation fields; ``strength`` is our extension."""
    service: GenerationService = request.app.state.generation
    refuse_cross_site(request)
    fields, files = await _read_form(request, service.settings.input_max_bytes)
    image = files.get("image") or files.get("image[]")
    if image is None:
        raise InvalidRequest("Missing required field 'image': upload a PNG, JPEG or WebP file.")
    edit = await service.edit_inputs(image, files.get("mask"))
    openai_request, batch = to_edit_params(fields, edit.task)
    service.check_prompt(openai_request.prompt)
    check_strength(batch[0])
    service.resolve_loras(batch[0])
    inputs = await asyncio.to_thread(
        service.fit_inputs,
        batch[0],
        edit.image,
        edit.mask,
        "mask",
        size_given=openai_request.size != "auto",
    )
    as_url = openai_request.response_format == "url"
    images = await unless_disconnected(
        request, service.generate_many(batch, admission, store=as_url, inputs=inputs)
    )
    return await _images_response(request, openai_request, images, admission)


async def _read_form(request: Request, max_bytes: int) -> tuple[dict[str, str], dict[str, bytes]]:
    """The multipart form's text fields and its files' bytes (each at most ``max_bytes``;
    the body limit bounds the whole)."""
    if not request.headers.get("content-type", "").startswith("multipart/form-data"):
        raise InvalidRequest("The body must be multipart/form-data with an 'image' file.")
    fields: dict[str, str] = {}
    files: dict[str, bytes] = {}
    async with request.form(max_files=4, max_fields=64) as form:
        for name, value in form.multi_items():
            if isinstance(value, str):
                fields.setdefault(name, value)
                continue
            data = await value.read(max_bytes + 1)
            if len(data) > max_bytes:
                raise InvalidRequest(
                    f"Invalid '{name}': the file is larger than {max_bytes} bytes.", field=name
                )
            files.setdefault(name, data)
    return fields, files


async def _images_response(
    request: Request,
    openai_request: ImageGenerationRequest,
    images: list[Generated],
    admission: Admission,
) -> Response:
    as_url = openai_request.response_format == "url"
    base, outputs = public_base(request), request.app.state.outputs
    headers = dict(admission.headers)
    if images[0].credits_remaining is not None:
        consumed = sum(g.credits_consumed or 0 for g in images)
        headers["x-credits-consumed"] = format_credits(consumed)
        headers["x-remaining-credits"] = format_credits(images[0].credits_remaining)

    def content() -> ImagesResponse:
        data = [
            ImageObject(
                **({"url": outputs.url(g.output_id, base)} if as_url else {"b64_json": g.base64()}),
                revised_prompt=openai_request.prompt,
                seed=g.seed,
            )
            for g in images
        ]
        return ImagesResponse(
            created=int(time.time()),
            data=data,
            output_format=openai_request.output_format,
            size=f"{images[0].params.width}x{images[0].params.height}",
            quality="auto",
        )

    inline = 0 if as_url else sum(len(g.data) for g in images)
    return await image_json(content, is_large(inline), headers=headers)


@router.get(
    "/v1/models",
    summary="List models (OpenAI-compatible)",
    response_model=ModelList,
    responses=error_docs(Flavour.OPENAI, Example.no_key),
)
async def models(_caller: Annotated[Admission, Depends(identify_caller)]) -> Response:
    model = Model(id=MODEL_SLUG, object="model", created=STARTED, owned_by="zimage-server")
    return model_response(ModelList(object="list", data=[model]))
