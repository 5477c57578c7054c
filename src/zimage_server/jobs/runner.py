"""Async jobs: submit (row + hold in one transaction), run on the engine, finish exactly
once, notify. Each job is an asyncio task awaiting the engine, under a lease this process
renews while it runs. Any number of API processes share one store: each claims the jobs
whose lease ran out (a process that died or stopped), so they are run again by exactly one
of them; their hold (taken once, at submit) is not taken twice, and the one terminal
UPDATE decides which run is billed."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import functools
import json
import logging
import math
import os
import secrets
import socket
import time
from dataclasses import dataclass
from typing import Any, Protocol

from sqlalchemy.exc import SQLAlchemyError

from zimage_server.accounts import Admission
from zimage_server.billing import format_credits
from zimage_server.core.config import Settings
from zimage_server.core.errors import (
    Cancelled,
    Conflict,
    DeadlineExceeded,
    NotReady,
    Overloaded,
    StoreUnavailable,
    WorkerDied,
    ZImageError,
)
from zimage_server.engine import EngineLike
from zimage_server.images import Generated, GenerationService
from zimage_server.images.service import pick_seed, tenant_of
from zimage_server.jobs.repository import JobRepository, NewJob, QueueView
from zimage_server.jobs.states import JobStatus
from zimage_server.jobs.stored import join_inputs, split_inputs
from zimage_server.jobs.webhooks import WebhookPolicy
from zimage_server.protocol import GenerationParams, JobMetrics, JobResult, wire
from zimage_server.store import Outputs
from zimage_server.store.models import Job
from zimage_server.streams import EventSource, ProgressHub
from zimage_server.streams.shared import SharedEvents, takeover_id

log = logging.getLogger("zimage.jobs")
FINISH_RETRY_MAX_S = 30.0
FOLLOW_POLL_S = 1.0  # how often a reader on another process checks whether a job ended


class InFlightSlots(Protocol):
    """The per-key in-flight count (the rate limiter's) that a running job occupies, under
    its job id: a job taken over by another process occupies the same slot, not two."""

    def occupy(self, key_id: int, token: str) -> None: ...

    def vacate(self, key_id: int, token: str) -> None: ...


def replica_name() -> str:
    """This API process, as lease rows name it (host, pid and a random tail: a pid is
    reused after a restart, the tail is not)."""
    return f"{socket.gethostname()[:40]}-{os.getpid()}-{secrets.token_hex(3)}"


owner_of = tenant_of  # a job's owner is the tenant its renders run for


@dataclass(frozen=True)
class Submission:
    """``body_hash``: of the body as received (``request_hash``), not of ``params``, whose
    images were fetched and decoded since: a retry must not depend on fetching again."""

    params: GenerationParams
    webhook_url: str | None
    idempotency_key: str | None
    deadline_s: float | None
    base_url: str
    body_hash: str


class JobRunner:
    def __init__(
        self,
        settings: Settings,
        repo: JobRepository,
        engine: EngineLike,
        generation: GenerationService,
        outputs: Outputs,
        slots: InFlightSlots,
        policy: WebhookPolicy,
        events: ProgressHub | None = None,
        replica: str | None = None,
        shared: SharedEvents | None = None,
    ) -> None:
        self.settings, self.repo, self.engine = settings, repo, engine
        self.generation, self.outputs, self.slots, self.policy = (
            generation,
            outputs,
            slots,
            policy,
        )
        self.events = events if events is not None else ProgressHub(engine.position)
        self.replica = replica or replica_name()
        self.shared = shared  # the jobs' events for every API process, in Redis
        self.lease_s = settings.job_lease_s
        self._tasks: dict[str, asyncio.Task[None]] = {}
        self._occupied: dict[str, int] = {}  # job id -> key id whose in-flight slot it holds
        self._cancel_cost: dict[str, int] = {}  # micro-credits a cancelled render used
        self._lost: set[str] = set()  # jobs whose lease another process took: theirs to end
        self._leases: asyncio.Task[None] | None = None
        self.cluster = QueueView(0, 0.0)  # the whole cluster's jobs, as of the last heartbeat

    # -- lifecycle -------------------------------------------------------------------------
    async def start(self) -> None:
        """Settle what a crash left unsettled, then keep leases: renew this process's,
        and claim the jobs of processes that died (at start: a previous run's)."""
        settled = await asyncio.to_thread(self.repo.settle_orphaned_holds)
        if settled:
            log.warning("settled %d credit holds of jobs that had already ended", settled)
        self._leases = asyncio.create_task(self._keep_leases(), name="job-leases")

    async def stop(self) -> None:
        """Stop the tasks and end their leases: their jobs stay unfinished in the store,
        and another process (or the next start) claims them at once."""
        if self._leases is not None:
            self._leases.cancel()
        for task in self._tasks.values():
            task.cancel()
        await asyncio.gather(*self._tasks.values(), return_exceptions=True)
        try:
            await asyncio.to_thread(self.repo.release_claims, self.replica)
        except (StoreUnavailable, SQLAlchemyError) as exc:
            log.warning("could not end this process's leases (%s); they run out instead", exc)

    async def _keep_leases(self) -> None:
        """Heartbeat: three times a lease, renew ours and claim lapsed ones."""
        while True:
            try:
                await self._renew()
                await self._claim()
                self.cluster = await asyncio.to_thread(self.repo.queue_view)
            except (StoreUnavailable, SQLAlchemyError) as exc:
                log.warning("job leases: the store is unavailable (%s)", exc)
            await asyncio.sleep(self.lease_s / 3)

    async def _renew(self) -> None:
        """Stop the renders of jobs this process no longer holds: cancelled through
        another process, or taken over after our lease ran out (a long stall)."""
        mine = list(self._tasks)
        held = await asyncio.to_thread(self.repo.renew, self.replica, mine, self.lease_s)
        for job_id in mine:
            task = self._tasks.get(job_id)
            if job_id in held or task is None:
                continue
            log.warning("job %s: no longer held by this process; stopping its render", job_id)
            self._lost.add(job_id)  # its stop is not a cancel: the new holder ends it
            if not self.engine.cancel(job_id):
                task.cancel()

    async def _claim(self) -> None:
        """Claim as many lapsed jobs as the local queue has room for."""
        if self.engine.state.value != "READY":
            return
        room = self.engine.max_queue - self.engine.depth
        if room <= 0:
            return
        tasks = self.generation.served_tasks()  # the others wait for a process that has them
        claimed = await asyncio.to_thread(self.repo.claim, self.replica, self.lease_s, room, tasks)
        for job in claimed:
            if job.id in self._tasks:
                continue
            with contextlib.suppress(Overloaded):  # raced by a v1 request: it runs anyway
                self.engine.admit(reserve=job.id)
            self._occupy(job)
            self._spawn(job, first_event_id=takeover_id())  # above the earlier run's ids
        if claimed:
            log.info("claimed %d unfinished jobs whose lease had run out", len(claimed))

    # -- requests ----------------------------------------------------------------------------
    async def submit(self, sub: Submission, admission: Admission) -> tuple[Job, bool]:
        if sub.webhook_url:  # no DNS here: names are resolved (and judged) at delivery
            self.policy.check(sub.webhook_url)
        job_id = secrets.token_hex(16)
        self.engine.admit(reserve=job_id)  # the place is held across the awaits below
        try:
            # Off the loop: splitting out megabytes of images is not free.
            job, created = await asyncio.to_thread(self._create, job_id, sub, admission)
        except BaseException:
            self.engine.unreserve(job_id)
            raise
        if not created:  # an Idempotency-Key repeat: the first job has its own place
            self.engine.unreserve(job_id)
            return job, created
        self._occupy(job)
        self._spawn(job)  # its render takes the reserved place
        return job, created

    def _create(self, job_id: str, sub: Submission, admission: Admission) -> tuple[Job, bool]:
        return self.repo.create(self._new(job_id, sub, admission))

    async def replay(self, owner: str, idempotency_key: str, body_hash: str) -> Job | None:
        """The job an Idempotency-Key already made with this body (None for a new key),
        found before the request's images are fetched again."""
        return await asyncio.to_thread(self.repo.replay, owner, idempotency_key, body_hash)

    def _new(self, job_id: str, sub: Submission, admission: Admission) -> NewJob:
        timeout = sub.deadline_s or self.settings.job_timeout_s
        params, inputs = split_inputs(sub.params)
        return NewJob(
            id=job_id,
            owner=owner_of(admission),
            key_id=admission.principal.key_id if admission.principal else None,
            params=params,
            task=sub.params.task,
            inputs=inputs,
            seed=pick_seed(sub.params),
            price=self.generation.price(sub.params) if admission.principal else 0,
            webhook_url=sub.webhook_url,
            base_url=sub.base_url,
            idempotency_key=sub.idempotency_key,
            body_hash=sub.body_hash,
            deadline_at=time.time() + timeout,
            claimed_by=self.replica,
            lease_until=time.time() + self.lease_s,
        )

    def _occupy(self, job: Job) -> None:
        """A job holds its key's in-flight slot until it ends, not just while submitting:
        otherwise one key could fill the shared queue with jobs."""
        if job.key_id is not None and job.id not in self._occupied:
            self._occupied[job.id] = job.key_id
            self.slots.occupy(job.key_id, job.id)

    def _vacate(self, job_id: str) -> None:
        key_id = self._occupied.pop(job_id, None)
        if key_id is not None:
            self.slots.vacate(key_id, job_id)

    async def get(self, job_id: str, owner: str) -> Job:
        return await asyncio.to_thread(self.repo.get, job_id, owner)

    async def cancel(self, job_id: str, owner: str) -> Job:
        job = await self.get(job_id, owner)
        if JobStatus(job.status).is_terminal:
            raise Conflict(f"Request {job_id} is already {job.status}; it cannot be cancelled.")
        progress = self.engine.progress(job_id)
        if progress is not None and progress[1] > 0:  # running: it pays for the steps done
            self._cancel_cost[job_id] = math.ceil(job.price * progress[0] / progress[1])
        if not self.engine.cancel(job_id):
            # Not in the engine (e.g. between retries): finish it here and stop its task.
            task = self._tasks.get(job_id)
            if task:
                task.cancel()
            await self._finish(job, JobStatus.CANCELLED, error="cancelled")
        else:
            task = self._tasks.get(job_id)
            if task:
                await asyncio.wait({task}, timeout=30)
        return await self.get(job_id, owner)

    def live_status(self, job: Job) -> tuple[JobStatus, int | None, tuple[int, int] | None]:
        """Status with what only the engine knows: queue position (1 = next) and step."""
        status = JobStatus(job.status)
        if status.is_terminal:
            return status, None, None
        progress = self.engine.progress(job.id)
        if progress is not None:
            return JobStatus.PROCESSING, None, progress
        position = self.engine.position(job.id)
        return JobStatus.QUEUED, None if position is None else position + 1, None

    # -- running -----------------------------------------------------------------------------
    def _spawn(self, job: Job, first_event_id: int | None = None) -> None:
        # Before the render is queued: a reader finds it at once.
        self.events.open(job.id, first_event_id)
        if self.shared is not None:
            self.shared.track(job.id, job.deadline_at)
        task = asyncio.create_task(self._run(job), name=f"job-{job.id}")
        self._tasks[job.id] = task
        task.add_done_callback(functools.partial(self._forget, job.id))

    def _forget(self, job_id: str, _task: asyncio.Task[None]) -> None:
        self._tasks.pop(job_id, None)
        self._cancel_cost.pop(job_id, None)
        if self.shared is not None:
            self.shared.forget(job_id)
        if job_id in self._lost:  # its readers here learn the end from the store
            self._lost.discard(job_id)
            self.follow(job_id)

    def follow(self, job_id: str) -> asyncio.Task[None] | None:
        """For a reader of a job another process runs: poll the store until the job has
        ended, then end its channel here, so the reader gets the terminal event."""
        if job_id in self._tasks:
            return None
        return asyncio.create_task(self._follow(job_id), name=f"follow-{job_id}")

    def shared_events(self, job_id: str, after: int | None) -> EventSource | None:
        """A job run by another process (or by none, yet), read from Redis after event
        ``after``; None when it runs here or there is no Redis."""
        if self.shared is None or job_id in self._tasks:
            return None
        return self.shared.reader(job_id, after, functools.partial(self._ended, job_id))

    async def _ended(self, job_id: str) -> str | None:
        """The stored terminal status as an event name; None while it runs (or unknown)."""
        try:
            status = JobStatus((await asyncio.to_thread(self.repo.get, job_id)).status)
        except ZImageError:
            return None
        return status.value.lower() if status.is_terminal else None

    async def _follow(self, job_id: str) -> None:
        while job_id not in self._tasks:  # claimed here meanwhile: ours to finish
            try:
                job = await asyncio.to_thread(self.repo.get, job_id)
            except ZImageError:
                await asyncio.sleep(FOLLOW_POLL_S)  # the store is down, or it expired
                continue
            if JobStatus(job.status).is_terminal:
                self.events.finish(job.id, job.status.lower(), {"request_id": job.id})
                return
            await asyncio.sleep(FOLLOW_POLL_S)

    async def _run(self, job: Job) -> None:
        try:
            await self._attempts(job)
        finally:
            self.engine.unreserve(job.id)  # if it never reached the engine
            self._vacate(job.id)  # also when stopped, or no longer held

    def _render_params(self, job: Job) -> GenerationParams:
        """Its params with its images, read only now (a poll never loads them)."""
        return join_inputs(job.params, self.repo.inputs(job.id))

    async def _attempts(self, job: Job) -> None:
        try:
            params = await asyncio.to_thread(self._render_params, job)
        except (StoreUnavailable, SQLAlchemyError) as exc:  # its lease runs out: run again
            log.warning("job %s: its inputs could not be read (%s)", job.id, exc)
            return
        for attempt in range(self.settings.job_retries + 1):
            try:
                generated = await self.generation.render(
                    params,
                    job.seed,
                    job.deadline_at - time.time(),
                    job_id=job.id,
                    tenant=job.owner,
                    inputs=await asyncio.to_thread(self.generation.stored_inputs, params),
                )
            except WorkerDied as exc:
                if attempt < self.settings.job_retries:
                    log.warning("job %s: worker died, running it again", job.id)
                    continue
                await self._finish(job, JobStatus.FAILED, error=exc.message)
            except (Cancelled, DeadlineExceeded) as exc:
                await self._stopped(job, exc)
            except ZImageError as exc:
                await self._finish(
                    job, JobStatus.FAILED, error=exc.message if exc.public else "internal error"
                )
            except asyncio.CancelledError:
                raise  # server stopping: the job stays unfinished for the next start
            except Exception:
                log.exception("job %s failed", job.id)
                await self._finish(job, JobStatus.FAILED, error="internal error")
            else:
                await self._complete(job, generated)
            return

    async def _stopped(self, job: Job, exc: Cancelled | DeadlineExceeded) -> None:
        """A cancel (paying for the steps it ran) or a passed deadline; nothing when this
        process lost the job's lease: the process that holds it now ends it."""
        if job.id in self._lost:
            return
        if isinstance(exc, Cancelled):
            keep = self._cancel_cost.get(job.id, 0)
            await self._finish(job, JobStatus.CANCELLED, error="cancelled", keep=keep)
            return
        error = "Deadline exceeded: the job did not finish before its deadline."
        await self._finish(job, JobStatus.FAILED, error=error)

    async def _complete(self, job: Job, generated: Generated) -> None:
        """Store the image and finish; a failure to store ends the job FAILED (refunded,
        notified), never leaves it unfinished with its hold."""
        try:
            output_id = await asyncio.to_thread(
                self.outputs.save, generated.data, generated.params.image_format
            )
        except ZImageError as exc:  # the output disk is full
            await self._finish(job, JobStatus.FAILED, error=exc.message)
            return
        except OSError as exc:
            log.error("job %s: storing its image failed: %s", job.id, exc)
            error = f"The image could not be stored ({exc.strerror}); nothing was charged."
            await self._finish(job, JobStatus.FAILED, error=error)
            return
        metrics = {
            "inference_time": round(generated.generation_time, 4),
            "queue_time": round(generated.timings.get("queue_wait", 0.0), 4),
            "timings": {k: round(v, 4) for k, v in generated.timings.items()},
            "credits": format_credits(job.price),
        }
        await self._finish(job, JobStatus.COMPLETED, output_id=output_id, metrics=metrics)

    async def _finish(
        self,
        job: Job,
        status: JobStatus,
        *,
        error: str | None = None,
        output_id: str | None = None,
        metrics: dict[str, Any] | None = None,
        keep: int = 0,
    ) -> None:
        """Write the terminal state, its settlement and its webhook in one transaction.
        While the database refuses it, try again (backing off): the job stays unfinished
        in the store meanwhile, and a restart would run it again."""
        finish = functools.partial(
            self.repo.finish,
            job.id,
            status,
            error=error,
            output_id=output_id,
            metrics=json.dumps(metrics) if metrics else None,
            webhook_payload=lambda row: json.dumps(wire(result_body(row, self.outputs))),
            keep=keep,
        )
        delay = 0.25
        while True:
            try:
                changed = await asyncio.to_thread(finish)
                break
            except (NotReady, SQLAlchemyError) as exc:  # the store, or the output bucket
                log.warning("job %s: could not record %s (%s); retrying", job.id, status, exc)
                await asyncio.sleep(delay)
                delay = min(delay * 2, FINISH_RETRY_MAX_S)
        self._vacate(job.id)
        if not changed:  # another actor ended it first (a cancel racing a completion)
            status = await self._stored_status(job.id, status)
        # Its readers build the terminal event from the stored job, as GET would.
        self.events.finish(job.id, status.value.lower(), {"request_id": job.id})

    async def _stored_status(self, job_id: str, fallback: JobStatus) -> JobStatus:
        try:
            return JobStatus((await asyncio.to_thread(self.repo.get, job_id)).status)
        except ZImageError:
            return fallback


def result_body(job: Job, outputs: Outputs, status: JobStatus | None = None) -> JobResult:
    """``GET /v2/requests/{id}`` (with the live ``status``) and the webhook payload."""
    params = GenerationParams.model_validate_json(job.params)
    output: str | None = None
    if job.status == JobStatus.COMPLETED.value and job.output_id:
        if params.base_64:
            output = base64.b64encode(outputs.read(job.output_id)).decode()
        else:
            output = outputs.url(job.output_id, job.base_url)
    return JobResult(
        request_id=job.id,
        status=(status or JobStatus(job.status)).value,
        output=output,
        seed=job.seed,
        metrics=JobMetrics.model_validate_json(job.metrics) if job.metrics else None,
        **({"error": job.error} if job.error else {}),
    )
