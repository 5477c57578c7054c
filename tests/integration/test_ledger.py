"""The credits ledger on real databases (SQLite and PostgreSQL)."""

from __future__ import annotations

from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import pytest
import sqlalchemy as sa
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext

from zimage_server.accounts import KeyService
from zimage_server.billing import Ledger, Pricing, format_credits, to_micro
from zimage_server.core.errors import InsufficientCredits
from zimage_server.store.db import Database
from zimage_server.store.models import Base, LedgerEntry


@pytest.fixture
def db(database_url: str) -> Iterator[Database]:
    database = Database(database_url)
    database.upgrade()
    yield database
    database.dispose()


def test_migrations_match_the_models(db: Database) -> None:
    with db.engine.connect() as connection:
        diff = compare_metadata(MigrationContext.configure(connection), Base.metadata)
    assert diff == []


def test_concurrent_holds_never_overdraw(db: Database) -> None:
    ledger = Ledger(db)
    keys = KeyService(db, ledger)
    _, info = keys.create("race", credits=to_micro(5))
    key_id = keys.key_id(info.prefix)

    def attempt(i: int) -> bool:
        try:
            ledger.hold(key_id, to_micro(1), f"req-{i}")
        except InsufficientCredits:
            return False
        return True

    with ThreadPoolExecutor(max_workers=20) as pool:
        results = list(pool.map(attempt, range(20)))
    assert results.count(True) == 5
    usage = ledger.usage(key_id)
    assert usage.balance == 0 and usage.ledger_sum == 0 and usage.images == 5


def test_release_is_idempotent_and_restores_the_balance(db: Database) -> None:
    ledger = Ledger(db)
    keys = KeyService(db, ledger)
    _, info = keys.create("refund", credits=to_micro(2))
    key_id = keys.key_id(info.prefix)
    assert ledger.hold(key_id, to_micro(1.5), "req") == to_micro(0.5)
    assert ledger.release(key_id, to_micro(1.5), "req") is True
    assert ledger.release(key_id, to_micro(1.5), "req") is False
    usage = ledger.usage(key_id)
    assert usage.balance == to_micro(2) == usage.ledger_sum and usage.images == 0
    with db.session() as session:
        kinds = session.execute(sa.select(LedgerEntry.kind).order_by(LedgerEntry.id)).scalars()
        assert list(kinds) == ["top_up", "hold", "release"]


def test_insufficient_credits_message_has_price_and_balance(db: Database) -> None:
    ledger = Ledger(db)
    keys = KeyService(db, ledger)
    _, info = keys.create("poor", credits=to_micro(0.25))
    with pytest.raises(InsufficientCredits) as error:
        ledger.hold(keys.key_id(info.prefix), to_micro(1), "req")
    assert "costs 1 credits" in error.value.message and "balance is 0.25" in error.value.message


def test_keys_are_stored_only_as_hashes(db: Database) -> None:
    key, info = KeyService(db, Ledger(db)).create("hashed")
    with db.engine.connect() as connection:
        dump = " ".join(str(row) for row in connection.execute(sa.text("SELECT * FROM api_keys")))
    # The secret may itself contain "_": split at most twice (zk_<hex prefix>_<secret>).
    assert info.prefix in dump and key not in dump and key.split("_", 2)[2] not in dump


@pytest.mark.parametrize(
    ("size", "steps", "credits"),
    [
        ((1024, 1024), 8, "1"),
        ((2048, 2048), 8, "4"),
        ((1024, 1024), 16, "2"),
        ((256, 256), 1, "0.01"),
    ],
)
def test_pricing(size: tuple[int, int], steps: int, credits: str) -> None:
    assert format_credits(Pricing(1.0, 0.01).price(*size, steps)) == credits
