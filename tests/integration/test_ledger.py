"""The credits ledger on real databases (SQLite and PostgreSQL)."""

from __future__ import annotations

import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import pytest
import sqlalchemy as sa
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext

from zimage_server.accounts import KeyService
from zimage_server.billing import Ledger, Pricing, format_credits, to_micro
from zimage_server.billing.ledger import MAX_BALANCE
from zimage_server.core.errors import InsufficientCredits, InvalidRequest
from zimage_server.store.db import Database
from zimage_server.store.models import Base, LedgerEntry

LATER = time.time() + 3600


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


@pytest.mark.parametrize("sync_holds", [True, False])
def test_concurrent_holds_never_overdraw(db: Database, sync_holds: bool) -> None:
    ledger = Ledger(db, sync_holds=sync_holds)
    keys = KeyService(db, ledger)
    _, info = keys.create("race", credits=to_micro(5))
    key_id = keys.key_id(info.prefix)

    def attempt(i: int) -> bool:
        try:
            ledger.hold(key_id, to_micro(1), f"req-{i}", LATER)
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
    assert ledger.hold(key_id, to_micro(1.5), "req", LATER) == to_micro(0.5)
    assert ledger.usage(key_id).pending == to_micro(1.5)
    assert ledger.release("req") is True
    assert ledger.release("req") is False
    assert ledger.capture("req") is False  # settled once: a late capture cannot charge
    usage = ledger.usage(key_id)
    assert usage.balance == to_micro(2) == usage.ledger_sum and usage.images == 0
    with db.session() as session:
        kinds = session.execute(sa.select(LedgerEntry.kind).order_by(LedgerEntry.id)).scalars()
        assert list(kinds) == ["top_up", "hold", "release"]


@pytest.mark.parametrize("sync_holds", [True, False])
def test_capture_and_release_race_exactly_one_wins(db: Database, sync_holds: bool) -> None:
    """A completion and a refund of the same hold, at once, 20 times: never both."""
    ledger = Ledger(db, sync_holds=sync_holds)
    keys = KeyService(db, ledger)
    _, info = keys.create("race-settle", credits=to_micro(20))
    key_id = keys.key_id(info.prefix)
    outcomes = []
    with ThreadPoolExecutor(max_workers=2) as pool:
        for i in range(20):
            ledger.hold(key_id, to_micro(1), f"settle-{i}", LATER)
            capture = pool.submit(ledger.capture, f"settle-{i}")
            release = pool.submit(ledger.release, f"settle-{i}")
            outcomes.append((capture.result(), release.result()))
    assert all(captured != released for captured, released in outcomes)
    charged = sum(captured for captured, _ in outcomes)
    usage = ledger.usage(key_id)
    assert usage.balance == to_micro(20 - charged) == usage.ledger_sum and usage.pending == 0


def test_unsynced_commits_skip_only_the_wait_for_the_disk(db: Database) -> None:
    """``synced=False`` (holds under ``ZIMAGE_LEDGER_SYNC_HOLDS=false``) commits without
    the fsync; every other transaction keeps it."""
    setting = {"sqlite": "PRAGMA synchronous", "postgresql": "SHOW synchronous_commit"}
    query = sa.text(setting[db.engine.dialect.name])
    with db.transaction() as connection:
        synced = str(connection.execute(query).scalar_one())
    with db.transaction(synced=False) as connection:
        unsynced = str(connection.execute(query).scalar_one())
    with db.transaction() as connection:
        after = str(connection.execute(query).scalar_one())
    assert (synced, unsynced, after) in {("2", "1", "2"), ("on", "off", "on")}


def test_partial_release_keeps_what_was_used(db: Database) -> None:
    ledger = Ledger(db)
    keys = KeyService(db, ledger)
    _, info = keys.create("partial", credits=to_micro(1))
    key_id = keys.key_id(info.prefix)
    ledger.hold(key_id, to_micro(1), "cancelled-mid-render", LATER)
    assert ledger.release("cancelled-mid-render", keep=to_micro(0.25)) is True
    usage = ledger.usage(key_id)
    assert usage.balance == to_micro(0.75) == usage.ledger_sum and usage.pending == 0


def test_sweep_releases_only_expired_holds(db: Database) -> None:
    """A hold no live request can settle (its server died) comes back; a live one stays."""
    ledger = Ledger(db)
    keys = KeyService(db, ledger)
    _, info = keys.create("sweep", credits=to_micro(3))
    key_id = keys.key_id(info.prefix)
    now = time.time()
    ledger.hold(key_id, to_micro(1), "dead-request", now - 1)
    ledger.hold(key_id, to_micro(1), "live-request", now + 60)
    assert ledger.sweep(now) == 1
    assert ledger.sweep(now) == 0
    assert ledger.capture("live-request") is True
    assert ledger.capture("dead-request") is False
    usage = ledger.usage(key_id)
    assert usage.balance == to_micro(2) == usage.ledger_sum and usage.pending == 0


def test_a_balance_beyond_the_ledger_range_is_refused(db: Database) -> None:
    """SQLite would silently turn an overflowing integer into a float; PostgreSQL would
    raise a DataError (a 500). Both refuse it by name instead."""
    ledger = Ledger(db)
    keys = KeyService(db, ledger)
    _, info = keys.create("rich", credits=MAX_BALANCE - 5)
    key_id = keys.key_id(info.prefix)
    with pytest.raises(InvalidRequest) as error:
        ledger.top_up(key_id, 6)
    assert error.value.field == "credits" and "maximum" in error.value.message
    assert ledger.top_up(key_id, 5) == MAX_BALANCE
    usage = ledger.usage(key_id)
    assert usage.balance == MAX_BALANCE == usage.ledger_sum
    assert isinstance(usage.balance, int)


def test_insufficient_credits_message_has_price_and_balance(db: Database) -> None:
    ledger = Ledger(db)
    keys = KeyService(db, ledger)
    _, info = keys.create("poor", credits=to_micro(0.25))
    with pytest.raises(InsufficientCredits) as error:
        ledger.hold(keys.key_id(info.prefix), to_micro(1), "req", LATER)
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
