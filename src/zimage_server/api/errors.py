"""The single place where errors become HTTP responses.

Segmind's envelope is ``{"error": "<message>"}``. Unknown exceptions are logged with
their traceback and answered with a generic 500 that names only the request id.
"""

from __future__ import annotations

import logging
import re
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel
from starlette.exceptions import HTTPException as StarletteHTTPException

from zimage_server.core import errors as e

log = logging.getLogger("zimage.api")

STATUS: dict[type[e.ZImageError], int] = {
    e.InvalidRequest: 400,
    e.Unauthenticated: 401,
    e.Forbidden: 403,
    e.NotFound: 404,
    e.InsufficientCredits: 406,
    e.Cancelled: 409,
    e.Conflict: 409,
    e.Overloaded: 429,
    e.GenerationFailed: 500,
    e.WorkerDied: 502,
    e.NotReady: 503,
    e.DeadlineExceeded: 504,
    e.InsufficientStorage: 507,
}


def status_for(exc: e.ZImageError) -> int:
    for cls in type(exc).__mro__:
        if cls in STATUS:
            return STATUS[cls]
    return 500


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


def error_response(
    status: int,
    message: str,
    headers: dict[str, str] | None = None,
    request: Request | None = None,
    param: str | None = None,
) -> JSONResponse:
    """Segmind's ``{"error": msg}``, or OpenAI's envelope on the OpenAI-compatible routes."""
    if request is not None and request.url.path.startswith(OPENAI_PREFIXES):
        kind = OPENAI_TYPES.get(status, "server_error" if status >= 500 else "api_error")
        body: dict[str, object] = {
            "error": {"message": message, "type": kind, "param": param, "code": kind}
        }
        return JSONResponse(body, status_code=status, headers=headers)
    body = {"error": message}
    if request is not None:  # so a client can quote it in a support ticket
        body["request_id"] = request.scope.get("state", {}).get("request_id", "")
    return JSONResponse(body, status_code=status, headers=headers)


async def _app_error(request: Request, exc: Exception) -> JSONResponse:
    if not isinstance(exc, e.ZImageError):  # pragma: no cover - registered for this type
        raise exc
    if not exc.public:
        return await _unexpected(request, exc)
    headers = dict(getattr(exc, "headers", {}))
    retry_after = getattr(exc, "retry_after", None)
    if retry_after is not None:
        headers["Retry-After"] = str(retry_after)
    field = getattr(exc, "field", None)
    return error_response(status_for(exc), exc.message, headers, request, field)


async def _http_error(request: Request, exc: Exception) -> JSONResponse:
    if not isinstance(exc, StarletteHTTPException):  # pragma: no cover - registered for this type
        raise exc
    headers = dict(exc.headers or {})
    message = str(exc.detail)
    if exc.status_code == 405:
        allowed = allowed_methods(request)
        headers["Allow"] = ", ".join(allowed)
        message = (
            f"Method {request.method} is not allowed on {request.url.path}; "
            f"use {' or '.join(allowed)}."
        )
    elif exc.status_code == 404:
        message = f"No such endpoint: {request.method} {request.url.path}."
    return error_response(exc.status_code, message, headers, request)


async def _validation_error(request: Request, exc: Exception) -> JSONResponse:
    if not isinstance(exc, RequestValidationError):  # pragma: no cover - registered for this type
        raise exc
    first = exc.errors()[0]
    where = ".".join(str(part) for part in first.get("loc", ()))
    message = f"Invalid '{where}': {first.get('msg', 'invalid value')}."
    return error_response(400, message, None, request, where)


async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
    request_id = request.scope.get("state", {}).get("request_id", "-")
    log.error("unhandled error in request %s", request_id, exc_info=exc)
    return error_response(500, f"Internal server error (request id {request_id}).", None, request)


def allowed_methods(request: Request) -> list[str]:
    """Every method that some route accepts on this path, from the OpenAPI paths (Starlette
    names only one route's, and FastAPI's included routers hide theirs)."""
    methods: set[str] = set()
    for template, operations in request.app.openapi()["paths"].items():
        pattern = "^" + re.sub(r"\{[^/}]+\}", "[^/]+", template) + "$"
        if re.match(pattern, request.url.path):
            methods |= {method.upper() for method in operations}
    if "GET" in methods:
        methods.add("HEAD")
    return sorted(methods)


class ErrorBody(BaseModel):
    """``{"error": "message"}``; on the OpenAI routes ``{"error": {message, type, ...}}``."""

    error: str | dict[str, Any]


ERROR_RESPONSES: dict[int | str, dict[str, Any]] = {
    code: {"model": ErrorBody, "description": text}
    for code, text in [
        (400, "Invalid parameter or body: the message names the field and allowed values"),
        (401, "Missing or unknown API key"),
        (403, "Key disabled or without the scope"),
        (404, "Unknown model, path, request or output (or expired)"),
        (405, "Method not allowed"),
        (406, "Insufficient credits"),
        (409, "Conflict (cancelled, already finished, Idempotency-Key reuse)"),
        (413, "Request body too large"),
        (429, "Rate limited or queue full; see Retry-After"),
        (500, "Generation failed or internal error"),
        (502, "The worker died during the request"),
        (503, "Not ready, shutting down or database unavailable; see Retry-After"),
        (504, "Deadline exceeded"),
        (507, "Output disk full"),
    ]
}


def install_error_handlers(app: FastAPI) -> None:
    app.add_exception_handler(e.ZImageError, _app_error)
    app.add_exception_handler(StarletteHTTPException, _http_error)
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_exception_handler(Exception, _unexpected)
