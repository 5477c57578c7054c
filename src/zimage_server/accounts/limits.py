"""Per-key rate limits: requests per window (the ``limits`` library: memory storage on one
machine, Redis by URL for several) and requests in flight (counted in this process)."""

from __future__ import annotations

import math
import time
from collections import Counter
from dataclasses import dataclass
from datetime import UTC, datetime

from limits import parse, storage, strategies

from zimage_server.accounts.keys import Principal
from zimage_server.core.errors import RateLimited


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
