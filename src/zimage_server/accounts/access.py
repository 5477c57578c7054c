"""The front door of every billable route: authenticate, then rate-limit."""

from __future__ import annotations

import asyncio
import time
from dataclasses import replace

from zimage_server.accounts.keys import KeyService, Principal
from zimage_server.accounts.limits import Admission, RateLimiter


class AccessControl:
    def __init__(self, keys: KeyService, limiter: RateLimiter, required: bool) -> None:
        self.keys = keys
        self.limiter = limiter
        self.required = required

    async def admit(self, key: str | None, scope: str) -> Admission:
        """Raise ``Unauthenticated``/``Forbidden``/``RateLimited``, or let the caller in."""
        if not self.required:
            return Admission(None, {})
        start = time.perf_counter()
        principal = self.keys.cached(key, scope)
        if principal is not None and not self.limiter.blocking:
            admission = self.limiter.enter(principal)  # nothing to wait for: no thread hop
        else:
            admission = await asyncio.to_thread(self._admit, key, scope, principal)
        return replace(admission, auth_s=time.perf_counter() - start)

    def _admit(self, key: str | None, scope: str, known: Principal | None) -> Admission:
        return self.limiter.enter(known or self.keys.authenticate(key, scope))

    async def identify(self, key: str | None, scope: str) -> Admission:
        """Authenticate only (polling a job is not rate-limited like a render)."""
        if not self.required:
            return Admission(None, {})
        return Admission(await asyncio.to_thread(self.keys.authenticate, key, scope), {})

    def leave(self, admission: Admission) -> None:
        self.limiter.leave(admission)
