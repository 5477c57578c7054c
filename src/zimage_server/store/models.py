"""Tables. Credits are stored as integer micro-credits, so sums are exact everywhere."""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import BigInteger, DateTime, Float, ForeignKey, String, Text, UniqueConstraint, func
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

MAX_IDEMPOTENCY_KEY = 200  # characters; longer keys are refused before they reach a query


class Base(DeclarativeBase):
    pass


class ApiKey(Base):
    """An API key. Only its SHA-256 is stored; ``prefix`` identifies it in lists and logs."""

    __tablename__ = "api_keys"

    id: Mapped[int] = mapped_column(primary_key=True)
    prefix: Mapped[str] = mapped_column(String(32), unique=True)
    key_hash: Mapped[str] = mapped_column(String(64))
    name: Mapped[str] = mapped_column(String(200))
    scopes: Mapped[str] = mapped_column(String(200), default="generate")
    disabled: Mapped[bool] = mapped_column(default=False)
    balance: Mapped[int] = mapped_column(BigInteger, default=0)
    rate_limit: Mapped[str | None] = mapped_column(String(64))
    max_in_flight: Mapped[int | None]
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), server_default=func.now())


class LedgerEntry(Base):
    """Append-only: top-ups (+), holds for a request (-) and releases of failed holds (+).

    The balance on ``api_keys`` always equals the sum of a key's entries; a settled hold
    that was never released is the charge for a delivered image. (reference, kind) is
    unique, so a hold is released at most once.
    """

    __tablename__ = "ledger"
    __table_args__ = (UniqueConstraint("reference", "kind", name="uq_ledger_reference_kind"),)

    id: Mapped[int] = mapped_column(primary_key=True)
    key_id: Mapped[int] = mapped_column(ForeignKey("api_keys.id"), index=True)
    amount: Mapped[int] = mapped_column(BigInteger)
    kind: Mapped[str] = mapped_column(String(16))
    reference: Mapped[str | None] = mapped_column(String(64))
    note: Mapped[str | None] = mapped_column(String(200))
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), server_default=func.now())


class PendingHold(Base):
    """A hold not yet settled: credits taken for a request still running.

    Settling deletes the row, in the transaction that charges (capture) or refunds
    (release) it, so exactly one of the two wins. A request hold carries ``expires_at``
    (its deadline plus a grace): past it, no live request can still capture it, and the
    sweeper releases it, which is how a server killed mid-render gives the credits back.
    A job's hold has none: the job's own terminal transaction settles it.
    """

    __tablename__ = "pending_holds"

    reference: Mapped[str] = mapped_column(String(64), primary_key=True)
    key_id: Mapped[int] = mapped_column(ForeignKey("api_keys.id"), index=True)
    amount: Mapped[int] = mapped_column(BigInteger)
    created_at: Mapped[float] = mapped_column(Float)
    expires_at: Mapped[float | None] = mapped_column(Float, index=True)


class Job(Base):
    """An async (v2) request. A row exists before the render is queued, so a restart can
    run again whatever was QUEUED or PROCESSING. Times are epoch seconds (portable).

    ``claimed_by``/``lease_until``: the API process running it, and until when its lease
    (renewed by heartbeats) holds; past that, any live process that can render its
    ``task`` (the params' own, copied here for the claim's query) may claim it."""

    __tablename__ = "jobs"
    __table_args__ = (
        UniqueConstraint("owner", "idempotency_key", name="uq_jobs_owner_idempotency_key"),
    )

    id: Mapped[str] = mapped_column(String(32), primary_key=True)
    owner: Mapped[str] = mapped_column(String(32), index=True)  # key id, or "anonymous"
    key_id: Mapped[int | None] = mapped_column(ForeignKey("api_keys.id"))
    status: Mapped[str] = mapped_column(String(16), index=True)
    params: Mapped[str] = mapped_column(Text)  # the validated body, JSON; images in JobInputs
    task: Mapped[str] = mapped_column(String(32), server_default="text-to-image")
    seed: Mapped[int] = mapped_column(BigInteger)
    price: Mapped[int] = mapped_column(BigInteger, default=0)
    webhook_url: Mapped[str | None] = mapped_column(String(2000))
    base_url: Mapped[str] = mapped_column(String(500))  # for absolute URLs in webhooks
    idempotency_key: Mapped[str | None] = mapped_column(String(MAX_IDEMPOTENCY_KEY))
    body_hash: Mapped[str] = mapped_column(String(64))
    created_at: Mapped[float] = mapped_column(Float)
    deadline_at: Mapped[float] = mapped_column(Float)
    started_at: Mapped[float | None] = mapped_column(Float)
    finished_at: Mapped[float | None] = mapped_column(Float)
    expires_at: Mapped[float | None] = mapped_column(Float)
    error: Mapped[str | None] = mapped_column(Text)
    output_id: Mapped[str | None] = mapped_column(String(64))
    metrics: Mapped[str | None] = mapped_column(Text)  # JSON
    claimed_by: Mapped[str | None] = mapped_column(String(64))
    lease_until: Mapped[float | None] = mapped_column(Float, index=True)


class JobInputs(Base):
    """A v2 job's input images (PNG data URIs at render size, tens of MB at 2048 px), apart
    from its row: polls and lists read ``jobs`` and must not carry them. Read only to run
    the job (at submit or takeover); deleted in the job's terminal transaction."""

    __tablename__ = "job_inputs"

    job_id: Mapped[str] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"), primary_key=True)
    images: Mapped[str] = mapped_column(Text)  # JSON: field name -> data URI


class WebhookDelivery(Base):
    """One webhook to send; retried with back-off until delivered or out of attempts.
    An attempt runs under a lease (``claimed_by``, ``lease_until``), like a job's."""

    __tablename__ = "webhook_deliveries"

    id: Mapped[int] = mapped_column(primary_key=True)
    job_id: Mapped[str] = mapped_column(ForeignKey("jobs.id"), index=True)
    url: Mapped[str] = mapped_column(String(2000))
    payload: Mapped[str] = mapped_column(Text)
    attempts: Mapped[int] = mapped_column(default=0)
    next_attempt_at: Mapped[float | None] = mapped_column(Float, index=True)
    delivered_at: Mapped[float | None] = mapped_column(Float)
    last_error: Mapped[str | None] = mapped_column(String(500))
    claimed_by: Mapped[str | None] = mapped_column(String(64))
    lease_until: Mapped[float | None] = mapped_column(Float, index=True)
