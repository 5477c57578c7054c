"""Database engine, sessions and migrations (SQLite by default, PostgreSQL by URL)."""

from __future__ import annotations

import fcntl
import logging
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from alembic import command
from alembic.config import Config
from sqlalchemy import Connection, Engine, create_engine, event, text
from sqlalchemy.exc import InterfaceError, OperationalError
from sqlalchemy.orm import Session, sessionmaker

from zimage_server.core.errors import StoreUnavailable

log = logging.getLogger("zimage.store")
_LOCK_KEY = 0x7A696D6167  # "zimag": the advisory lock that serialises migrations


class Database:
    """One SQLAlchemy engine and session factory per process."""

    def __init__(self, url: str) -> None:
        self.url = url
        self._file: _WatchedFile | None = None
        if url.startswith("sqlite"):
            path = url.split("///", 1)[-1]
            if path and path != ":memory:":
                Path(path).parent.mkdir(parents=True, exist_ok=True)
            self.engine: Engine = create_engine(url, connect_args={"timeout": 30})
            event.listen(self.engine, "connect", _sqlite_pragmas)
            self._unsynced = self.engine
            if path and path != ":memory:" and "mode=memory" not in url:
                self._file = _WatchedFile(Path(path.split("?", 1)[0]), self.engine)
                # Commits that a later fsync makes durable (see ``transaction``).
                self._unsynced = create_engine(url, connect_args={"timeout": 30})
                event.listen(self._unsynced, "connect", _sqlite_pragmas_unsynced)
        else:
            self.engine = create_engine(url, pool_pre_ping=True, pool_size=10, max_overflow=20)
            self._unsynced = self.engine
        self._sessions = sessionmaker(self.engine, expire_on_commit=False)

    def problem(self) -> str | None:
        """Why the store cannot be used until a restart (its file is gone), or None."""
        return self._file.problem() if self._file is not None else None

    def _check(self) -> None:
        why = self.problem()
        if why is not None:
            raise StoreUnavailable(f"{why}; nothing was charged.", retry_after=60)

    @contextmanager
    def session(self) -> Iterator[Session]:
        """A transaction: committed on success, rolled back on any error.

        A database that cannot be reached becomes ``StoreUnavailable`` (503), never a 500.
        """
        self._check()
        with _unavailable_as_503(), self._sessions.begin() as session:
            yield session

    @contextmanager
    def transaction(self, synced: bool = True) -> Iterator[Connection]:
        """The same, as a Core connection: for the per-request statements (key lookup,
        hold), built once and run without the ORM's per-statement work. On SQLite a hold
        took ~2.5 ms through the ORM session and takes ~0.5 ms so, most of it the fsync.

        ``synced=False`` commits without waiting for the disk (SQLite ``synchronous=NORMAL``,
        PostgreSQL ``synchronous_commit=off``): visible at once, durable with the next synced
        commit of any connection (both logs are written in order), lost by a power cut or
        an OS (or PostgreSQL) crash before that one."""
        self._check()
        engine = self.engine if synced else self._unsynced
        with _unavailable_as_503(), engine.begin() as connection:
            if not synced and connection.dialect.name == "postgresql":
                connection.execute(text("SET LOCAL synchronous_commit TO OFF"))
            yield connection

    def upgrade(self, revision: str = "head") -> None:
        """Apply every Alembic migration not yet applied (up to ``revision``: tests build
        older stores). Several API processes starting at once take turns (an advisory
        lock on PostgreSQL, a file lock beside a SQLite file): otherwise two would both
        create the first tables, and one would fail."""
        with self._migration_lock(), self.engine.begin() as connection:
            if connection.dialect.name == "postgresql":
                connection.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": _LOCK_KEY})
            config = Config()
            config.set_main_option("script_location", "zimage_server.store:migrations")
            config.attributes["connection"] = connection
            command.upgrade(config, revision)

    @contextmanager
    def _migration_lock(self) -> Iterator[None]:
        if self._file is None:
            yield
            return
        with open(f"{self._file.path}.migrate.lock", "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)

    def dispose(self) -> None:
        self.engine.dispose()
        self._unsynced.dispose()


class _WatchedFile:
    """The SQLite file this process opened, by device and inode.

    Deleted (or replaced) under a running server, SQLite keeps writing to the open, unlinked
    file: every request succeeds and everything is lost at the next start. A ``stat`` per
    transaction (a few microseconds) catches that, and the store fails closed instead.
    """

    def __init__(self, path: Path, engine: Engine) -> None:
        self.path = path
        with engine.connect():  # creates the file: the identity to hold on to
            pass
        self._identity = _identity(path)
        self._reported = False

    def problem(self) -> str | None:
        if _identity(self.path) == self._identity:
            return None
        why = (
            f"The database file {self.path} was removed or replaced while the server ran; "
            "restart the server (with the file restored from a backup, or a new, empty one)"
        )
        if not self._reported:
            self._reported = True
            log.critical("%s. Requests that need the store are refused until then.", why)
        return why


def _identity(path: Path) -> tuple[int, int] | None:
    try:
        stat = os.stat(path)
    except OSError:
        return None
    return stat.st_dev, stat.st_ino


@contextmanager
def _unavailable_as_503() -> Iterator[None]:
    try:
        yield
    except (OperationalError, InterfaceError) as exc:
        if isinstance(exc, OperationalError) and _is_busy(exc):
            raise
        raise StoreUnavailable(
            "The database is unavailable; nothing was charged. Retry shortly.", retry_after=5
        ) from exc


def _sqlite_pragmas(dbapi_connection: Any, _record: Any) -> None:
    # WAL lets readers run beside the one writer; busy_timeout queues writers instead of
    # failing them; foreign keys are off by default in SQLite. synchronous=FULL is said
    # outright (it is WAL's usual default, but builds may lower it to NORMAL): every
    # commit is fsynced, so a credit hold survives a power cut before the render starts.
    # It costs one fsync per commit (~0.3 ms here); NORMAL would only lose that guarantee.
    cursor = dbapi_connection.cursor()
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA synchronous=FULL")
    cursor.execute("PRAGMA busy_timeout=30000")
    cursor.execute("PRAGMA foreign_keys=ON")
    cursor.close()


def _sqlite_pragmas_unsynced(dbapi_connection: Any, record: Any) -> None:
    _sqlite_pragmas(dbapi_connection, record)
    dbapi_connection.execute("PRAGMA synchronous=NORMAL")


def _is_busy(exc: OperationalError) -> bool:
    # SQLite "database is locked" after busy_timeout is contention, not an outage.
    return "locked" in str(exc.orig).lower()
