"""The single place where errors become HTTP responses.

``render_error`` answers any ``ZImageError`` in the envelope of the path's API flavour
(Segmind's ``{"error", "request_id"}``, or OpenAI's ``{"error": {message, type, param,
code}}`` under ``/v1/images`` and ``/v1/models``), with its headers and ``Retry-After``.
The exception handlers and the middleware all answer through it. Unknown exceptions are
logged with their traceback and answered with a generic 500 that names only the request id.
"""

from __future__ import annotations

import logging
from typing import Any

from fastapi import Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import Response
from starlette.applications import Starlette
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.routing import Match
from starlette.types import Scope

from zimage_server.api.responses import model_response
from zimage_server.core import errors as e
from zimage_server.protocol.errors import Flavour, OpenAIError, SegmindError, error_body

log = logging.getLogger("zimage.api")


def request_id_of(scope: Scope) -> str:
    request_id: str = scope.get("state", {}).get("request_id", "")
    return request_id


def render_error(exc: e.ZImageError, scope: Scope) -> Response:
    """``exc`` as the response a client of this path expects (``public`` messages only)."""
    request_id = request_id_of(scope)
    status, message = exc.status, exc.message
    if not exc.public:
        status, message = 500, f"Internal server error (request id {request_id or '-'})."
    message = message.encode("utf-8", "replace").decode()  # a message never fails to encode
    headers = dict(exc.headers)
    if exc.retry_after is not None:
        headers["Retry-After"] = str(exc.retry_after)
    body = error_body(
        Flavour.of(scope["path"]), status, message, field=exc.field, request_id=request_id
    )
    return model_response(body, status, headers)


async def _app_error(request: Request, exc: Exception) -> Response:
    if not isinstance(exc, e.ZImageError):  # pragma: no cover - registered for this type
        raise exc
    if not exc.public:
        return await _unexpected(request, exc)
    return render_error(exc, request.scope)


_HTTP_ERRORS: dict[int, type[e.ZImageError]] = {
    400: e.InvalidRequest,
    404: e.NotFound,
    405: e.MethodNotAllowed,
    408: e.RequestTimeout,
    413: e.PayloadTooLarge,
}


async def _http_error(request: Request, exc: Exception) -> Response:
    """Starlette's and FastAPI's own ``HTTPException`` (unknown path, wrong method, ...)."""
    if not isinstance(exc, StarletteHTTPException):  # pragma: no cover - registered for this type
        raise exc
    headers = dict(exc.headers or {})
    message = str(exc.detail)
    if exc.status_code == 405:
        allowed = allowed_methods(request.app, request.scope)
        headers["Allow"] = ", ".join(allowed)
        message = (
            f"Method {request.method} is not allowed on {request.url.path}; "
            f"use {' or '.join(allowed)}."
        )
    elif exc.status_code == 404:
        message = f"No such endpoint: {request.method} {request.url.path}."
    cls = _HTTP_ERRORS.get(exc.status_code)
    if cls is None:
        return await _unexpected(request, exc)
    return render_error(cls(message, headers=headers), request.scope)


async def _validation_error(request: Request, exc: Exception) -> Response:
    """FastAPI's validation of typed parameters (admin bodies, query strings)."""
    if not isinstance(exc, RequestValidationError):  # pragma: no cover - registered for this type
        raise exc
    first = exc.errors()[0]
    where = ".".join(str(part) for part in first.get("loc", ()))
    message = f"Invalid '{where}': {first.get('msg', 'invalid value')}."
    return render_error(e.InvalidRequest(message, field=where), request.scope)


async def _unexpected(request: Request, exc: Exception) -> Response:
    log.error("unhandled error in request %s", request_id_of(request.scope) or "-", exc_info=exc)
    return render_error(e.ZImageError("unexpected"), request.scope)


_METHODS = ("DELETE", "GET", "PATCH", "POST", "PUT")


def allowed_methods(app: Starlette, scope: Scope) -> list[str]:
    """Every method that some route accepts on this path (Starlette's 405 names only one
    route's), asking each route as the router does."""
    methods = {
        method
        for method in _METHODS
        for route in app.router.routes
        if route.matches({**scope, "method": method})[0] is Match.FULL
    }
    if "GET" in methods:
        methods.add("HEAD")
    return sorted(methods)


# -- OpenAPI -------------------------------------------------------------------------------
EXAMPLE_REQUEST_ID = "9f1c2a7be4d05a3c6e8b1f20"
_DESCRIPTIONS = {
    400: "Invalid parameter or body: the message names the field and its allowed values",
    401: "Missing or unknown API key",
    403: "Key disabled, or without the scope",
    404: "Not found",
    406: "Insufficient credits",
    409: "Conflict",
    429: "Rate limited or queue full: retry after `Retry-After` seconds",
    500: "Generation failed",
    502: "The worker died during the request",
    503: "Not ready or database unavailable: retry after `Retry-After` seconds",
    504: "Deadline exceeded",
    507: "Output disk full",
}
_RETRY_AFTER = {
    "Retry-After": {"description": "Seconds to wait before retrying", "schema": {"type": "integer"}}
}


class Example:
    """Errors the routes really send, as they read (the messages come from the services)."""

    bad_steps = e.InvalidRequest(
        "Invalid 'steps': must be an integer from 1 to 75 (got 0).", field="steps"
    )
    bad_size = e.InvalidRequest(
        "Invalid 'size': must be 'WIDTHxHEIGHT' with each side from 256 to 2048, or 'auto' "
        "(got '100x100').",
        field="size",
    )
    no_key = e.Unauthenticated(
        "Missing API key: send it in the x-api-key header or as Authorization: Bearer."
    )
    disabled = e.Forbidden("API key 1a2b3c4d is disabled.")
    unknown_model = e.UnknownModel(
        "Unknown model 'stable-diffusion-xl'. This server serves 'z-image-turbo'."
    )
    expired_output = e.OutputNotFound(
        "Output 'Xy3kQ9w2LmN8pR4tV6zA1bC5dE7fG0hJ.webp' has expired (outputs are kept for 3600 s)."
    )
    bad_admin_body = e.InvalidRequest(
        "Invalid 'body.name': String should have at least 1 character.", field="body.name"
    )
    no_admin_token = e.Unauthenticated("Missing or invalid admin token.")
    unknown_key = e.NotFound("No API key with prefix '1a2b3c4d'.")
    unknown_request = e.NotFound("No request with id '5d41402abc4b2a76b9719d911017c592'.")
    credits = e.InsufficientCredits(
        "Insufficient credits: this image costs 0.01 credits and the key's balance is 0."
    )
    idempotency = e.Conflict(
        "Idempotency-Key 'order-42' was already used for a different request body (request "
        "5d41402abc4b2a76b9719d911017c592). Use a new key for a new request."
    )
    finished = e.Conflict(
        "Request 5d41402abc4b2a76b9719d911017c592 is already COMPLETED; it cannot be cancelled."
    )
    rate_limited = e.RateLimited(
        "Rate limit exceeded for key 1a2b3c4d: 60 per 1 minute. Retry after 12 s.",
        retry_after=12,
    )
    queue_full = e.Overloaded(
        "The queue is full (64 requests waiting or running). Retry later.", retry_after=3
    )
    failed = e.GenerationFailed("Out of accelerator memory for this batch; try a smaller size.")
    worker_died = e.WorkerDied(
        "The worker process died while rendering this request (exit code -9); it has been "
        "restarted. Retry the request."
    )
    not_ready = e.NotReady("The model is still loading.", retry_after=5)
    deadline = e.DeadlineExceeded("The request did not finish within its 300s deadline.")
    disk_full = e.InsufficientStorage("The output disk is full; nothing was charged.")


# What any route that renders can answer, whatever its API flavour.
RENDER_FAILURES = (
    Example.no_key,
    Example.disabled,
    Example.credits,
    Example.rate_limited,
    Example.queue_full,
    Example.failed,
    Example.worker_died,
    Example.not_ready,
    Example.deadline,
    Example.disk_full,
)


def error_docs(flavour: Flavour, *examples: e.ZImageError) -> dict[int | str, dict[str, Any]]:
    """OpenAPI ``responses`` for a route: each status it sends, with examples rendered by
    the same function as the real errors; ``default`` covers the rest (405, 413, an
    internal 500, 503 while shutting down), in the same envelope."""
    model = OpenAIError if flavour is Flavour.OPENAI else SegmindError
    by_status: dict[int, list[e.ZImageError]] = {}
    for exc in examples:
        by_status.setdefault(exc.status, []).append(exc)
    docs: dict[int | str, dict[str, Any]] = {}
    for status, errors in sorted(by_status.items()):
        values = {
            type(exc).__name__: {
                "value": error_body(
                    flavour, status, exc.message, field=exc.field, request_id=EXAMPLE_REQUEST_ID
                ).model_dump(mode="json")
            }
            for exc in errors
        }
        docs[status] = {
            "model": model,
            "description": _DESCRIPTIONS[status],
            "content": {"application/json": {"examples": values}},
        }
        if any(exc.retry_after is not None for exc in errors):
            docs[status]["headers"] = _RETRY_AFTER
    docs["default"] = {"model": model, "description": "Any other error, in the same envelope"}
    return docs


def install_error_handlers(app: Starlette) -> None:
    app.add_exception_handler(e.ZImageError, _app_error)
    app.add_exception_handler(StarletteHTTPException, _http_error)
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_exception_handler(Exception, _unexpected)
