"""Prometheus scrape endpoint; behind a bearer token when ``ZIMAGE_METRICS_TOKEN`` is set
(the metrics name every key's usage)."""

from __future__ import annotations

import hmac
from typing import Annotated

from fastapi import APIRouter, Depends, Request
from fastapi.responses import Response
from prometheus_client import CONTENT_TYPE_LATEST

from zimage_server.api.errors import error_docs
from zimage_server.core.errors import Unauthenticated
from zimage_server.protocol import Flavour
from zimage_server.telemetry import Metrics

router = APIRouter(tags=["operations"])
NO_TOKEN = Unauthenticated(
    "Missing or invalid metrics token: send 'Authorization: Bearer <ZIMAGE_METRICS_TOKEN>'.",
    headers={"WWW-Authenticate": 'Bearer realm="metrics"'},
)


def require_metrics_token(request: Request) -> None:
    """Compared in constant time, like the admin token."""
    token = request.app.state.settings.metrics_token
    if token is None:
        return
    scheme, _, given = request.headers.get("authorization", "").partition(" ")
    expected = token.get_secret_value().encode()
    if scheme.lower() != "bearer" or not hmac.compare_digest(given.strip().encode(), expected):
        raise Unauthenticated(NO_TOKEN.message, headers=NO_TOKEN.headers)


@router.get(
    "/metrics",
    summary="Prometheus metrics",
    response_class=Response,
    responses={
        200: {"content": {CONTENT_TYPE_LATEST.split(";")[0]: {}}},
        **error_docs(Flavour.SEGMIND, NO_TOKEN),
    },
)
async def scrape(
    request: Request, _token: Annotated[None, Depends(require_metrics_token)]
) -> Response:
    metrics: Metrics = request.app.state.metrics
    return Response(metrics.render(), media_type=CONTENT_TYPE_LATEST)
