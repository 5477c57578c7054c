"""Holds, settlements and top-ups, each one transaction that moves the balance and appends
a ledger entry together.

A request's credits move in two steps. The hold takes them (a conditional ``UPDATE ...
WHERE balance >= price``: the database serialises concurrent holds on the row, so a
balance never goes negative, without application locks) and records a pending hold. The
settlement deletes that pending record in the same transaction that either keeps the
credits (capture: the client got its image) or gives them back (release), so exactly one
of the two happens, once. A pending hold whose request can no longer be alive (a server
killed mid-render, a database that failed while refunding) is released by the sweep.

The per-request statements are Core statements built once (with bound parameters) and
run on a plain connection: the same SQL without the ORM's per-statement work.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

from sqlalchemy import Connection, bindparam, delete, func, insert, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from zimage_server.billing.pricing import format_credits
from zimage_server.core.errors import Forbidden, InsufficientCredits, InvalidRequest
from zimage_server.store.db import Database
from zimage_server.store.models import ApiKey, LedgerEntry, PendingHold

MAX_BALANCE = 2**63 - 1  # the ledger's BIGINT; SQLite would silently go to REAL beyond it

_KEYS = ApiKey.metadata.tables[ApiKey.__tablename__]
_LEDGER = LedgerEntry.metadata.tables[LedgerEntry.__tablename__]
_HOLDS = PendingHold.metadata.tables[PendingHold.__tablename__]
_TAKE = (
    update(_KEYS)
    .where(
        _KEYS.c.id == bindparam("key_id"),
        _KEYS.c.balance >= bindparam("amount"),
        _KEYS.c.disabled.is_(False),  # a key disabled since it was verified (a cached one)
    )
    .values(balance=_KEYS.c.balance - bindparam("amount"))
    .returning(_KEYS.c.balance)
)
_GIVE = (
    update(_KEYS)
    .where(_KEYS.c.id == bindparam("key_id"))
    .values(balance=_KEYS.c.balance + bindparam("amount"))
)
_BALANCE = select(_KEYS.c.balance, _KEYS.c.disabled, _KEYS.c.prefix).where(
    _KEYS.c.id == bindparam("key_id")
)
_ENTRY = insert(_LEDGER)
_PEND = insert(_HOLDS)
_SETTLE = (
    delete(_HOLDS)
    .where(_HOLDS.c.reference == bindparam("reference"))
    .returning(_HOLDS.c.key_id, _HOLDS.c.amount)
)
_EXPIRED = (
    select(_HOLDS.c.reference)
    .where(_HOLDS.c.expires_at < bindparam("now"))
    .order_by(_HOLDS.c.expires_at)
    .limit(500)
)


class KeyHints:
    """What this process last saw of each key, for the request path: whether a hold can
    run beside the render (the balance covered the price), whether a key it trusts
    without a lookup was found disabled. The database decides; these only order the work.
    Single dict and set operations: safe from the loop and from threads."""

    def __init__(self) -> None:
        self.balance: dict[int, int] = {}
        self.disabled: set[int] = set()

    def held(self, key_id: int, balance: int) -> int:
        self.balance[key_id] = balance
        return balance

    def looked_up(self, key_id: int, balance: int) -> None:
        self.balance[key_id] = balance
        self.disabled.discard(key_id)

    @contextmanager
    def watching(self, key_id: int) -> Iterator[None]:
        """Around a hold: a refusal forgets the balance (and marks a disabled key)."""
        try:
            yield
        except (InsufficientCredits, Forbidden) as exc:
            self.balance.pop(key_id, None)
            if isinstance(exc, Forbidden):
                self.disabled.add(key_id)
            raise


@dataclass(frozen=True)
class Usage:
    images: int
    spent: int  # micro-credits
    balance: int
    ledger_sum: int
    pending: int  # micro-credits held for requests still running


class Ledger:
    """``sync_holds=False`` lets a request's hold ride on the fsync of the commit that
    settles it (``ZIMAGE_LEDGER_SYNC_HOLDS``, README): a crash of the machine or the
    database can then lose the holds of requests in flight (which the sweep would have
    released), never a settled charge or refund."""

    def __init__(self, db: Database, sync_holds: bool = True) -> None:
        self.db = db
        self.sync_holds = sync_holds
        self.hints = KeyHints()

    def hold(self, key_id: int, amount: int, reference: str, expires_at: float) -> int:
        """Take ``amount`` for request ``reference``, pending until settled or
        ``expires_at``; returns the new balance. Committed (fsynced, unless
        ``sync_holds`` is off) before it returns."""
        with self.hints.watching(key_id), self.db.transaction(synced=self.sync_holds) as tx:
            return self.hints.held(key_id, hold_in(tx, key_id, amount, reference, expires_at))

    def capture(self, reference: str) -> bool:
        """Keep a pending hold (the image was delivered). False when it is no longer
        pending: the sweep released it, so the request must not deliver."""
        with self.db.transaction() as connection:
            return connection.execute(_SETTLE, {"reference": reference}).first() is not None

    def release(self, reference: str, keep: int = 0) -> bool:
        """Give a pending hold back, less ``keep`` (what a cancelled render used).
        Idempotent: False when it was already settled."""
        try:
            with self.db.transaction() as connection:
                return release_in(connection, reference, keep)
        except IntegrityError:
            return False

    def sweep(self, now: float | None = None) -> int:
        """Release every request hold past its expiry: no live request can settle it."""
        with self.db.transaction() as connection:
            expired = connection.execute(_EXPIRED, {"now": now or time.time()}).scalars().all()
        return sum(self.release(reference) for reference in expired)

    def top_up(self, key_id: int, amount: int, note: str | None = None) -> int:
        """Add credits; refused (not wrapped into a float) beyond the ledger's range."""
        with self.db.session() as session:
            balance = session.execute(
                update(ApiKey)
                .where(ApiKey.id == key_id, ApiKey.balance <= MAX_BALANCE - amount)
                .values(balance=ApiKey.balance + amount)
                .returning(ApiKey.balance)
            ).scalar_one_or_none()
            if balance is None:
                raise InvalidRequest(
                    f"Invalid 'credits': the balance would exceed the maximum of "
                    f"{format_credits(MAX_BALANCE)} credits.",
                    field="credits",
                )
            session.execute(
                insert(LedgerEntry).values(key_id=key_id, amount=amount, kind="top_up", note=note)
            )
            return int(balance)

    def usage(self, key_id: int) -> Usage:
        with self.db.session() as session:
            entries = session.execute(
                select(
                    LedgerEntry.kind, func.count(), func.coalesce(func.sum(LedgerEntry.amount), 0)
                )
                .where(LedgerEntry.key_id == key_id)
                .group_by(LedgerEntry.kind)
            ).all()
            balance = session.execute(
                select(ApiKey.balance).where(ApiKey.id == key_id)
            ).scalar_one()
            pending = session.execute(
                select(func.coalesce(func.sum(PendingHold.amount), 0)).where(
                    PendingHold.key_id == key_id
                )
            ).scalar_one()
        totals = {kind: (int(count), int(total)) for kind, count, total in entries}
        holds, held = totals.get("hold", (0, 0))
        releases, released = totals.get("release", (0, 0))
        ledger_sum = sum(total for _, total in totals.values())
        return Usage(holds - releases, -(held + released), int(balance), ledger_sum, int(pending))


def hold_in(
    transaction: Connection | Session,
    key_id: int,
    amount: int,
    reference: str,
    expires_at: float | None = None,
) -> int:
    """The hold, inside the caller's transaction (e.g. the one that creates a job, whose
    hold has no expiry: the job's terminal transaction settles it)."""
    ids = {"key_id": key_id, "amount": amount}
    new_balance = transaction.execute(_TAKE, ids).scalar_one_or_none()
    if new_balance is None:
        balance, disabled, prefix = transaction.execute(_BALANCE, ids).one()
        if disabled:
            raise Forbidden(f"API key {prefix} is disabled.")
        raise InsufficientCredits(
            f"Insufficient credits: this image costs {format_credits(amount)} credits "
            f"and the key's balance is {format_credits(balance)}.",
        )
    entry = {"key_id": key_id, "amount": -amount, "kind": "hold", "reference": reference}
    transaction.execute(_ENTRY, entry)
    pending = {
        "reference": reference,
        "key_id": key_id,
        "amount": amount,
        "created_at": time.time(),
        "expires_at": expires_at,
    }
    transaction.execute(_PEND, pending)
    return int(new_balance)


def capture_in(transaction: Connection | Session, reference: str) -> bool:
    """Keep a pending hold inside the caller's transaction; False if already settled."""
    return transaction.execute(_SETTLE, {"reference": reference}).first() is not None


def release_in(transaction: Connection | Session, reference: str, keep: int = 0) -> bool:
    """Give a pending hold back (less ``keep``) inside the caller's transaction; False if
    it was already settled, so a refund can never be paid twice."""
    row = transaction.execute(_SETTLE, {"reference": reference}).first()
    if row is None:
        return False
    key_id, amount = int(row[0]), int(row[1])
    back = amount - min(max(keep, 0), amount)
    if back:
        entry = {"key_id": key_id, "amount": back, "kind": "release", "reference": reference}
        transaction.execute(_ENTRY, entry)
        transaction.execute(_GIVE, {"key_id": key_id, "amount": back})
    return True
