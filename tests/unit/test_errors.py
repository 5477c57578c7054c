"""The error hierarchy and its one renderer: data survives pickling, the docstring tree is
the status table, and handlers and middleware answer in the path's envelope."""

from __future__ import annotations

import asyncio
import pickle
import re
from collections.abc import AsyncIterator, Iterator

import httpx
import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route
from starlette.types import Scope

from zimage_server.api.errors import install_error_handlers, render_error
from zimage_server.api.middleware import (
    BodyLimitMiddleware,
    Drain,
    DrainMiddleware,
    RequestIdMiddleware,
)
from zimage_server.core import errors as e
from zimage_server.protocol import OpenAIError, SegmindError
from zimage_server.telemetry import Metrics


def every_error() -> Iterator[type[e.ZImageError]]:
    yield e.ZImageError
    pending = [e.ZImageError]
    while pending:
        for cls in pending.pop().__subclasses__():
            yield cls
            pending.append(cls)


@pytest.mark.parametrize("cls", list(every_error()), ids=lambda cls: cls.__name__)
def test_every_error_pickles_with_its_data(cls: type[e.ZImageError]) -> None:
    error = cls("it broke", field="steps", retry_after=7, headers={"x-rate-limit-remaining": "0"})
    again = pickle.loads(pickle.dumps(error))  # noqa: S301 - our own bytes
    assert type(again) is cls and str(again) == str(error) == "it broke"
    assert (again.message, again.field, again.retry_after, again.headers) == (
        "it broke",
        "steps",
        7,
        {"x-rate-limit-remaining": "0"},
    )
    bare = pickle.loads(pickle.dumps(cls("plain")))  # noqa: S301 - our own bytes
    assert (bare.field, bare.retry_after, bare.headers) == (None, cls.default_retry_after, {})


def test_the_docstring_tree_is_the_status_table() -> None:
    rows = {"ZImageError": "500"}
    for line in (e.__doc__ or "").splitlines():
        match = re.search(r"[├└]── (\w+)\s+(\d{3})?", line)
        if match:
            rows[match.group(1)] = match.group(2)
    assert set(rows) == {cls.__name__ for cls in every_error()}
    for cls in every_error():
        assert str(cls.status) == (rows[cls.__name__] or str(cls.__base__.status)), cls  # type: ignore[attr-defined]


def scope(path: str, request_id: str = "req-1") -> Scope:
    return {"type": "http", "path": path, "state": {"request_id": request_id}, "headers": []}


def test_segmind_envelope_with_request_id_and_retry_after() -> None:
    error = e.RateLimited("Slow down.", retry_after=3, headers={"x-rate-limit-remaining": "0"})
    response = render_error(error, scope("/v1/z-image-turbo"))
    assert response.status_code == 429
    assert response.body == b'{"error":"Slow down.","request_id":"req-1"}'
    assert response.headers["retry-after"] == "3"
    assert response.headers["x-rate-limit-remaining"] == "0"
    assert response.headers["content-type"] == "application/json"
    SegmindError.model_validate_json(response.body)


def test_openai_envelope_names_the_param() -> None:
    error = e.InvalidRequest("Invalid 'size': ...", field="size")
    response = render_error(error, scope("/v1/images/generations"))
    body = OpenAIError.model_validate_json(response.body).error
    assert response.status_code == 400 and "retry-after" not in response.headers
    assert (body.message, body.type, body.param, body.code) == (
        "Invalid 'size': ...",
        "invalid_request_error",
        "size",
        "invalid_request_error",
    )
    not_ready = render_error(e.NotReady("Loading."), scope("/v1/models"))
    detail = OpenAIError.model_validate_json(not_ready.body).error
    assert not_ready.headers["retry-after"] == "5" and detail.type == "server_error"


def test_private_messages_are_never_shown() -> None:
    response = render_error(e.ZImageError("secret path /srv/x"), scope("/v2/requests", "r9"))
    assert response.status_code == 500
    assert SegmindError.model_validate_json(response.body) == SegmindError(
        error="Internal server error (request id r9).", request_id="r9"
    )


# -- middleware, on a tiny app ------------------------------------------------------------
LIMIT = 100


async def echo(request: Request) -> JSONResponse:
    return JSONResponse({"bytes": len(await request.body())})


def tiny_app(drain: Drain) -> RequestIdMiddleware:
    app = Starlette(
        routes=[
            Route(path, echo, methods=["POST"])
            for path in ("/v1/z-image-turbo", "/v1/images/generations", "/healthz")
        ]
    )
    install_error_handlers(app)
    limited = BodyLimitMiddleware(app, max_bytes=LIMIT, timeout_s=30)
    return RequestIdMiddleware(DrainMiddleware(limited, drain), Metrics())


def post(
    app: RequestIdMiddleware, path: str, content: bytes | AsyncIterator[bytes]
) -> httpx.Response:
    async def run() -> httpx.Response:
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
            return await client.post(path, content=content, headers={"x-request-id": "trace-1"})

    return asyncio.run(run())


async def chunks() -> AsyncIterator[bytes]:
    for _ in range(3):
        yield b"x" * 60  # no Content-Length: only counting while streaming catches it


@pytest.mark.parametrize("streamed", [False, True])
def test_413_comes_in_the_path_envelope_with_the_request_id(streamed: bool) -> None:
    app = tiny_app(Drain())
    body = chunks() if streamed else b"x" * (LIMIT + 1)
    openai = post(app, "/v1/images/generations", body)
    assert openai.status_code == 413 and openai.headers["x-request-id"] == "trace-1"
    assert OpenAIError.model_validate(openai.json()).error.message == (
        f"Request body too large: at most {LIMIT} bytes."
    )
    segmind = post(app, "/v1/z-image-turbo", chunks() if streamed else b"x" * (LIMIT + 1))
    assert segmind.status_code == 413
    assert segmind.json() == {
        "error": f"Request body too large: at most {LIMIT} bytes.",
        "request_id": "trace-1",
    }
    assert post(app, "/v1/z-image-turbo", b"x" * LIMIT).json() == {"bytes": LIMIT}


def test_draining_answers_503_with_retry_after_but_probes_pass() -> None:
    app = tiny_app(Drain(draining=True))
    r = post(app, "/v1/images/generations", b"{}")
    assert r.status_code == 503 and r.headers["retry-after"] == "5"
    assert r.headers["x-request-id"] == "trace-1"
    assert OpenAIError.model_validate(r.json()).error.type == "server_error"
    segmind = post(app, "/v1/z-image-turbo", b"{}")
    assert segmind.json()["request_id"] == "trace-1" and "shutting down" in segmind.json()["error"]
    assert post(app, "/healthz", b"").status_code == 200
