"""Liveness and readiness probes."""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse

from zimage_server.engine import Engine, EngineState

router = APIRouter(tags=["operations"])


@router.get("/healthz", summary="Liveness: the API process is up")
async def healthz() -> dict[str, str]:
    return {"status": "ok"}


@router.get("/readyz", summary="Readiness: the model is loaded and warmed up")
async def readyz(request: Request) -> JSONResponse:
    engine: Engine = request.app.state.engine
    state = engine.state
    body: dict[str, object] = {"status": state.value, "model": request.app.state.model_label}
    if state == EngineState.READY:
        return JSONResponse(body)
    if engine.failure:
        body["reason"] = engine.failure
    return JSONResponse(body, status_code=503, headers={"Retry-After": "5"})
