"""Request bodies that FastAPI documents from the protocol models and we validate.

FastAPI's own body validation would answer with its messages (and only for JSON content
types); ours name the field and its allowed values. So a route declares
``body: JsonBody[GenerationParams]``: the OpenAPI schema shows the model, FastAPI hands
the route the raw JSON value (or the raw bytes of a body not labelled as JSON), and the
route validates it with the protocol's functions. ``BodyRoute`` turns the errors FastAPI
still raises itself (empty body, invalid JSON) into the same ``InvalidRequest`` that our
parser raises for them.
"""

from __future__ import annotations

from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from typing import Any

from fastapi import Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.routing import APIRoute
from pydantic import BaseModel, GetCoreSchemaHandler, GetJsonSchemaHandler
from pydantic.json_schema import JsonSchemaValue
from pydantic_core import CoreSchema, core_schema
from starlette.exceptions import HTTPException

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


class BodyRoute(APIRoute):
    """A route whose body is validated by the protocol: FastAPI's body-level errors (empty
    body, invalid JSON, undecodable bytes) become our ``InvalidRequest``."""

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handler = super().get_route_handler()

        async def route_handler(request: Request) -> Response:
            try:
                return await handler(request)
            except RequestValidationError as exc:
                if not _body_level(exc):
                    raise
                parse_json(await request.body())  # raises with our message
                raise
            except HTTPException as exc:
                if exc.status_code != 400 or exc.__cause__ is None:
                    raise
                parse_json(await request.body())
                raise

        return route_handler


def _body_level(exc: RequestValidationError) -> bool:
    first = exc.errors()[0]
    return tuple(first.get("loc", ()))[:1] == ("body",) and first.get("type") in (
        "missing",
        "json_invalid",
    )
