"""Administration of keys and credits over HTTP (mirrors ``zimage keys``)."""

from __future__ import annotations

import asyncio
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel, BeforeValidator, Field

from zimage_server.accounts import KeyInfo, KeyService
from zimage_server.accounts.limits import LIMIT_PATTERN
from zimage_server.api.auth import require_admin
from zimage_server.api.bodies import JsonRoute
from zimage_server.api.errors import Example, error_docs
from zimage_server.billing import Ledger, format_credits, to_micro
from zimage_server.protocol import Flavour
from zimage_server.protocol.segmind import Number, no_bool

router = APIRouter(
    prefix="/admin",
    tags=["admin"],
    dependencies=[Depends(require_admin)],
    route_class=JsonRoute,
    responses=error_docs(
        Flavour.SEGMIND, Example.bad_admin_body, Example.no_admin_token, Example.unknown_key
    ),
)


class KeyCreate(BaseModel):
    name: str = Field(min_length=1, max_length=200)
    credits: Number = Field(0, ge=0, le=1e12)
    scopes: list[Literal["generate"]] = ["generate"]
    rate_limit: str | None = Field(
        None,
        description="e.g. '60/minute' (the `limits` notation), a window from 1 second to "
        "366 days; default from settings",
        max_length=64,
        json_schema_extra={"pattern": LIMIT_PATTERN},  # checked by the service, its message
    )
    max_in_flight: Annotated[int, Field(ge=1, le=10_000), BeforeValidator(no_bool)] | None = None


class TopUp(BaseModel):
    # Credits are kept in millionths: less than one of them would add nothing.
    credits: Number = Field(ge=1e-6, le=1e12, description="At least 0.000001.")


def key_json(info: KeyInfo) -> dict[str, Any]:
    return {
        "prefix": info.prefix,
        "name": info.name,
        "scopes": info.scopes,
        "disabled": info.disabled,
        "balance": format_credits(info.balance),
        "rate_limit": info.rate_limit,
        "max_in_flight": info.max_in_flight,
        "created_at": info.created_at.isoformat() if info.created_at else None,
    }


def _keys(request: Request) -> KeyService:
    keys: KeyService = request.app.state.keys
    return keys


@router.post("/keys", status_code=201, summary="Create a key (the key is shown only here)")
async def create_key(body: KeyCreate, request: Request) -> JSONResponse:
    key, info = await asyncio.to_thread(
        _keys(request).create,
        body.name,
        to_micro(body.credits),
        frozenset(body.scopes),
        body.rate_limit,
        body.max_in_flight,
    )
    return JSONResponse({"key": key, **key_json(info)}, status_code=201)


@router.get("/keys", summary="List keys")
async def list_keys(request: Request) -> list[dict[str, Any]]:
    return [key_json(info) for info in await asyncio.to_thread(_keys(request).list)]


@router.post("/keys/{prefix}/disable", summary="Disable a key (403 from now on)")
async def disable_key(prefix: str, request: Request) -> dict[str, Any]:
    return key_json(await asyncio.to_thread(_keys(request).set_disabled, prefix, True))


@router.post("/keys/{prefix}/enable", summary="Enable a key again")
async def enable_key(prefix: str, request: Request) -> dict[str, Any]:
    return key_json(await asyncio.to_thread(_keys(request).set_disabled, prefix, False))


@router.post("/keys/{prefix}/top-up", summary="Add credits")
async def top_up(prefix: str, body: TopUp, request: Request) -> dict[str, Any]:
    return key_json(await asyncio.to_thread(_keys(request).top_up, prefix, to_micro(body.credits)))


@router.get("/keys/{prefix}/usage", summary="Images, credits spent, balance")
async def usage(prefix: str, request: Request) -> dict[str, Any]:
    keys = _keys(request)
    ledger: Ledger = request.app.state.ledger
    key_id = await asyncio.to_thread(keys.key_id, prefix)
    used = await asyncio.to_thread(ledger.usage, key_id)
    return {
        "prefix": prefix,
        "images": used.images,
        "spent": format_credits(used.spent),
        "balance": format_credits(used.balance),
        "ledger_sum": format_credits(used.ledger_sum),
        "pending": format_credits(used.pending),  # held for requests still running
    }
