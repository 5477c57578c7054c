"""Request bodies that FastAPI documents from the protocol models and we validate.

FastAPI's own body validation would answer with its messages (and only for JSON content
types); ours name the field and its allowed values. So a route declares
``body: JsonBody[GenerationParams]``: the OpenAPI schema shows the model, FastAPI hands
the route the JSON value, and the route validates it with the protocol's functions.
``JsonRoute`` makes every JSON body go through the protocol's parser (415 for a body not
labelled as JSON); ``BodyRoute`` also gives an empty body the protocol's message.
"""

from __future__ import annotations

from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

from fastapi import Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.routing import APIRoute
from pydantic import BaseModel, GetCoreSchemaHandler, GetJsonSchemaHandler
from pydantic.json_schema import JsonSchemaValue
from pydantic_core import CoreSchema, core_schema
from starlette.exceptions import HTTPException

from zimage_server.core.errors import Forbidden, UnsupportedMediaType, ZImageError
from zimage_server.protocol.segmind import parse_json


@dataclass(frozen=True)
class DocumentedAs:
    """``Annotated`` metadata: accept any value, but document it as ``model``."""

    model: type[BaseModel]

    def __get_pydantic_core_schema__(
        self, _source: Any, _handler: GetCoreSchemaHandler
    ) -> CoreSchema:
        return core_schema.any_schema()

    def __get_pydantic_json_schema__(
        self, _schema: CoreSchema, handler: GetJsonSchemaHandler
    ) -> JsonSchemaValue:
        return handler(self.model.__pydantic_core_schema__)


class JsonRequest(Request):
    """A request whose JSON is parsed by the protocol's parser, with its limits and
    messages, wherever FastAPI asks for it."""

    async def json(self) -> Any:
        if not hasattr(self, "_parsed"):
            self._parsed = parse_json(await self.body())
        return self._parsed


class JsonRoute(APIRoute):
    """A route whose body is JSON: sent as JSON, and parsed by ``parse_json``.

    A body labelled as anything but JSON gets 415 before it is read: ``text/plain`` and
    form bodies are what a web page may post to another origin without asking (no CORS
    preflight), and a body without a ``Content-Type`` (a ``Blob``) too, so refusing them
    keeps other sites from driving a server that runs without keys.
    """

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handler = super().get_route_handler()
        takes_body = self.body_field is not None

        async def route_handler(request: Request) -> Response:
            if takes_body:
                require_json(request.headers.get("content-type"))
            json_request = JsonRequest(request.scope, request.receive)
            try:
                return await self.call_handler(handler, json_request)
            except HTTPException as exc:
                # FastAPI wraps what the body's parser raises; ours carries our message.
                if isinstance(exc.__cause__, ZImageError):
                    raise exc.__cause__ from None
                raise

        return route_handler

    async def call_handler(
        self, handler: Callable[[Request], Coroutine[Any, Any, Response]], request: Request
    ) -> Response:
        return await handler(request)


class BodyRoute(JsonRoute):
    """A route whose body is validated by the protocol: an empty body gets the protocol's
    message (FastAPI's would say that the field ``body`` is missing)."""

    async def call_handler(
        self, handler: Callable[[Request], Coroutine[Any, Any, Response]], request: Request
    ) -> Response:
        try:
            return await handler(request)
        except RequestValidationError as exc:
            if _body_level(exc):
                parse_json(await request.body())  # raises with our message
            raise


def require_json(content_type: str | None) -> None:
    """415 unless ``content_type`` is ``application/json`` or ``application/*+json``."""
    media = (content_type or "").split(";", 1)[0].strip().lower()
    kind, _, subtype = media.partition("/")
    if kind == "application" and (subtype == "json" or subtype.endswith("+json")):
        return
    shown = media[:60] or "none"
    raise UnsupportedMediaType(
        f"Unsupported Content-Type '{shown}': send the body as JSON with "
        "'Content-Type: application/json'.",
        field="Content-Type",
    )


def _body_level(exc: RequestValidationError) -> bool:
    first = exc.errors()[0]
    return tuple(first.get("loc", ()))[:1] == ("body",) and first.get("type") == "missing"


def refuse_cross_site(request: Request) -> None:
    """A form body needs no CORS preflight, so any web page could post one to a server
    on its visitor's machine (a keyless ``--tiny`` one renders for it): refuse a form a
    browser says came from another site. API clients send neither header."""
    site = request.headers.get("sec-fetch-site", "")
    origin = request.headers.get("origin")
    own = request.headers.get("host", "").lower()
    if site in ("cross-site", "same-site") or (
        origin is not None and urlsplit(origin).netloc.lower() != own
    ):
        raise Forbidden(
            "A form posted from another site's page is refused (Origin or Sec-Fetch-Site "
            "says so); send it from an API client, or from this server's own page.",
            field="Origin",
        )
