"""Segmind's wire format: the v1 request and its 200 body, and the v2 async-job bodies.

The request bodies are validated here, with our messages: every 400 names the field and
its allowed values, derived from the same ``Field`` constraints that the OpenAPI schema
shows, so the two can never disagree.
"""

from __future__ import annotations

import functools
import json
import sys
from typing import Annotated, Any, Literal

import pydantic_core
from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, ValidationError, field_validator
from pydantic.json_schema import SkipJsonSchema

from zimage_server.core.denoise import steps_run
from zimage_server.core.errors import InvalidRequest

MAX_SEED = 2**63 - 1
MAX_JSON_DEPTH = 200  # pydantic_core's recursion limit
_JSON_LIMITS = {
    "recursion limit": f" (objects and arrays may nest at most {MAX_JSON_DEPTH} levels)",
    "number out of range": f" (integers may have at most {sys.get_int_max_str_digits()} digits)",
    "hex escape": " (escapes from \\ud800 to \\udfff must form UTF-16 surrogate pairs)",
}
MODEL_SLUG = "z-image-turbo"
Task = Literal["text-to-image", "img2img", "inpaint", "controlnet"]
# Each task's slug, beside the text-to-image one (Segmind names tasks this way).
TASK_SLUGS: dict[str, Task] = {
    MODEL_SLUG: "text-to-image",
    f"{MODEL_SLUG}-img2img": "img2img",
    f"{MODEL_SLUG}-inpaint": "inpaint",
    f"{MODEL_SLUG}-controlnet": "controlnet",
}
DEFAULT_STRENGTH: dict[Task, float] = {
    "text-to-image": 1.0,
    "img2img": 0.6,
    "inpaint": 1.0,
    "controlnet": 1.0,  # the ControlNet pipelines start from noise
}
ControlType = Literal["none", "canny"]
MAX_IMAGE_FIELD_CHARS = 64 * 2**20  # the server's own byte limit is checked after decoding
DEFAULT_PREVIEW_SIZE = 256
JobState = Literal["QUEUED", "PROCESSING", "COMPLETED", "FAILED", "CANCELLED"]


def no_bool(value: Any) -> Any:
    # JSON true/false are not numbers; pydantic's lax mode would take them as 1/0.
    if isinstance(value, bool):
        raise ValueError("booleans are not numbers")
    return value


def _format_alias(value: Any) -> Any:
    if isinstance(value, str):
        value = value.strip().lower()
        return "jpeg" if value == "jpg" else value
    return value


Int = Annotated[int, BeforeValidator(no_bool)]
Number = Annotated[float, BeforeValidator(no_bool)]
ImageFormat = Annotated[Literal["jpeg", "png", "webp"], BeforeValidator(_format_alias)]


# -- requests ----------------------------------------------------------------------------
MAX_LORA_ENTRIES = 8  # the schema's cap; the server's own (ZIMAGE_MAX_LORAS) is checked after
LORA_MAX_SCALE = 4.0


class LoraEntry(BaseModel):
    """One LoRA adapter of a request, applied to the transformer at ``scale``."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    path: str = Field(
        min_length=1,
        max_length=512,
        description="An installed adapter's name (see GET /v1/loras), a Hugging Face repo id "
        "in the server's cache, or an HTTPS URL where the server allows them.",
    )
    scale: Number = Field(1.0, ge=0, le=LORA_MAX_SCALE, description="Strength; 0 = off.")
    weight_name: str | None = Field(
        None, max_length=256, description="The .safetensors file inside a folder or repo."
    )


class GenerationParams(BaseModel):
    """Body of ``POST /v1/z-image-turbo``. Unknown fields are ignored, as Segmind does."""

    model_config = ConfigDict(extra="ignore", frozen=True)

    prompt: str = Field(
        description="Text prompt describing the desired image (any language). Prompts "
        "longer than the model's 512-token window are truncated, not rejected.",
        min_length=1,
    )
    steps: Int = Field(8, ge=1, le=75, description="Number of inference steps.")
    guidance_scale: Number = Field(
        1.0,
        ge=0,
        le=15,
        description="Classifier-free guidance scale. 1 (or less) means no guidance: one "
        "transformer pass per step. Above 1, guidance runs with diffusers scale g - 1.",
    )
    seed: Int = Field(-1, ge=-1, le=MAX_SEED, description="Random seed; -1 picks one.")
    height: Int = Field(1024, ge=256, le=2048, description="Output height in pixels.")
    width: Int = Field(1024, ge=256, le=2048, description="Output width in pixels.")
    image_format: ImageFormat = Field("webp", description="Output image format.")
    quality: Int = Field(90, ge=1, le=100, description="JPEG/WebP quality (PNG is lossless).")
    base_64: bool = Field(False, description="Return the image as base64 instead of a URL.")
    loras: tuple[LoraEntry, ...] = Field(
        (),
        max_length=MAX_LORA_ENTRIES,
        description="LoRA adapters for this image (at most ZIMAGE_MAX_LORAS, default 3).",
    )
    preview: bool = Field(
        False, description="Event streams carry a small WebP preview of every step (256 px)."
    )
    preview_size: Int = Field(
        0, ge=0, le=1024, description="Longer side of step previews in pixels; >0 turns them on."
    )

    image: str | None = Field(
        None,
        max_length=MAX_IMAGE_FIELD_CHARS,
        description="Input image (img2img and inpaint slugs; with `mask_image`, ControlNet "
        "inpainting): an http(s) URL, a data URI or raw base64 of a PNG, JPEG or WebP. "
        "Without width and height, the output has its size.",
    )
    mask_image: str | None = Field(
        None,
        max_length=MAX_IMAGE_FIELD_CHARS,
        description="Inpainting mask, the input image's size: white is repainted, black kept.",
    )
    strength: Number | None = Field(
        None,
        ge=0,
        le=1,
        description="How far to move from the input image: 1 ignores it. Default 0.6 for "
        "img2img, 1 for inpaint; steps x strength steps run (at least one). Not for "
        "ControlNet.",
    )
    control_image: str | None = Field(
        None,
        max_length=MAX_IMAGE_FIELD_CHARS,
        description="ControlNet slug: the control image (edges, depth, pose...; or a photo "
        "with `control_type: canny`), as `image` takes it. Without width and height, the "
        "output has its size.",
    )
    controlnet_conditioning_scale: Number = Field(
        0.75, ge=0, le=2, description="How strongly the control image steers; 0 ignores it."
    )
    control_type: ControlType = Field(
        "none",
        description="Pre-processing of `control_image`: none (use it as is) or canny (its "
        "Canny edges, from an ordinary photo).",
    )
    # Set from the slug by the service, never read from a body; kept in v2's stored params.
    task: SkipJsonSchema[Task] = "text-to-image"

    @property
    def effective_strength(self) -> float:
        if self.strength is None or self.task == "text-to-image":
            return DEFAULT_STRENGTH[self.task]
        return self.strength

    @property
    def steps_run(self) -> int:
        """The denoising steps that run: all of them for text-to-image; for an input image,
        those after the strength's start, as diffusers rounds them."""
        return steps_run(self.steps, self.effective_strength)

    @property
    def preview_pixels(self) -> int:
        """The previews' longer side; 0 when the request did not ask for previews."""
        return self.preview_size or (DEFAULT_PREVIEW_SIZE if self.preview else 0)

    @field_validator("prompt")
    @classmethod
    def _not_blank(cls, value: str) -> str:
        if not value.strip():
            raise ValueError("blank prompt")
        return value


class SubmitRequest(GenerationParams):
    """Body of ``POST /v2/z-image-turbo``: the v1 body plus an optional webhook."""

    webhook_url: str | None = Field(
        None, description="Called with a signed POST when the request finishes."
    )

    def generation_params(self) -> GenerationParams:
        return GenerationParams(**self.model_dump(exclude={"webhook_url"}))


@functools.cache
def _properties() -> dict[str, dict[str, Any]]:
    properties: dict[str, dict[str, Any]] = GenerationParams.model_json_schema()["properties"]
    return properties


def allowed_values(name: str) -> str:
    """Describe a field's allowed values from its schema, e.g. 'an integer from 1 to 75'."""
    schema = _properties()[name]
    schema = next((s for s in schema.get("anyOf", []) if s.get("type") != "null"), schema)
    if "enum" in schema:
        return "one of " + ", ".join(f"'{v}'" for v in schema["enum"])
    kind = {"integer": "an integer", "number": "a number", "boolean": "true or false"}
    if schema.get("type") == "string":
        return "a non-empty string"
    text = kind.get(schema.get("type", ""), "a value")
    if "minimum" in schema and "maximum" in schema:
        text += f" from {_num(schema['minimum'])} to {_num(schema['maximum'])}"
    return text


def _num(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else str(value)


def parse_json(body: bytes) -> Any:
    """A raw body as JSON, or the ``InvalidRequest`` that says what is wrong with it.

    pydantic's parser (not ``json.loads``) because it refuses, with a message and not a
    ``RecursionError`` or an unencodable string later, what no client means to send: nesting
    past ``MAX_JSON_DEPTH``, integers past Python's digit limit, NaN, and lone UTF-16
    surrogates (``"\\ud800"``), which no response, log line or database could encode.
    Its messages name a position, never the offending text.
    """
    if not body.strip():
        raise InvalidRequest(
            'The request body is empty: send a JSON object such as {"prompt": "a red fox"}.'
        )
    try:
        return pydantic_core.from_json(body, allow_inf_nan=False)
    except ValueError as exc:
        hint = next((text for known, text in _JSON_LIMITS.items() if known in str(exc)), "")
        raise InvalidRequest(f"The request body is not valid JSON: {exc}{hint}.") from None


def json_value(body: object) -> Any:
    """What a route received: raw bytes (a body not sent as JSON) are parsed here."""
    return parse_json(body) if isinstance(body, bytes) else body


def parse_params(body: bytes) -> GenerationParams:
    """Parse and validate a raw JSON body; raise ``InvalidRequest`` naming the field."""
    return validate_params(parse_json(body))


def validate_params(data: Any) -> GenerationParams:
    if not isinstance(data, dict):
        raise InvalidRequest("The request body must be a JSON object with at least 'prompt'.")
    try:
        return GenerationParams.model_validate(data)
    except ValidationError as exc:
        raise _invalid(exc, data) from None


def validate_submit(data: Any) -> SubmitRequest:
    """The v2 body: the v1 checks first, then ``webhook_url`` (checked further, for
    reachability, by the job runner's webhook policy)."""
    return with_webhook(validate_params(data), data)


def with_webhook(params: GenerationParams, data: dict[str, Any]) -> SubmitRequest:
    url = data.get("webhook_url")
    if url is not None and not isinstance(url, str):
        raise InvalidRequest("Invalid 'webhook_url': must be an http(s) URL.", field="webhook_url")
    return SubmitRequest(**params.model_dump(), webhook_url=url or None)


def _invalid(exc: ValidationError, data: dict[str, Any]) -> InvalidRequest:
    error = exc.errors()[0]
    field = str(error["loc"][0]) if error["loc"] else "body"
    if field == "loras":
        return _invalid_lora(error)
    allowed = allowed_values(field) if field in GenerationParams.model_fields else "valid"
    if error["type"] == "missing":
        return InvalidRequest(
            f"Missing required field '{field}': it must be {allowed}.", field=field
        )
    got = json.dumps(data.get(field), ensure_ascii=False)
    if len(got) > 60:
        got = got[:57] + "..."
    return InvalidRequest(f"Invalid '{field}': must be {allowed} (got {got}).", field=field)


def _invalid_lora(error: Any) -> InvalidRequest:
    """``loras[1].scale`` and what it takes: the nested place, not just 'loras'."""
    place = "loras" + "".join(
        f"[{part}]" if isinstance(part, int) else f".{part}" for part in error["loc"][1:]
    )
    allowed = {
        "scale": f"a number from 0 to {_num(LORA_MAX_SCALE)}",
        "path": "an adapter name, repo id or URL (1 to 512 characters)",
        "weight_name": "a file name (at most 256 characters)",
    }.get(str(error["loc"][-1]), LORA_SHAPE)
    if error["type"] == "missing":
        return InvalidRequest(f"Missing '{place}': it must be {allowed}.", field="loras")
    if error["type"] == "extra_forbidden":
        return InvalidRequest(
            f"Unknown field '{place}': each of 'loras' is {LORA_SHAPE}.", field="loras"
        )
    got = json.dumps(error.get("input"), ensure_ascii=False)
    got = got[:57] + "..." if len(got) > 60 else got
    return InvalidRequest(f"Invalid '{place}': must be {allowed} (got {got}).", field="loras")


LORA_SHAPE = (
    f'a list of at most {MAX_LORA_ENTRIES} objects {{"path": name, "scale": 0..'
    f'{_num(LORA_MAX_SCALE)}, "weight_name": optional}}'
)


# -- responses ---------------------------------------------------------------------------
class ImageResponse(BaseModel):
    """A v1 200 in JSON: the image (its URL, or base64 without a ``data:`` prefix) and how
    it was made."""

    image: str = Field(
        description="Absolute URL of the stored image, or its base64 when `base_64` is true."
    )
    seed: int = Field(description="The seed actually used (also in `X-Seed`).")
    width: int
    height: int
    image_format: Literal["jpeg", "png", "webp"]
    quality: int
    steps: int
    guidance_scale: float
    generation_time: float = Field(description="Seconds from admission to encoded image.")
    timings: dict[str, float] = Field(description="Seconds per stage.")
    transformer_passes: int
    prompt_tokens: int


class LoraInfo(BaseModel):
    name: str = Field(description="What a request's `loras[].path` names it by.")
    size_bytes: int


class LoraList(BaseModel):
    """``GET /v1/loras``: the adapters installed on this server, and the limits."""

    loras: list[LoraInfo]
    max_loras: int = Field(description="Entries a request may have (0: LoRAs are off).")
    max_scale: float
    max_rank: int
    urls_allowed: bool


class SubmittedJob(BaseModel):
    """The 202 of ``POST /v2/{model}``: where to poll, fetch and cancel (absolute URLs)."""

    request_id: str
    status: JobState
    status_url: str
    response_url: str
    cancel_url: str


class JobProgress(BaseModel):
    step: int
    total: int


class JobStatusBody(BaseModel):
    """``GET /v2/requests/{id}/status`` (a FAILED one is served with HTTP 422, as Segmind
    does). ``queue_position``, ``progress`` and ``error`` appear only when they apply."""

    request_id: str
    status: JobState
    seed: int
    queue_position: int | None = Field(None, description="1 = next; only while QUEUED.")
    progress: JobProgress | None = Field(None, description="Only while PROCESSING.")
    error: str | None = Field(None, description="Only when FAILED or CANCELLED.")
    created_at: str | None
    finished_at: str | None


class JobListItem(JobStatusBody):
    status_url: str
    response_url: str
    cancel_url: str


class JobList(BaseModel):
    """``GET /v2/requests``: the key's recent requests, newest first."""

    requests: list[JobListItem]


class JobMetrics(BaseModel):
    model_config = ConfigDict(extra="allow")

    inference_time: float
    queue_time: float
    timings: dict[str, float]
    credits: str


class JobResult(BaseModel):
    """``GET /v2/requests/{id}`` and the webhook payload (a FAILED one is served with HTTP
    422). ``output`` is the image URL, or base64 when the request asked for it."""

    request_id: str
    status: JobState
    output: str | None
    seed: int
    metrics: JobMetrics | None
    error: str | None = Field(None, description="Only when FAILED or CANCELLED.")
