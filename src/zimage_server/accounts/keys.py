"""API keys: generated with ``secrets``, shown once, stored only as a SHA-256 hash.

A key reads ``zk_<prefix>_<secret>``. The prefix is public (lists, logs); the lookup is by
prefix and the hash comparison is constant-time, against a dummy hash when the prefix is
unknown, so timing reveals nothing about which keys exist.
"""

from __future__ import annotations

import hashlib
import hmac
import re
import secrets
import threading
import time
from dataclasses import dataclass
from datetime import datetime

from sqlalchemy import bindparam, insert, select, update

from zimage_server.accounts.limits import parse_limit
from zimage_server.billing.ledger import Ledger
from zimage_server.core.errors import Forbidden, InvalidRequest, NotFound, Unauthenticated
from zimage_server.store.db import Database
from zimage_server.store.models import ApiKey

SCOPES = frozenset({"generate"})
_PREFIX = re.compile(r"[0-9a-f]{8}")  # secrets.token_hex(4), as ``create`` makes them
_DUMMY_HASH = hashlib.sha256(b"no such key").hexdigest()
_KEYS = ApiKey.metadata.tables[ApiKey.__tablename__]
# Every authenticated request runs this: a Core statement built once (see Ledger).
_LOOKUP = select(
    _KEYS.c.id,
    _KEYS.c.prefix,
    _KEYS.c.key_hash,
    _KEYS.c.disabled,
    _KEYS.c.scopes,
    _KEYS.c.rate_limit,
    _KEYS.c.max_in_flight,
    _KEYS.c.balance,
).where(_KEYS.c.prefix == bindparam("prefix"))


def _hash(key: str) -> str:
    # Keys carry 256 random bits, so a fast hash is safe; no salt or KDF is needed.
    return hashlib.sha256(key.encode()).hexdigest()


@dataclass(frozen=True)
class Principal:
    """An authenticated caller."""

    key_id: int
    prefix: str
    scopes: frozenset[str]
    rate_limit: str | None
    max_in_flight: int | None


@dataclass(frozen=True)
class KeyInfo:
    prefix: str
    name: str
    scopes: list[str]
    disabled: bool
    balance: int
    rate_limit: str | None
    max_in_flight: int | None
    created_at: datetime | None


def _info(row: ApiKey) -> KeyInfo:
    return KeyInfo(
        row.prefix,
        row.name,
        sorted(filter(None, row.scopes.split(","))),
        row.disabled,
        row.balance,
        row.rate_limit,
        row.max_in_flight,
        row.created_at,
    )


class KeyService:
    def __init__(self, db: Database, ledger: Ledger, cache_s: float = 0.0) -> None:
        self.db = db
        self.ledger = ledger
        self._verified = _Verified(cache_s)

    def create(
        self,
        name: str,
        credits: int = 0,
        scopes: frozenset[str] = SCOPES,
        rate_limit: str | None = None,
        max_in_flight: int | None = None,
    ) -> tuple[str, KeyInfo]:
        """Create a key; returns the plaintext (shown once) and its public info."""
        if credits < 0:
            raise InvalidRequest("Invalid 'credits': must be 0 or more.", field="credits")
        if rate_limit is not None:
            parse_limit(rate_limit)
        unknown = scopes - SCOPES
        if unknown:
            raise InvalidRequest(f"Unknown scopes {sorted(unknown)}: allowed {sorted(SCOPES)}.")
        prefix = secrets.token_hex(4)
        key = f"zk_{prefix}_{secrets.token_urlsafe(32)}"
        with self.db.session() as session:
            key_id = session.execute(
                insert(ApiKey)
                .values(
                    prefix=prefix,
                    key_hash=_hash(key),
                    name=name,
                    scopes=",".join(sorted(scopes)),
                    disabled=False,
                    balance=0,
                    rate_limit=rate_limit,
                    max_in_flight=max_in_flight,
                )
                .returning(ApiKey.id)
            ).scalar_one()
        if credits:
            self.ledger.top_up(key_id, credits, note="initial credits")
        return key, self.get(prefix)

    def authenticate(self, key: str | None, scope: str) -> Principal:
        if not key:
            raise Unauthenticated(
                "Missing API key: send it in the x-api-key header or as Authorization: Bearer."
            )
        parts = key.split("_")
        prefix = parts[1] if len(parts) >= 3 and parts[0] == "zk" else ""
        with self.db.transaction() as connection:
            row = connection.execute(_LOOKUP, {"prefix": prefix}).one_or_none()
        stored, digest = row.key_hash if row else _DUMMY_HASH, _hash(key)
        if not hmac.compare_digest(stored, digest) or row is None:
            raise Unauthenticated("Invalid API key.")
        if row.disabled:
            raise Forbidden(f"API key {row.prefix} is disabled.")
        scopes = frozenset(filter(None, row.scopes.split(",")))
        if scope not in scopes:
            raise Forbidden(f"API key {row.prefix} lacks the '{scope}' scope for this route.")
        principal = Principal(row.id, row.prefix, scopes, row.rate_limit, row.max_in_flight)
        self.ledger.hints.looked_up(row.id, row.balance)
        self._verified.put(digest, principal)
        return principal

    def cached(self, key: str | None, scope: str) -> Principal | None:
        """The key's principal if this process verified it within ``cache_s`` (no I/O:
        the event loop calls it), else None. A key seen disabled at a hold is dropped;
        one disabled elsewhere is refused by its next hold (403), then looked up again."""
        if not key:
            return None
        digest = _hash(key)
        principal = self._verified.get(digest)
        if principal is None or scope not in principal.scopes:
            return None
        if principal.key_id in self.ledger.hints.disabled:
            self._verified.drop(digest)
            return None
        return principal

    def _row(self, prefix: str) -> ApiKey:
        with self.db.session() as session:
            row = session.execute(
                select(ApiKey).where(ApiKey.prefix == prefix)
            ).scalar_one_or_none()
        if row is None:
            raise NotFound(_unknown_prefix(prefix))
        return row

    def get(self, prefix: str) -> KeyInfo:
        return _info(self._row(prefix))

    def list(self) -> list[KeyInfo]:
        with self.db.session() as session:
            rows = session.execute(select(ApiKey).order_by(ApiKey.id)).scalars().all()
        return [_info(row) for row in rows]

    def set_disabled(self, prefix: str, disabled: bool) -> KeyInfo:
        key_id = self._row(prefix).id
        with self.db.session() as session:
            session.execute(update(ApiKey).where(ApiKey.id == key_id).values(disabled=disabled))
        if disabled:  # at once in this process; other processes learn it at the next hold
            self.ledger.hints.disabled.add(key_id)
        return self.get(prefix)

    def top_up(self, prefix: str, credits: int) -> KeyInfo:
        if credits <= 0:
            raise InvalidRequest(
                "Invalid 'credits': a top-up must be more than 0.", field="credits"
            )
        self.ledger.top_up(self._row(prefix).id, credits, note="top-up")
        return self.get(prefix)

    def key_id(self, prefix: str) -> int:
        return self._row(prefix).id


def _unknown_prefix(given: str) -> str:
    """Name the prefix that was not found, and never echo what may be a key (or part of
    one): only text shaped like a prefix is repeated."""
    if _PREFIX.fullmatch(given):
        return f"No API key with prefix '{given}'."
    if given.startswith("zk_"):
        return "That looks like a whole API key: pass its prefix (the 8 characters after zk_)."
    return "That is not a key prefix: 8 hexadecimal characters, as `zimage keys list` shows."


class _Verified:
    """Keys this process verified, by their SHA-256 (never the key), each trusted for
    ``ttl_s``: a request with one needs no lookup, so it takes no thread hop. At most
    ``MAX`` of them, the oldest dropped first; a lock, as lookups run in threads."""

    MAX = 10_000

    def __init__(self, ttl_s: float) -> None:
        self.ttl_s = ttl_s
        self._entries: dict[str, tuple[Principal, float]] = {}
        self._lock = threading.Lock()

    def put(self, digest: str, principal: Principal) -> None:
        if self.ttl_s <= 0:
            return
        with self._lock:
            self._entries.pop(digest, None)
            if len(self._entries) >= self.MAX:
                del self._entries[next(iter(self._entries))]
            self._entries[digest] = (principal, time.monotonic() + self.ttl_s)

    def get(self, digest: str) -> Principal | None:
        with self._lock:
            entry = self._entries.get(digest)
            if entry is None or entry[1] > time.monotonic():
                return entry[0] if entry else None
            del self._entries[digest]
            return None

    def drop(self, digest: str) -> None:
        with self._lock:
            self._entries.pop(digest, None)
