"""Segmind v2: submit, poll, fetch, cancel and list async requests."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from typing import Annotated, Any

from fastapi import APIRouter, Body, Depends, Query, Request
from fastapi.responses import Response
from pydantic import BaseModel

from zimage_server.accounts import Admission
from zimage_server.api.auth import admit_generate, deadline_from, identify_caller
from zimage_server.api.bodies import BodyRoute, DocumentedAs
from zimage_server.api.errors import Example, error_docs
from zimage_server.api.responses import image_json, model_response
from zimage_server.api.routes.v1 import public_base
from zimage_server.api.sse import Frames, event_frames, event_stream, last_event_id
from zimage_server.core.errors import InvalidRequest, ZImageError
from zimage_server.images import GenerationService
from zimage_server.jobs import JobRunner, JobStatus, Submission, owner_of, result_body
from zimage_server.jobs.stored import request_hash
from zimage_server.protocol import (
    Flavour,
    JobList,
    JobListItem,
    JobResult,
    JobStatusBody,
    SubmitRequest,
    SubmittedJob,
    wire,
)
from zimage_server.protocol.segmind import JobProgress, json_value
from zimage_server.store.models import MAX_IDEMPOTENCY_KEY, Job
from zimage_server.streams import StreamEvent

router = APIRouter(tags=["jobs"], route_class=BodyRoute)
Caller = Annotated[Admission, Depends(identify_caller)]
V2Body = Annotated[object, DocumentedAs(SubmitRequest), Body(title="SubmitRequest")]
_FAILED_422 = "FAILED: the body has `error` (Segmind serves it with HTTP 422)"


def _errors(*examples: ZImageError, failed: type[BaseModel] | None = None) -> dict[int | str, Any]:
    """The route's error statuses; with ``failed``, the 422 that carries a FAILED body."""
    docs = error_docs(Flavour.SEGMIND, Example.no_key, Example.disabled, *examples)
    if failed is not None:
        docs[422] = {"model": failed, "description": _FAILED_422}
    return docs


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
    return datetime.fromtimestamp(epoch, UTC).isoformat() if epoch else None


def _status_fields(runner: JobRunner, job: Job) -> dict[str, Any]:
    """The status body's fields that apply (the others are left off the wire)."""
    status, position, progress = runner.live_status(job)
    fields: dict[str, Any] = {"request_id": job.id, "status": status.value, "seed": job.seed}
    if position is not None:
        fields["queue_position"] = position
    if progress is not None:
        fields["progress"] = JobProgress(step=progress[0], total=progress[1])
    if job.error:
        fields["error"] = job.error
    fields.update(created_at=_iso(job.created_at), finished_at=_iso(job.finished_at))
    return fields


def idempotency_key(request: Request) -> str | None:
    """The ``Idempotency-Key`` header, refused when longer than its column holds."""
    key = request.headers.get("idempotency-key")
    if key is not None and len(key) > MAX_IDEMPOTENCY_KEY:
        raise InvalidRequest(
            f"Invalid 'Idempotency-Key' header: at most {MAX_IDEMPOTENCY_KEY} characters "
            f"(got {len(key)}).",
            field="Idempotency-Key",
        )
    return key


def _reply(body: JobStatusBody) -> Response:
    # Segmind serves a FAILED request's body with HTTP 422.
    return model_response(body, status_code=422 if body.status == "FAILED" else 200)


@router.post(
    "/v2/{model}",
    status_code=202,
    summary="Submit an async request (Segmind v2)",
    response_model=SubmittedJob,
    responses=_errors(
        Example.bad_steps,
        Example.unknown_model,
        Example.credits,
        Example.idempotency,
        Example.rate_limited,
        Example.queue_full,
        Example.not_ready,
    ),
)
async def submit(
    model: str,
    body: V2Body,
    request: Request,
    admission: Annotated[Admission, Depends(admit_generate)],
) -> Response:
    service: GenerationService = request.app.state.generation
    service.check_model(model)
    data, key, runner = json_value(body), idempotency_key(request), _runner(request)
    # Hashed as received, and a retry answered from its key, before any image is fetched.
    body_hash = await asyncio.to_thread(request_hash, model, data)
    job = None if key is None else await runner.replay(owner_of(admission), key, body_hash)
    created = job is None
    base = public_base(request)
    if job is None:
        submit = await service.validate_submit(data, model)
        submission = Submission(
            params=submit.generation_params(),
            webhook_url=submit.webhook_url,
            idempotency_key=key,
            deadline_s=deadline_from(request),
            base_url=base,
            body_hash=body_hash,
        )
        job, created = await runner.submit(submission, admission)
    status = runner.live_status(job)[0].value
    reply = SubmittedJob(request_id=job.id, status=status, **_urls(base, job.id))
    headers = {**admission.headers, **({} if created else {"Idempotent-Replayed": "true"})}
    return model_response(reply, status_code=202, headers=headers)


@router.get(
    "/v2/requests", summary="A key's recent requests", response_model=JobList, responses=_errors()
)
async def list_requests(
    request: Request, caller: Caller, limit: Annotated[int, Query(ge=1, le=100)] = 20
) -> Response:
    runner = _runner(request)
    jobs = await asyncio.to_thread(runner.repo.recent, owner_of(caller), limit)
    base = public_base(request)
    items = [JobListItem(**_status_fields(runner, job), **_urls(base, job.id)) for job in jobs]
    return model_response(JobList(requests=items))


@router.get(
    "/v2/requests/{request_id}/status",
    summary="Status of an async request",
    response_model=JobStatusBody,
    responses=_errors(Example.unknown_request, failed=JobStatusBody),
)
async def status(request_id: str, request: Request, caller: Caller) -> Response:
    runner = _runner(request)
    job = await runner.get(request_id, owner_of(caller))
    return _reply(JobStatusBody(**_status_fields(runner, job)))


@router.get(
    "/v2/requests/{request_id}",
    summary="Result of an async request",
    response_model=JobResult,
    responses=_errors(Example.unknown_request, failed=JobResult),
)
async def result(request_id: str, request: Request, caller: Caller) -> Response:
    runner = _runner(request)
    job = await runner.get(request_id, owner_of(caller))
    status = runner.live_status(job)[0]

    def content() -> JobResult:
        # reads and base64-encodes the image; the status is the live one
        return result_body(job, runner.outputs, status=status)

    # A finished job's output may be an inline image: read and render it off the loop.
    off_loop = job.output_id is not None
    code = 422 if status == JobStatus.FAILED else 200
    return await image_json(content, off_loop, status_code=code)


@router.post(
    "/v2/requests/{request_id}/cancel",
    summary="Cancel a queued or running request",
    response_model=JobStatusBody,
    responses=_errors(Example.unknown_request, Example.finished, failed=JobStatusBody),
)
async def cancel(request_id: str, request: Request, caller: Caller) -> Response:
    runner = _runner(request)
    job = await runner.cancel(request_id, owner_of(caller))
    return _reply(JobStatusBody(**_status_fields(runner, job)))


_EVENTS_DOC = (
    "Server-sent events of one request: `queued` (`queue_position`, 1 = next), `started`, "
    "`step` (`step` of `total`, and `preview` when the request asked for previews), then "
    "one of `completed`, `failed` or `cancelled` whose data is the body of "
    "`GET /v2/requests/{id}`, and the stream ends. Reconnect with `Last-Event-ID` to get "
    "what was missed (the latest of each kind, and always the terminal event)."
)


@router.get(
    "/v2/requests/{request_id}/events",
    summary="Stream a request's progress (server-sent events)",
    description=_EVENTS_DOC,
    response_class=Response,
    responses={
        200: {"content": {"text/event-stream": {}}, "description": "The event stream."},
        **_errors(Example.unknown_request),
    },
)
async def events(request_id: str, request: Request, caller: Caller) -> Response:
    runner = _runner(request)
    owner = owner_of(caller)
    job = await runner.get(request_id, owner)  # 404 for another key's request
    after, ended = last_event_id(request), JobStatus(job.status).is_terminal

    async def finish(event: StreamEvent) -> Frames:
        finished = await runner.get(request_id, owner)
        body = await asyncio.to_thread(lambda: wire(result_body(finished, runner.outputs)))
        return [(event.name, body)]

    keepalive = request.app.state.settings.stream_keepalive_s
    # Run by another process (or nobody yet): its events come through Redis when shared.
    shared = None if ended else runner.shared_events(job.id, after)
    if shared is not None:
        return event_stream(event_frames(shared, finish, keepalive))
    subscription = runner.events.subscribe(job.id, after)
    if ended:  # its live events may be long gone
        runner.events.finish(job.id, job.status.lower(), {"request_id": job.id})
    # Without Redis, a job run elsewhere sends only its end, learnt from the store.
    follower = None if ended else runner.follow(job.id)

    async def frames() -> AsyncIterator[bytes]:
        try:
            async for chunk in event_frames(subscription, finish, keepalive):
                yield chunk
        finally:
            if follower is not None:
                follower.cancel()

    return event_stream(frames())


__all__ = ["JobStatus", "router"]
