"""OpenAI's ``POST /v1/images/generations`` body, translated into our generation params.

The official ``openai`` client sends these fields; ``seed``, ``num_inference_steps`` and
``guidance_scale`` are our extensions (pass them with ``extra_body``).
"""

from __future__ import annotations

import re
from typing import Annotated, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, ValidationError

from zimage_server.core.errors import InvalidRequest, UnknownModel
from zimage_server.images.params import (
    MAX_SEED,
    MODEL_SLUG,
    GenerationParams,
    Int,
    Number,
    no_bool,
    validate_params,
)

JS_SAFE_MAX = 2**53 - 1  # our extension: seeds that survive a JSON round trip in any client
MODEL_NAMES = frozenset({MODEL_SLUG, "Tongyi-MAI/Z-Image-Turbo", "z-image"})
_SIZE = re.compile(r"^(\d{3,4})x(\d{3,4})$")
_SIDE = r"(?:25[6-9]|2[6-9]\d|[3-9]\d\d|1\d{3}|20[0-3]\d|204[0-8])"
SIZE_PATTERN = rf"^(?:auto|{_SIDE}x{_SIDE})$"


def _lower(value: object) -> object:
    return value.strip().lower() if isinstance(value, str) else value


class ImageGenerationRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")

    prompt: str = Field(min_length=1)
    model: str | None = None
    n: Int = Field(1, ge=1, le=4)
    size: str = Field(
        "auto",
        description="'WxH' with each side 256..2048, or 'auto' (1024x1024).",
        pattern=SIZE_PATTERN,
    )
    response_format: Annotated[Literal["b64_json", "url"], BeforeValidator(_lower)] = "b64_json"
    output_format: Annotated[Literal["png", "jpeg", "webp"], BeforeValidator(_lower)] = "png"
    # Bounds before the validator, or pydantic writes them as "ge"/"le" in the schema.
    output_compression: Annotated[int, Field(ge=0, le=100), BeforeValidator(no_bool)] | None = None
    seed: Annotated[int, Field(ge=-1, le=JS_SAFE_MAX), BeforeValidator(no_bool)] | None = None
    num_inference_steps: Int = Field(8, ge=1, le=75)
    guidance_scale: Number = Field(1.0, ge=0, le=15)


def parse_size(size: str) -> tuple[int, int]:
    if size.strip().lower() == "auto":
        return 1024, 1024
    match = _SIZE.match(size.strip().lower())
    width, height = (int(match.group(1)), int(match.group(2))) if match else (0, 0)
    if not (256 <= width <= 2048 and 256 <= height <= 2048):
        raise InvalidRequest(
            f"Invalid 'size': must be 'WIDTHxHEIGHT' with each side from 256 to 2048, or "
            f"'auto' (got {size[:40]!r}).",
            "size",
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
        if field == "size" and isinstance(data, dict):
            parse_size(str(data.get("size")))  # raises with the readable message
        raise InvalidRequest(f"Invalid '{field}': {error['msg']}.", field) from None
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
    }
    seeds = [-1] * request.n
    if request.seed is not None and request.seed >= 0:
        seeds = [min(request.seed + i, MAX_SEED) for i in range(request.n)]
    return request, [validate_params({**base, "seed": seed}) for seed in seeds]
