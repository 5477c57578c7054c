"""OpenAI's ``POST /v1/images/generations`` body, translated into our generation params."""

from __future__ import annotations

import re

from pydantic import ValidationError

from zimage_server.core.errors import InvalidRequest, UnknownModel
from zimage_server.protocol.openai import ImageGenerationRequest
from zimage_server.protocol.segmind import (
    MAX_SEED,
    MODEL_SLUG,
    GenerationParams,
    Task,
    validate_params,
)

MODEL_NAMES = frozenset({MODEL_SLUG, "Tongyi-MAI/Z-Image-Turbo", "z-image"})
_SIZE = re.compile(r"^(\d{3,4})x(\d{3,4})$")


def parse_size(size: str) -> tuple[int, int]:
    if size.strip().lower() == "auto":
        return 1024, 1024
    match = _SIZE.match(size.strip().lower())
    width, height = (int(match.group(1)), int(match.group(2))) if match else (0, 0)
    if not (256 <= width <= 2048 and 256 <= height <= 2048):
        raise InvalidRequest(
            f"Invalid 'size': must be 'WIDTHxHEIGHT' with each side from 256 to 2048, or "
            f"'auto' (got {size[:40]!r}).",
            field="size",
        )
    return width, height


def to_params(data: object) -> tuple[ImageGenerationRequest, list[GenerationParams]]:
    """Validate an OpenAI body; return it and one ``GenerationParams`` per image (seeds
    ``seed, seed+1, ...`` so that ``n`` images differ and each can be re-made alone)."""
    try:
        request = ImageGenerationRequest.model_validate(data)
    except ValidationError as exc:
        error = exc.errors()[0]
        field = str(error["loc"][0]) if error["loc"] else "body"
        if field == "loras" and isinstance(data, dict):
            validate_params({"prompt": "-", "loras": data.get("loras")})  # the same message
        if field == "size" and isinstance(data, dict):
            parse_size(str(data.get("size")))  # raises with the readable message
        raise InvalidRequest(f"Invalid '{field}': {error['msg']}.", field=field) from None
    if request.model is not None and request.model not in MODEL_NAMES:
        raise UnknownModel(f"The model '{request.model[:80]}' does not exist; use '{MODEL_SLUG}'.")
    width, height = parse_size(request.size)
    quality = 90 if request.output_compression is None else max(1, request.output_compression)
    base = {
        "prompt": request.prompt,
        "steps": request.num_inference_steps,
        "guidance_scale": request.guidance_scale,
        "width": width,
        "height": height,
        "image_format": request.output_format,
        "quality": quality,
        "preview": request.partial_images > 0,  # previews go only to event streams
        "loras": [entry.model_dump() for entry in request.loras],
    }
    seeds = [-1] * request.n
    if request.seed is not None and request.seed >= 0:
        seeds = [min(request.seed + i, MAX_SEED) for i in range(request.n)]
    return request, [validate_params({**base, "seed": seed}) for seed in seeds]


EDIT_FIELDS = (
    "prompt",
    "model",
    "n",
    "size",
    "response_format",
    "output_format",
    "output_compression",
    "seed",
    "num_inference_steps",
    "guidance_scale",
)


def to_edit_params(
    fields: dict[str, str], task: Task
) -> tuple[ImageGenerationRequest, list[GenerationParams]]:
    """``POST /v1/images/edits``'s form fields (all strings) as the generation fields plus
    ``strength`` (our extension); the task is the caller's, from the files it sent."""
    if fields.get("stream", "").strip().lower() in ("true", "1"):
        raise InvalidRequest("Invalid 'stream': edits are not streamed here.", field="stream")
    data: dict[str, object] = {k: v for k, v in fields.items() if k in EDIT_FIELDS}
    request, batch = to_params(data)
    strength = validate_params({"prompt": "-", "strength": fields.get("strength")}).strength
    update = {"task": task, "strength": strength}
    return request, [params.model_copy(update=update) for params in batch]
