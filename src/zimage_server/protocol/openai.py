"""OpenAI's images API as we serve it: ``POST /v1/images/generations`` and ``GET /v1/models``.

The official ``openai`` client sends these fields; ``seed``, ``num_inference_steps``,
``guidance_scale`` and ``loras`` are our extensions (pass them with ``extra_body``).
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field

from zimage_server.protocol.segmind import MAX_LORA_ENTRIES, Int, LoraEntry, Number, no_bool

JS_SAFE_MAX = 2**53 - 1  # our extension: seeds that survive a JSON round trip in any client
_SIDE = r"(?:25[6-9]|2[6-9]\d|[3-9]\d\d|1\d{3}|20[0-3]\d|204[0-8])"
SIZE_PATTERN = rf"^(?:auto|{_SIDE}x{_SIDE})$"


def _lower(value: object) -> object:
    return value.strip().lower() if isinstance(value, str) else value


class ImageGenerationRequest(BaseModel):
    """Body of ``POST /v1/images/generations``. Unknown fields are ignored."""

    # A stream carries one image: the schema says so too, so generated clients and
    # fuzzers know `stream: true` with `n` > 1 is refused (400 naming `n`).
    model_config = ConfigDict(
        extra="ignore",
        json_schema_extra={
            "if": {"properties": {"stream": {"const": True}}, "required": ["stream"]},
            "then": {"properties": {"n": {"const": 1}}},
        },
    )

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
    stream: bool = Field(False, description="Server-sent events, ending with the image.")
    partial_images: Int = Field(
        0, ge=0, le=3, description="With `stream`: >0 sends a preview of every step."
    )
    loras: tuple[LoraEntry, ...] = Field((), max_length=MAX_LORA_ENTRIES)


class ImageObject(BaseModel):
    """One image: ``url`` or ``b64_json`` (whichever ``response_format`` asked for)."""

    url: str | None = None
    b64_json: str | None = None
    revised_prompt: str
    seed: int = Field(description="Our extension: the seed this image was made with.")


class ImagesResponse(BaseModel):
    created: int
    data: list[ImageObject]
    output_format: Literal["png", "jpeg", "webp"]
    size: str
    quality: str


class Model(BaseModel):
    id: str
    object: Literal["model"]
    created: int
    owned_by: str


class ModelList(BaseModel):
    object: Literal["list"]
    data: list[Model]
