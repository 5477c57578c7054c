"""Per-key rate limits: requests per window (the ``limits`` library: memory storage on one
machine, Redis by URL for several) and requests in flight (counted in this process)."""

from __future__ import annotations

import math
import re
import time
from collections import Counter
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import TYPE_CHECKING

from limits import RateLimitItem, parse, storage, strategies

from zimage_server.core.errors import InvalidRequest, RateLimited

if TYPE_CHECKING:
    from zimage_server.accounts.keys import Principal

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


@dataclass(frozen=True)
class Admission:
    """A caller let in: who, and the rate-limit headers that go on the response."""

    principal: Principal | None
    headers: dict[str, str]


class RateLimiter:
    def __init__(self, storage_url: str, default_limit: str, default_in_flight: int) -> None:
        self._limiter = strategies.FixedWindowRateLimiter(storage.storage_from_string(storage_url))
        self.default_limit = default_limit
        self.default_in_flight = default_in_flight
        self._in_flight: Counter[int] = Counter()

    def enter(self, principal: Principal) -> Admission:
        """Count the request against the key's limits; raise ``RateLimited`` if over."""
        item = parse(principal.rate_limit or self.default_limit)
        ident = str(principal.key_id)
        allowed = self._limiter.hit(item, ident)
        stats = self._limiter.get_window_stats(item, ident)
        reset = datetime.fromtimestamp(stats.reset_time, UTC)
        headers = {
            "x-rate-limit-remaining": str(stats.remaining),
            "x-rate-limit-reset-at-utc": reset.isoformat(timespec="seconds").replace("+00:00", "Z"),
        }
        retry = max(1, math.ceil(stats.reset_time - time.time()))
        if not allowed:
            raise RateLimited(
                f"Rate limit exceeded for key {principal.prefix}: {item}. Retry after {retry} s.",
                retry_after=retry,
                headers=headers,
            )
        cap = principal.max_in_flight or self.default_in_flight
        if self._in_flight[principal.key_id] >= cap:
            raise RateLimited(
                f"Key {principal.prefix} already has {cap} requests in flight (its limit).",
                retry_after=1,
                headers=headers,
            )
        self._in_flight[principal.key_id] += 1
        return Admission(principal, headers)

    def leave(self, admission: Admission) -> None:
        if admission.principal is not None:
            self.vacate(admission.principal.key_id)

    def occupy(self, key_id: int) -> None:
        """Count work that outlives its request (a v2 job) against the key's cap."""
        self._in_flight[key_id] += 1

    def vacate(self, key_id: int) -> None:
        self._in_flight[key_id] -= 1
        if self._in_flight[key_id] <= 0:
            del self._in_flight[key_id]
