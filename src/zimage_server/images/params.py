"""The Segmind v1 request body, and the one place that turns bad input into clear errors.

Every 400 names the field and its allowed values, derived from the same ``Field``
constraints that the OpenAPI schema shows, so the two can never disagree.
"""

from __future__ import annotations

import json
from typing import Annotated, Any, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, ValidationError, field_validator

from zimage_server.core.errors import InvalidRequest

MAX_SEED = 2**63 - 1
MODEL_SLUG = "z-image-turbo"


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

    @field_validator("prompt")
    @classmethod
    def _not_blank(cls, value: str) -> str:
        if not value.strip():
            raise ValueError("blank prompt")
        return value


def allowed_values(name: str) -> str:
    """Describe a field's allowed values from its schema, e.g. 'an integer from 1 to 75'."""
    schema = GenerationParams.model_json_schema()["properties"][name]
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


def parse_params(body: bytes) -> GenerationParams:
    """Parse and validate a raw JSON body; raise ``InvalidRequest`` naming the field."""
    return validate_params(parse_json(body))


def parse_json(body: bytes) -> Any:
    if not body.strip():
        raise InvalidRequest(
            'The request body is empty: send a JSON object such as {"prompt": "a red fox"}.'
        )
    try:
        data = json.loads(body)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise InvalidRequest(f"The request body is not valid JSON: {exc}.") from None
    return data


def validate_params(data: Any) -> GenerationParams:
    if not isinstance(data, dict):
        raise InvalidRequest("The request body must be a JSON object with at least 'prompt'.")
    try:
        return GenerationParams.model_validate(data)
    except ValidationError as exc:
        raise _invalid(exc, data) from None


def _invalid(exc: ValidationError, data: dict[str, Any]) -> InvalidRequest:
    error = exc.errors()[0]
    field = str(error["loc"][0]) if error["loc"] else "body"
    allowed = allowed_values(field) if field in GenerationParams.model_fields else "valid"
    if error["type"] == "missing":
        return InvalidRequest(f"Missing required field '{field}': it must be {allowed}.", field)
    got = json.dumps(data.get(field), ensure_ascii=False)
    if len(got) > 60:
        got = got[:57] + "..."
    return InvalidRequest(f"Invalid '{field}': must be {allowed} (got {got}).", field)
