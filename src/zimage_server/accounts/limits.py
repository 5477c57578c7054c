"""Per-key rate limits: requests per window (the ``limits`` library) and requests in
flight. One URL (``ZIMAGE_RATE_LIMIT_STORAGE``) selects where both are counted: ``memory://``
in this process (one API process), ``redis://...`` in Redis, shared by every API process."""

from __future__ import annotations

import functools
import logging
import math
import re
import secrets
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import TYPE_CHECKING

from limits import RateLimitItem, parse, storage, strategies

from zimage_server.accounts.inflight import InFlight, MemoryInFlight, RedisInFlight
from zimage_server.core.errors import InvalidRequest, LimitsUnavailable, RateLimited

if TYPE_CHECKING:
    from zimage_server.accounts.keys import Principal

log = logging.getLogger("zimage.limits")

# Bounds a limit must keep: a longer window overflows the reset time's date (a 500 on every
# request of the key), and Redis counts in 64-bit integers. The pattern (also the admin API's
# schema, so what it admits is exactly what is accepted) keeps 1 to 999999999 requests in a
# window from 1 second to 366 days; the text fits its column.
_WINDOW = (
    r"(([1-9]\d{0,6}\s*)?seconds?|([1-9]\d{0,4}\s*)?minutes?|([1-9]\d{0,2}\s*)?hours?"
    r"|(([1-9]\d?|[12]\d\d|3[0-5]\d|36[0-6])\s*)?days?|(([1-9]|1[0-2])\s*)?months?"
    r"|(1\s*)?years?)"
)
LIMIT_PATTERN = rf"^\s*[1-9]\d{{0,8}}\s*(/|per)\s*{_WINDOW}\s*$"
MAX_LIMIT_CHARS = 64


def parse_limit(text: str) -> RateLimitItem:
    """``text`` in the ``limits`` notation ('60/minute', '10 per 2 seconds'), or the
    ``InvalidRequest`` naming ``rate_limit`` and the range it must keep."""
    try:
        fits = len(text) <= MAX_LIMIT_CHARS and re.match(LIMIT_PATTERN, text) is not None
        item = parse(text) if fits else None
    except ValueError:
        item = None
    if item is None:
        raise InvalidRequest(
            "Invalid 'rate_limit': use the form '60/minute' or '10 per 2 seconds', with 1 to "
            "999999999 requests in a window from 1 second to 366 days (at most 9999999 "
            "seconds, 99999 minutes, 999 hours, 366 days, 12 months or 1 year), in at most "
            f"{MAX_LIMIT_CHARS} characters (got {text[:40]!r}).",
            field="rate_limit",
        )
    return item


@functools.lru_cache(maxsize=1024)
def _parsed(text: str) -> RateLimitItem:
    """A key's stored limit, parsed once (the text was checked when it was set): parsing
    on every request cost more than the count itself."""
    return parse(text)


class MemoryWindows:
    """Fixed windows counted in this process, as ``limits``' ``FixedWindowRateLimiter``
    counts them (a window opens at a key's first hit and lasts the item's period), without
    its ``MemoryStorage``, which starts a ``threading.Timer`` thread to expire counters on
    almost every hit. Expired windows are dropped as they are met, and all at once every
    ``_PRUNE_EVERY`` hits, so keys that stop calling cost nothing for long."""

    _PRUNE_EVERY = 4096

    def __init__(self) -> None:
        self._windows: dict[str, list[float]] = {}  # ident: [expires_at, count]
        self._lock = threading.Lock()
        self._hits = 0

    def hit(self, item: RateLimitItem, ident: str) -> tuple[bool, int, float]:
        """Count one request; (allowed, remaining, reset time) like ``limits``'."""
        name = item.key_for(ident)
        now = time.time()
        with self._lock:
            self._hits += 1
            if self._hits % self._PRUNE_EVERY == 0:
                self._prune(now)
            window = self._windows.get(name)
            if window is None or window[0] <= now:
                window = self._windows[name] = [now + item.get_expiry(), 0]
            window[1] += 1
            count, reset = int(window[1]), window[0]
        return count <= item.amount, max(0, item.amount - count), reset

    def _prune(self, now: float) -> None:
        for name in [name for name, window in self._windows.items() if window[0] <= now]:
            del self._windows[name]


@dataclass(frozen=True)
class Admission:
    """A caller let in: who, and the rate-limit headers that go on the response."""

    principal: Principal | None
    headers: dict[str, str]
    slot: str = ""  # names the in-flight slot it holds
    auth_s: float = 0.0  # the key check's time, thread hop included (``timings.auth``)


@contextmanager
def _redis_errors_as_503() -> Iterator[None]:
    try:
        yield
    except Exception as exc:
        if type(exc).__module__.split(".")[0] != "redis":
            raise
        raise LimitsUnavailable(
            "The rate-limit store (Redis) is unavailable; nothing was charged. Retry shortly.",
            retry_after=5,
        ) from exc


class RateLimiter:
    """``process`` names this API process's in-flight slots in Redis; ``lifetime_s`` is how
    long a slot of a process that died keeps counting."""

    def __init__(
        self,
        storage_url: str,
        default_limit: str,
        default_in_flight: int,
        *,
        process: str = "local",
        lifetime_s: float = 10.0,
    ) -> None:
        self.default_limit = default_limit
        self.default_in_flight = default_in_flight
        self.shared = storage_url.startswith(("redis://", "rediss://", "redis+unix://"))
        self._memory = MemoryWindows() if storage_url.startswith("memory://") else None
        self._limiter = (
            None
            if self._memory is not None
            else strategies.FixedWindowRateLimiter(storage.storage_from_string(storage_url))
        )
        self.in_flight: InFlight = (
            RedisInFlight(storage_url, process, lifetime_s) if self.shared else MemoryInFlight()
        )
        # Counting waits on a server (Redis, ...): callers use a thread.
        self.blocking = self._memory is None or self.shared

    def enter(self, principal: Principal) -> Admission:
        """Count the request against the key's limits; raise ``RateLimited`` if over.
        Blocking with Redis: call it from a thread."""
        with _redis_errors_as_503():
            return self._enter(principal)

    def _enter(self, principal: Principal) -> Admission:
        item = _parsed(principal.rate_limit or self.default_limit)
        allowed, remaining, reset_time = self._hit(item, str(principal.key_id))
        reset = datetime.fromtimestamp(reset_time, UTC)
        headers = {
            "x-rate-limit-remaining": str(remaining),
            "x-rate-limit-reset-at-utc": reset.isoformat(timespec="seconds").replace("+00:00", "Z"),
        }
        retry = max(1, math.ceil(reset_time - time.time()))
        if not allowed:
            raise RateLimited(
                f"Rate limit exceeded for key {principal.prefix}: {item}. Retry after {retry} s.",
                retry_after=retry,
                headers=headers,
            )
        cap = principal.max_in_flight or self.default_in_flight
        slot = secrets.token_hex(8)
        if not self.in_flight.enter(principal.key_id, slot, cap):
            raise RateLimited(
                f"Key {principal.prefix} already has {cap} requests in flight (its limit).",
                retry_after=1,
                headers=headers,
            )
        return Admission(principal, headers, slot)

    def _hit(self, item: RateLimitItem, ident: str) -> tuple[bool, int, float]:
        if self._memory is not None:
            return self._memory.hit(item, ident)
        assert self._limiter is not None  # noqa: S101 (one of the two is set)
        allowed = self._limiter.hit(item, ident)
        stats = self._limiter.get_window_stats(item, ident)
        return allowed, stats.remaining, stats.reset_time

    def leave(self, admission: Admission) -> None:
        if admission.principal is not None:
            self._quietly(self.in_flight.leave, admission.principal.key_id, admission.slot)

    def occupy(self, key_id: int, token: str) -> None:
        """Count work that outlives its request (a v2 job) against the key's cap."""
        self._quietly(self.in_flight.occupy, key_id, token)

    def vacate(self, key_id: int, token: str) -> None:
        self._quietly(self.in_flight.leave, key_id, token)

    @staticmethod
    def _quietly(call: Callable[[int, str], None], key_id: int, token: str) -> None:
        """Slot bookkeeping after admission never fails a request: with Redis away, the
        slot expires on its own (it is no longer renewed)."""
        try:
            with _redis_errors_as_503():
                call(key_id, token)
        except LimitsUnavailable as exc:
            log.warning("in-flight slot of key %d: %s", key_id, exc.message)

    def close(self) -> None:
        self.in_flight.close()
