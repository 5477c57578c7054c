"""Liveness and readiness probes."""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse

from zimage_server.engine import EngineLike, EngineState

router = APIRouter(tags=["operations"])


@router.get("/healthz", summary="Liveness: the API process is up")
async def healthz() -> dict[str, str]:
    return {"status": "ok"}


@router.get("/readyz", summary="Readiness: the model is loaded and warmed up")
async def readyz(request: Request) -> JSONResponse:
    """503 unless new work would be served: while loading, when the model failed, while
    draining for shutdown, when the store is gone, or with the queue full (BUSY)."""
    engine: EngineLike = request.app.state.engine
    state, reason = engine.state.value, engine.failure
    if engine.state == EngineState.READY and engine.depth >= engine.max_queue:
        state = "BUSY"  # loaded, but the queue is full: a balancer should go elsewhere
    store_problem = request.app.state.services.db.problem()
    if store_problem is not None:
        state, reason = "UNAVAILABLE", store_problem
    if request.app.state.drain.draining:
        state, reason = "DRAINING", "The server is shutting down."
    cluster = request.app.state.jobs.cluster  # from the store, as of the last heartbeat
    body: dict[str, object] = {
        "status": state,
        "model": request.app.state.model_label,
        "queue_depth": engine.depth,
        "replica": request.app.state.jobs.replica,
        "cluster_queue_depth": cluster.depth,
        "cluster_oldest_wait_s": round(cluster.oldest_wait_s, 1),
        # Per task: a task no live process renders (ControlNet without its weights) waits.
        "cluster_tasks": {
            task: {"depth": queue.depth, "oldest_wait_s": round(queue.oldest_wait_s, 1)}
            for task, queue in sorted(cluster.tasks.items())
        },
    }
    if state == EngineState.READY.value:
        return JSONResponse(body)
    if reason:
        body["reason"] = reason
    return JSONResponse(body, status_code=503, headers={"Retry-After": "5"})


@router.get("/info", summary="What this server serves and whether it needs a key")
async def info(request: Request) -> dict[str, object]:
    from zimage_server import __version__
    from zimage_server.protocol import MODEL_SLUG, GenerationParams

    schema = GenerationParams.model_json_schema()["properties"]
    return {
        "name": "zimage-server",
        "version": __version__,
        "model": MODEL_SLUG,
        "weights": request.app.state.model_label,
        "auth_required": request.app.state.settings.auth_required,
        "parameters": {
            name: {k: v for k, v in spec.items() if k in ("minimum", "maximum", "default", "enum")}
            for name, spec in schema.items()
        },
    }
