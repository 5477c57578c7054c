"""Requests in flight per API key: counted in this process, or in Redis, where every API
process counts against the same cap.

In Redis each key is a sorted set of slots, scored by when the slot expires; the process
holding a slot renews it every third of its lifetime, so the slots of a process that died
expire and come back to the key on their own. Times are Redis's own (``TIME``), so the
processes' clocks need not agree.
"""

from __future__ import annotations

import logging
import threading
from collections import defaultdict
from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    import redis

log = logging.getLogger("zimage.limits")

# KEYS[1]: the key's set. ARGV: cap (0: none), lifetime in seconds, member.
_ENTER = """
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
local cap = tonumber(ARGV[1])
if cap > 0 and redis.call('ZSCORE', KEYS[1], ARGV[3]) == false
    and redis.call('ZCARD', KEYS[1]) >= cap then
  return 0
end
redis.call('ZADD', KEYS[1], now + tonumber(ARGV[2]), ARGV[3])
redis.call('EXPIRE', KEYS[1], math.ceil(tonumber(ARGV[2]) * 2))
return 1
"""
# KEYS[1]: the key's set. ARGV: lifetime, members to renew (only if still there).
_RENEW = """
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
for i = 2, #ARGV do
  redis.call('ZADD', KEYS[1], 'XX', now + tonumber(ARGV[1]), ARGV[i])
end
redis.call('EXPIRE', KEYS[1], math.ceil(tonumber(ARGV[1]) * 2))
return 1
"""


class InFlight(Protocol):
    """Slots of a key: ``token`` names what holds one (a request, a job)."""

    def enter(self, key_id: int, token: str, cap: int) -> bool:
        """Take a slot if fewer than ``cap`` are held; False otherwise."""
        ...

    def occupy(self, key_id: int, token: str) -> None:
        """Take a slot whatever the cap (work admitted earlier, e.g. a claimed job)."""
        ...

    def leave(self, key_id: int, token: str) -> None: ...

    def close(self) -> None: ...


class _Held:
    """Each key's tokens in this process, behind a lock: entered on the event loop or in a
    thread (a key looked up there), left on the loop; without it, a leave emptying a
    key's set could drop a concurrent entry."""

    def __init__(self) -> None:
        self._tokens: defaultdict[int, set[str]] = defaultdict(set)
        self._lock = threading.Lock()

    def add(self, key_id: int, token: str, cap: int | None = None) -> bool:
        """Add ``token`` unless the key already holds ``cap`` of them."""
        with self._lock:
            if cap is not None and len(self._tokens[key_id]) >= cap:
                return False
            self._tokens[key_id].add(token)
            return True

    def discard(self, key_id: int, token: str) -> None:
        with self._lock:
            held = self._tokens.get(key_id)
            if held is not None:
                held.discard(token)
                if not held:
                    del self._tokens[key_id]

    def snapshot(self) -> dict[int, list[str]]:
        with self._lock:
            return {key_id: sorted(tokens) for key_id, tokens in self._tokens.items()}


class MemoryInFlight:
    """One process's count: exact for a single API process."""

    def __init__(self) -> None:
        self._held = _Held()

    def enter(self, key_id: int, token: str, cap: int) -> bool:
        return self._held.add(key_id, token, cap)

    def occupy(self, key_id: int, token: str) -> None:
        self._held.add(key_id, token)

    def leave(self, key_id: int, token: str) -> None:
        self._held.discard(key_id, token)

    def close(self) -> None:
        pass


class RedisInFlight:
    """The count of every process, in Redis; a slot lives ``lifetime_s`` unless renewed."""

    def __init__(self, url: str, process: str, lifetime_s: float) -> None:
        import redis

        self.client: redis.Redis = redis.Redis.from_url(
            url, socket_timeout=2, socket_connect_timeout=2
        )
        self.process, self.lifetime_s = process, lifetime_s
        self._enter = self.client.register_script(_ENTER)
        self._renew = self.client.register_script(_RENEW)
        self._held = _Held()  # this process's members, renewed by the heartbeat
        self._stop = threading.Event()
        self._heart = threading.Thread(target=self._beat, name="inflight-heartbeat", daemon=True)
        self._heart.start()

    @staticmethod
    def _name(key_id: int) -> str:
        return f"zimage:inflight:{key_id}"

    def enter(self, key_id: int, token: str, cap: int) -> bool:
        member = f"{self.process}:{token}"
        if not self._enter(keys=[self._name(key_id)], args=[cap, self.lifetime_s, member]):
            return False
        self._held.add(key_id, member)
        return True

    def occupy(self, key_id: int, token: str) -> None:
        self.enter(key_id, token, 0)

    def leave(self, key_id: int, token: str) -> None:
        member = f"{self.process}:{token}"
        self._held.discard(key_id, member)
        self.client.zrem(self._name(key_id), member)

    def _beat(self) -> None:
        while not self._stop.wait(self.lifetime_s / 3):
            try:
                for key_id, members in self._held.snapshot().items():
                    self._renew(keys=[self._name(key_id)], args=[self.lifetime_s, *members])
            except Exception as exc:  # a heartbeat outlives a Redis outage
                log.warning("could not renew in-flight slots in Redis: %s", exc)

    def close(self) -> None:
        self._stop.set()
        self.client.close()
