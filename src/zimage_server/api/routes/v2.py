"""Segmind v2: submit, poll, fetch, cancel and list async requests."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Depends, Query, Request
from fastapi.responses import JSONResponse, Response

from zimage_server.accounts import Admission
from zimage_server.api.auth import admit_generate, deadline_from, identify_caller
from zimage_server.api.responses import image_json
from zimage_server.api.routes.v1 import public_base
from zimage_server.core.errors import InvalidRequest
from zimage_server.images import GenerationService
from zimage_server.images.params import GenerationParams, parse_json
from zimage_server.jobs import JobRunner, JobStatus, Submission, owner_of, result_body
from zimage_server.store.models import Job

router = APIRouter(tags=["jobs"])
Caller = Annotated[Admission, Depends(identify_caller)]
_SUBMIT_SCHEMA = GenerationParams.model_json_schema()
_SUBMIT_SCHEMA["properties"]["webhook_url"] = {
    "type": "string",
    "description": "Called with a signed POST when the request finishes.",
}


def _runner(request: Request) -> JobRunner:
    runner: JobRunner = request.app.state.jobs
    return runner


def _urls(base: str, job_id: str) -> dict[str, str]:
    return {
        "status_url": f"{base}/v2/requests/{job_id}/status",
        "response_url": f"{base}/v2/requests/{job_id}",
        "cancel_url": f"{base}/v2/requests/{job_id}/cancel",
    }


def _iso(epoch: float | None) -> str | None:
    from datetime import UTC, datetime

    return datetime.fromtimestamp(epoch, UTC).isoformat() if epoch else None


def _status_body(runner: JobRunner, job: Job) -> dict[str, Any]:
    status, position, progress = runner.live_status(job)
    body: dict[str, Any] = {"request_id": job.id, "status": status.value, "seed": job.seed}
    if position is not None:
        body["queue_position"] = position
    if progress is not None:
        body["progress"] = {"step": progress[0], "total": progress[1]}
    if job.error:
        body["error"] = job.error
    body.update(created_at=_iso(job.created_at), finished_at=_iso(job.finished_at))
    return body


def _reply(body: dict[str, Any]) -> JSONResponse:
    # Segmind serves a FAILED request's body with HTTP 422.
    return JSONResponse(body, status_code=422 if body["status"] == "FAILED" else 200)


def _webhook_url(data: Any) -> str | None:
    value = data.get("webhook_url") if isinstance(data, dict) else None
    if value is not None and not isinstance(value, str):
        raise InvalidRequest("Invalid 'webhook_url': must be an http(s) URL.", "webhook_url")
    return value or None


@router.post(
    "/v2/{model}",
    status_code=202,
    summary="Submit an async request (Segmind v2)",
    openapi_extra={
        "requestBody": {
            "required": True,
            "content": {"application/json": {"schema": _SUBMIT_SCHEMA}},
        }
    },
)
async def submit(
    model: str, request: Request, admission: Annotated[Admission, Depends(admit_generate)]
) -> JSONResponse:
    service: GenerationService = request.app.state.generation
    service.check_model(model)
    data = parse_json(await request.body())
    base = public_base(request)
    submission = Submission(
        params=service.validate(data),
        webhook_url=_webhook_url(data),
        idempotency_key=request.headers.get("idempotency-key"),
        deadline_s=deadline_from(request),
        base_url=base,
    )
    runner = _runner(request)
    job, created = await runner.submit(submission, admission)
    body = {"request_id": job.id, "status": runner.live_status(job)[0].value, **_urls(base, job.id)}
    headers = {**admission.headers, **({} if created else {"Idempotent-Replayed": "true"})}
    return JSONResponse(body, status_code=202, headers=headers)


@router.get("/v2/requests", summary="A key's recent requests")
async def list_requests(
    request: Request, caller: Caller, limit: Annotated[int, Query(ge=1, le=100)] = 20
) -> dict[str, Any]:
    runner = _runner(request)
    jobs = await _recent(runner, owner_of(caller), limit)
    base = public_base(request)
    return {"requests": [{**_status_body(runner, job), **_urls(base, job.id)} for job in jobs]}


async def _recent(runner: JobRunner, owner: str, limit: int) -> list[Job]:
    import asyncio

    return list(await asyncio.to_thread(runner.repo.recent, owner, limit))


@router.get("/v2/requests/{request_id}/status", summary="Status of an async request")
async def status(request_id: str, request: Request, caller: Caller) -> JSONResponse:
    runner = _runner(request)
    return _reply(_status_body(runner, await runner.get(request_id, owner_of(caller))))


@router.get("/v2/requests/{request_id}", summary="Result of an async request")
async def result(request_id: str, request: Request, caller: Caller) -> Response:
    runner = _runner(request)
    job = await runner.get(request_id, owner_of(caller))
    status = runner.live_status(job)[0].value

    def content() -> dict[str, Any]:
        body = result_body(job, runner.outputs)  # reads and base64-encodes the image
        body["status"] = status
        return body

    # A finished job's output may be an inline image: read and render it off the loop.
    off_loop = job.output_id is not None
    return await image_json(content, off_loop, status_code=422 if status == "FAILED" else 200)


@router.post("/v2/requests/{request_id}/cancel", summary="Cancel a queued or running request")
async def cancel(request_id: str, request: Request, caller: Caller) -> JSONResponse:
    runner = _runner(request)
    return _reply(_status_body(runner, await runner.cancel(request_id, owner_of(caller))))


__all__ = ["JobStatus", "router"]
