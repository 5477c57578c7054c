"""Error bodies: Segmind's ``{"error", "request_id"}`` and OpenAI's ``{"error": {...}}``.

``error_body`` is the one function that shapes an error for the wire; the API renders
every error through it (exception handlers and middleware alike), and the OpenAPI
examples are built with it too.
"""

from __future__ import annotations

from enum import Enum

from pydantic import BaseModel, Field

OPENAI_PREFIXES = ("/v1/images", "/v1/models")
OPENAI_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    406: "insufficient_quota",
    409: "conflict_error",
    429: "rate_limit_error",
}


class Flavour(Enum):
    """Whose error envelope a path answers in."""

    SEGMIND = "segmind"
    OPENAI = "openai"

    @classmethod
    def of(cls, path: str) -> Flavour:
        return cls.OPENAI if path.startswith(OPENAI_PREFIXES) else cls.SEGMIND


class SegmindError(BaseModel):
    error: str = Field(description="What went wrong; a 400 names the field and its allowed values.")
    request_id: str = Field(description="Also in `X-Request-ID`: quote it in a support ticket.")


class OpenAIErrorDetail(BaseModel):
    """``param`` and ``code`` are always sent (``null`` when they do not apply); the
    defaults only let the OpenAPI examples, where FastAPI drops nulls, parse."""

    message: str
    type: str
    param: str | None = None
    code: str | None = None


class OpenAIError(BaseModel):
    error: OpenAIErrorDetail


def openai_type(status: int) -> str:
    return OPENAI_TYPES.get(status, "server_error" if status >= 500 else "api_error")


def error_body(
    flavour: Flavour, status: int, message: str, *, field: str | None, request_id: str
) -> SegmindError | OpenAIError:
    if flavour is Flavour.OPENAI:
        kind = openai_type(status)
        return OpenAIError(
            error=OpenAIErrorDetail(message=message, type=kind, param=field, code=kind)
        )
    return SegmindError(error=message, request_id=request_id)
