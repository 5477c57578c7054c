"""Job and webhook-delivery rows. Every state change is one conditional UPDATE, so two
actors (a cancel and a completion, say) can never both win, in one process or many.

Rows are run under leases: a replica claims unclaimed or expired rows in one UPDATE whose
candidates are picked with ``FOR UPDATE SKIP LOCKED`` on PostgreSQL (so replicas claiming
at once take different rows instead of queueing on each other's locks; SQLite has one
writer and ignores the clause), and the lease condition is checked again in the UPDATE."""

from __future__ import annotations

import time
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass, field

from sqlalchemy import ColumnElement, delete, func, insert, or_, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from zimage_server.billing.ledger import KeyHints, capture_in, hold_in, release_in
from zimage_server.core.errors import Conflict, NotFound
from zimage_server.jobs.states import UNFINISHED, JobStatus
from zimage_server.store.db import Database
from zimage_server.store.models import Job, JobInputs, PendingHold, WebhookDelivery


@dataclass(frozen=True)
class NewJob:
    id: str
    owner: str
    key_id: int | None
    params: str  # without the input images: those are ``inputs``
    task: str  # the params' task: a process claims only the tasks it can render
    inputs: str | None
    seed: int
    price: int
    webhook_url: str | None
    base_url: str
    idempotency_key: str | None
    body_hash: str
    deadline_at: float
    claimed_by: str
    lease_until: float


@dataclass(frozen=True)
class TaskQueue:
    depth: int
    oldest_wait_s: float


@dataclass(frozen=True)
class QueueView:
    """The whole cluster's queue, from the store: jobs not yet finished, and how long the
    oldest of them has waited; and the same per task, since only the processes that can
    render a task take its jobs (a task no live process serves shows as one whose oldest
    job only grows older)."""

    depth: int
    oldest_wait_s: float
    tasks: dict[str, TaskQueue] = field(default_factory=dict)

    def oldest_wait_of(self, task: str) -> float:
        queue = self.tasks.get(task)
        return queue.oldest_wait_s if queue is not None else 0.0


def _lapsed(model: type[Job] | type[WebhookDelivery], now: float) -> ColumnElement[bool]:
    return or_(model.lease_until.is_(None), model.lease_until < now)


def settle_in(session: Session, job_id: str, status: JobStatus, keep: int = 0) -> None:
    """A job's hold follows its end: kept for an image, returned (less ``keep``) otherwise."""
    if status == JobStatus.COMPLETED:
        capture_in(session, job_id)
    else:
        release_in(session, job_id, keep)


class JobRepository:
    """``clock`` says when finished jobs have expired (tests move it instead of waiting)."""

    def __init__(
        self,
        db: Database,
        ttl_s: int,
        *,
        clock: Callable[[], float] = time.time,
        hints: KeyHints | None = None,
    ) -> None:
        self.db = db
        self.ttl_s = ttl_s
        self.clock = clock
        self.hints = hints or KeyHints()  # the ledger's: a job's hold is a hold too

    def create(self, new: NewJob) -> tuple[Job, bool]:
        """Insert the job and hold its price in one transaction.

        Returns (job, created). A repeated Idempotency-Key with the same body returns the
        first job (created False); with another body it is a ``Conflict``. The input
        images go to their own table in the same transaction.
        """
        try:
            with self.db.session() as session:
                session.execute(
                    insert(Job).values(
                        id=new.id,
                        owner=new.owner,
                        key_id=new.key_id,
                        status=JobStatus.QUEUED.value,
                        params=new.params,
                        task=new.task,
                        seed=new.seed,
                        price=new.price,
                        webhook_url=new.webhook_url,
                        base_url=new.base_url,
                        idempotency_key=new.idempotency_key,
                        body_hash=new.body_hash,
                        created_at=time.time(),
                        deadline_at=new.deadline_at,
                        claimed_by=new.claimed_by,
                        lease_until=new.lease_until,
                    )
                )
                if new.inputs is not None:
                    session.execute(insert(JobInputs).values(job_id=new.id, images=new.inputs))
                if new.key_id is not None:
                    with self.hints.watching(new.key_id):
                        balance = hold_in(session, new.key_id, new.price, new.id)
                    self.hints.held(new.key_id, balance)
        except IntegrityError:
            if new.idempotency_key is None:
                raise
            existing = self.replay(new.owner, new.idempotency_key, new.body_hash)
            if existing is None:  # pragma: no cover - the key's row made the insert fail
                raise
            return existing, False
        return self.get(new.id), True

    def replay(self, owner: str, key: str, body_hash: str) -> Job | None:
        """The job an Idempotency-Key already made, if the body was the same; None if the
        key is new; ``Conflict`` if it came with another body."""
        with self.db.session() as session:
            existing = session.execute(
                select(Job).where(Job.owner == owner, Job.idempotency_key == key)
            ).scalar_one_or_none()
        if existing is not None and existing.body_hash != body_hash:
            raise Conflict(
                f"Idempotency-Key '{key[:60]}' was already used for a different request "
                f"body (request {existing.id}). Use a new key for a new request."
            )
        return existing

    def inputs(self, job_id: str) -> str | None:
        """A job's input images (JSON), read only to run it; None without any."""
        with self.db.session() as session:
            return session.execute(
                select(JobInputs.images).where(JobInputs.job_id == job_id)
            ).scalar_one_or_none()

    def get(self, job_id: str, owner: str | None = None) -> Job:
        """The job, if ``owner`` may see it; ``NotFound`` (never 403) otherwise."""
        with self.db.session() as session:
            job = session.get(Job, job_id[:32])
        if job is None or (owner is not None and job.owner != owner):
            raise NotFound(f"No request with id '{job_id[:40]}'.")
        if job.expires_at is not None and job.expires_at < self.clock():
            raise NotFound(
                f"Request '{job_id}' has expired: results are kept for {self.ttl_s} s "
                "after they finish."
            )
        return job

    def recent(self, owner: str, limit: int) -> Sequence[Job]:
        with self.db.session() as session:
            return (
                session.execute(
                    select(Job)
                    .where(Job.owner == owner)
                    .order_by(Job.created_at.desc())
                    .limit(limit)
                )
                .scalars()
                .all()
            )

    def claim(
        self, replica: str, lease_s: float, limit: int, tasks: Collection[str]
    ) -> Sequence[Job]:
        """Take up to ``limit`` unfinished jobs of ``tasks`` (those this replica can
        render) whose lease has run out (their replica died or stopped), oldest first;
        each is claimed by exactly one replica. A job of another task waits for a replica
        that renders it. Leases run on real time (``time.time``), shared by every
        replica, never on the test clock."""
        now = time.time()
        with self.db.session() as session:
            candidates = (
                select(Job.id)
                .where(Job.status.in_(UNFINISHED), Job.task.in_(tasks), _lapsed(Job, now))
                .order_by(Job.created_at)
                .limit(limit)
                .with_for_update(skip_locked=True)
            )
            ids = (
                session.execute(
                    update(Job)
                    .where(Job.id.in_(candidates.scalar_subquery()), _lapsed(Job, now))
                    .values(claimed_by=replica, lease_until=now + lease_s)
                    .returning(Job.id)
                )
                .scalars()
                .all()
            )
            if not ids:
                return []
            return (
                session.execute(select(Job).where(Job.id.in_(ids)).order_by(Job.created_at))
                .scalars()
                .all()
            )

    def renew(self, replica: str, job_ids: Collection[str], lease_s: float) -> set[str]:
        """Extend this replica's leases on ``job_ids``; returns those it still holds and
        that are still unfinished. The others were cancelled (by any replica) or taken
        over after the lease ran out: their local render must stop."""
        if not job_ids:
            return set()
        with self.db.session() as session:
            return set(
                session.execute(
                    update(Job)
                    .where(
                        Job.id.in_(list(job_ids)),
                        Job.claimed_by == replica,
                        Job.status.in_(UNFINISHED),
                    )
                    .values(lease_until=time.time() + lease_s)
                    .returning(Job.id)
                ).scalars()
            )

    def release_claims(self, replica: str) -> int:
        """End this replica's leases (a clean stop): another replica takes the jobs over
        at its next claim instead of after the lease."""
        with self.db.session() as session:
            result = session.execute(
                update(Job)
                .where(Job.claimed_by == replica, Job.status.in_(UNFINISHED))
                .values(lease_until=None)
            )
            released = session.execute(
                update(WebhookDelivery)
                .where(WebhookDelivery.claimed_by == replica)
                .values(lease_until=None)
            )
        return int(result.rowcount or 0) + int(released.rowcount or 0)  # type: ignore[attr-defined]

    def queue_view(self) -> QueueView:
        with self.db.session() as session:
            rows = session.execute(
                select(Job.task, func.count(), func.min(Job.created_at))
                .where(Job.status.in_(UNFINISHED))
                .group_by(Job.task)
            ).all()
        now = time.time()
        tasks = {task: TaskQueue(int(n), max(0.0, now - oldest)) for task, n, oldest in rows}
        waits = [queue.oldest_wait_s for queue in tasks.values()]
        return QueueView(sum(q.depth for q in tasks.values()), max(waits, default=0.0), tasks)

    def finish(
        self,
        job_id: str,
        status: JobStatus,
        *,
        error: str | None = None,
        output_id: str | None = None,
        metrics: str | None = None,
        webhook_payload: Callable[[Job], str] | None = None,
        keep: int = 0,
    ) -> bool:
        """Move an unfinished job to a terminal state; False if it already was terminal.

        The settlement of its hold (kept if COMPLETED, else given back less ``keep``) and
        the webhook delivery row are written in the same transaction, so a crash can never
        separate a terminal state from its refund or its notification. Its input images,
        needed by no run any more, are deleted in it too.
        """
        now = time.time()
        with self.db.session() as session:
            job = session.execute(
                update(Job)
                .where(Job.id == job_id, Job.status.in_(UNFINISHED))
                .values(
                    status=status.value,
                    error=error,
                    output_id=output_id,
                    metrics=metrics,
                    finished_at=now,
                    expires_at=now + self.ttl_s,
                )
                .returning(Job.webhook_url, Job.key_id)
            ).one_or_none()
            if job is None:
                return False
            session.execute(delete(JobInputs).where(JobInputs.job_id == job_id))
            if job.key_id is not None:
                settle_in(session, job_id, status, keep)
            if job.webhook_url and webhook_payload is not None:
                row = session.get(Job, job_id)
                if row is None:  # pragma: no cover - updated in this very transaction
                    raise RuntimeError(f"job {job_id} vanished")
                session.execute(
                    insert(WebhookDelivery).values(
                        job_id=job_id,
                        url=job.webhook_url,
                        payload=webhook_payload(row),
                        attempts=0,
                        next_attempt_at=now,
                    )
                )
        return True

    def settle_orphaned_holds(self) -> int:
        """Settle holds whose job is already terminal (rows from before settlements
        shared the job's transaction); returns how many. Run at start."""
        with self.db.session() as session:
            rows = session.execute(
                select(PendingHold.reference, Job.status)
                .join(Job, Job.id == PendingHold.reference)
                .where(Job.status.not_in(UNFINISHED))
            ).all()
            for reference, status in rows:
                settle_in(session, reference, JobStatus(status))
        return len(rows)

    def claim_deliveries(
        self, replica: str, lease_s: float, limit: int, skip_owners: Collection[str] = ()
    ) -> list[tuple[WebhookDelivery, str]]:
        """Claim due deliveries (with their job's owner) that no live replica holds, none
        of ``skip_owners`` (at their limit here), so those cannot crowd out the others."""
        now = time.time()
        candidates = (
            select(WebhookDelivery.id)
            .join(Job, Job.id == WebhookDelivery.job_id)
            .where(WebhookDelivery.next_attempt_at <= now, _lapsed(WebhookDelivery, now))
            .order_by(WebhookDelivery.next_attempt_at)
            .limit(limit)
            .with_for_update(skip_locked=True, of=WebhookDelivery)
        )
        if skip_owners:
            candidates = candidates.where(Job.owner.not_in(skip_owners))
        with self.db.session() as session:
            ids = (
                session.execute(
                    update(WebhookDelivery)
                    .where(
                        WebhookDelivery.id.in_(candidates.scalar_subquery()),
                        _lapsed(WebhookDelivery, now),
                    )
                    .values(claimed_by=replica, lease_until=now + lease_s)
                    .returning(WebhookDelivery.id)
                )
                .scalars()
                .all()
            )
            if not ids:
                return []
            query = (
                select(WebhookDelivery, Job.owner)
                .join(Job, Job.id == WebhookDelivery.job_id)
                .where(WebhookDelivery.id.in_(ids))
                .order_by(WebhookDelivery.next_attempt_at)
            )
            return [(delivery, owner) for delivery, owner in session.execute(query)]

    def unclaim_delivery(self, delivery_id: int, replica: str) -> None:
        with self.db.session() as session:
            session.execute(
                update(WebhookDelivery)
                .where(WebhookDelivery.id == delivery_id, WebhookDelivery.claimed_by == replica)
                .values(lease_until=None)
            )

    def delivery_done(self, delivery_id: int, attempts: int) -> None:
        with self.db.session() as session:
            session.execute(
                update(WebhookDelivery)
                .where(WebhookDelivery.id == delivery_id)
                .values(
                    attempts=attempts,
                    delivered_at=time.time(),
                    next_attempt_at=None,
                    lease_until=None,
                )
            )

    def delivery_failed(
        self, delivery_id: int, attempts: int, error: str, retry_at: float | None
    ) -> None:
        with self.db.session() as session:
            session.execute(
                update(WebhookDelivery)
                .where(WebhookDelivery.id == delivery_id)
                .values(
                    attempts=attempts,
                    last_error=error[:500],
                    next_attempt_at=retry_at,
                    lease_until=None,
                )
            )
