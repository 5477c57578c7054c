"""Holds, releases and top-ups, each one transaction that moves the balance and appends
a ledger entry together.

The hold is a conditional ``UPDATE ... WHERE balance >= price``: the database serialises
concurrent holds on the row, so a balance never goes negative on SQLite or PostgreSQL,
without application locks.

The hold and the release run on every request, so their statements are Core statements
built once (with bound parameters) and run on a plain connection: the same SQL and the
same single transaction, without the ORM's per-statement work.
"""

from __future__ import annotations

from dataclasses import dataclass

from sqlalchemy import Connection, bindparam, func, insert, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from zimage_server.billing.pricing import format_credits
from zimage_server.core.errors import InsufficientCredits
from zimage_server.store.db import Database
from zimage_server.store.models import ApiKey, LedgerEntry

_KEYS = ApiKey.metadata.tables[ApiKey.__tablename__]
_LEDGER = LedgerEntry.metadata.tables[LedgerEntry.__tablename__]
_TAKE = (
    update(_KEYS)
    .where(_KEYS.c.id == bindparam("key_id"), _KEYS.c.balance >= bindparam("amount"))
    .values(balance=_KEYS.c.balance - bindparam("amount"))
    .returning(_KEYS.c.balance)
)
_GIVE = (
    update(_KEYS)
    .where(_KEYS.c.id == bindparam("key_id"))
    .values(balance=_KEYS.c.balance + bindparam("amount"))
)
_BALANCE = select(_KEYS.c.balance).where(_KEYS.c.id == bindparam("key_id"))
_ENTRY = insert(_LEDGER)


@dataclass(frozen=True)
class Usage:
    images: int
    spent: int  # micro-credits
    balance: int
    ledger_sum: int


class Ledger:
    def __init__(self, db: Database) -> None:
        self.db = db

    def hold(self, key_id: int, amount: int, reference: str) -> int:
        """Take ``amount`` from the balance for request ``reference``; returns the new balance.
        Committed (and, on SQLite, fsynced) before it returns."""
        with self.db.transaction() as connection:
            return hold_in(connection, key_id, amount, reference)

    def release(self, key_id: int, amount: int, reference: str) -> bool:
        """Give a hold back (the request failed). Idempotent: False if already released."""
        entry = {"key_id": key_id, "amount": amount, "kind": "release", "reference": reference}
        try:
            with self.db.transaction() as connection:
                connection.execute(_ENTRY, entry)
                connection.execute(_GIVE, {"key_id": key_id, "amount": amount})
        except IntegrityError:
            return False
        return True

    def top_up(self, key_id: int, amount: int, note: str | None = None) -> int:
        with self.db.session() as session:
            balance = session.execute(
                update(ApiKey)
                .where(ApiKey.id == key_id)
                .values(balance=ApiKey.balance + amount)
                .returning(ApiKey.balance)
            ).scalar_one()
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
        totals = {kind: (int(count), int(total)) for kind, count, total in entries}
        holds, held = totals.get("hold", (0, 0))
        releases, released = totals.get("release", (0, 0))
        ledger_sum = sum(total for _, total in totals.values())
        return Usage(holds - releases, -(held + released), int(balance), ledger_sum)


def hold_in(transaction: Connection | Session, key_id: int, amount: int, reference: str) -> int:
    """The hold, inside the caller's transaction (e.g. the one that creates a job)."""
    ids = {"key_id": key_id, "amount": amount}
    new_balance = transaction.execute(_TAKE, ids).scalar_one_or_none()
    if new_balance is None:
        balance = transaction.execute(_BALANCE, ids).scalar_one()
        raise InsufficientCredits(
            f"Insufficient credits: this image costs {format_credits(amount)} credits "
            f"and the key's balance is {format_credits(balance)}.",
        )
    entry = {"key_id": key_id, "amount": -amount, "kind": "hold", "reference": reference}
    transaction.execute(_ENTRY, entry)
    return int(new_balance)
