"""A job's events shared by every API process, through Redis.

The process that runs a job copies each event of the job's channel into a Redis Stream,
``zimage:events:<job id>``, under the entry id ``0-<event id>``: the very number its own
event stream sends as ``id``. One numbering everywhere, so a reader that reconnects to any
process with ``Last-Event-ID: n`` resumes after n: the owner replays its hub after n,
another process reads the entries after ``0-n``. A job taken over from a process that died
numbers its events from ``takeover_id()`` (a millisecond clock x 1000), above any id the
earlier run used; Redis refuses an id that is not above the last, so nothing repeats.

Publishing never slows a render: the hub's tap only puts the event in a bounded queue
(dropped when full), and one thread writes them (``XADD`` trimmed to about ``MAXLEN``
entries, previews over ``PREVIEW_MAX_PIXELS`` or ``PREVIEW_MAX_CHARS`` left out, and an
expiry that follows the job's deadline, then ``retention_s`` after its end). A reader
elsewhere first gets what the hub would replay (the latest queued, started and step after
its id, and every other event, in id order), then follows live. While Redis is away its
events are dropped, a second at a time: local streams and the render do not notice
(``/metrics`` counts the events written and those dropped, by reason). The terminal event
never depends on Redis: a reader elsewhere also polls the store, and makes the terminal
event from it when Redis does not bring one.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import queue
import threading
import time
from collections import deque
from collections.abc import AsyncGenerator, Awaitable, Callable
from contextlib import aclosing
from typing import TYPE_CHECKING, Any, cast

from zimage_server.core.config import Settings
from zimage_server.streams.hub import StreamEvent
from zimage_server.telemetry import Metrics
from zimage_server.telemetry.metrics import SHARED_DROP_REASONS

if TYPE_CHECKING:
    import redis
    import redis.asyncio
    from redis.typing import EncodableT, FieldT, KeyT, StreamIdT

log = logging.getLogger("zimage.streams")
MAXLEN = 512  # entries kept per job: every event of a 75-step render, queue moves included
PREVIEW_MAX_CHARS = 96_000  # base64 WebP; larger previews stay local
PREVIEW_MAX_PIXELS = 512 * 512  # larger ones are not even encoded for Redis
QUEUE_SIZE = 1024  # events waiting for Redis, all jobs together
DOWN_RETRY_S = 1.0  # after a failed write, drop events this long before trying again
Entries = list[tuple[str, list[tuple[str, dict[str, str]]]]] | None  # XREAD's reply
Range = list[tuple[str, dict[str, str]]]  # XREVRANGE's reply
LATEST_ONLY = frozenset({"queued", "started", "step"})  # a replay keeps the newest of each
CATCH_UP_PAGE = 16  # entries a catch-up reads back at a time (steps carry previews)
Ended = Callable[[], Awaitable[str | None]]  # the terminal event's name, from the store


def takeover_id() -> int:
    """The first event id of a run that continues another process's job."""
    return int(time.time() * 1000) * 1000


def _key(job_id: str) -> str:
    return f"zimage:events:{job_id}"


def redis_url(settings: Settings) -> str | None:
    """``stream_redis_url``, else the rate limits' Redis; None without Redis."""
    if settings.stream_redis_url:
        return settings.stream_redis_url
    storage = settings.rate_limit_storage
    return storage if storage.startswith(("redis://", "rediss://", "redis+unix://")) else None


class SharedEvents:
    """Writes the events of the jobs run here; reads those of jobs run elsewhere."""

    def __init__(
        self, url: str, *, retention_s: float, poll_s: float = 1.0, metrics: Metrics | None = None
    ) -> None:
        import redis
        import redis.asyncio

        self._writer: redis.Redis = redis.Redis.from_url(
            url, socket_timeout=2, socket_connect_timeout=2
        )
        self._reader: redis.asyncio.Redis = redis.asyncio.Redis.from_url(
            url, socket_timeout=poll_s + 5, socket_connect_timeout=2, decode_responses=True
        )
        self.retention_s, self.poll_s = retention_s, poll_s
        self._deadlines: dict[str, float] = {}  # the jobs run here: their deadlines
        self._queue: queue.Queue[tuple[str, StreamEvent, float]] = queue.Queue(QUEUE_SIZE)
        self._stop = threading.Event()
        self.metrics = metrics or Metrics()  # events written, and those dropped by reason
        drops = self.metrics.shared_events_dropped
        self._drops = {reason: drops.labels(reason) for reason in SHARED_DROP_REASONS}
        self._thread = threading.Thread(target=self._drain, name="events-to-redis", daemon=True)
        self._thread.start()

    @classmethod
    def from_settings(cls, settings: Settings, metrics: Metrics) -> SharedEvents | None:
        url = redis_url(settings)
        if url is None:
            return None
        return cls(url, retention_s=settings.stream_retention_s, metrics=metrics)

    # -- the owner's side ------------------------------------------------------------------
    def track(self, job_id: str, deadline_at: float) -> None:
        """Publish this job's events (it runs here) until its terminal event."""
        self._deadlines[job_id] = deadline_at

    def forget(self, job_id: str) -> None:
        """No longer run here (taken over elsewhere): stop publishing it."""
        self._deadlines.pop(job_id, None)

    def publish(self, render_id: str, event: StreamEvent) -> None:
        """The hub's tap: queue the event of a tracked job, never waiting."""
        deadline = self._deadlines.get(render_id)
        if deadline is None:
            return
        ttl = self.retention_s
        if event.terminal:
            del self._deadlines[render_id]
        else:
            ttl += max(0.0, deadline - time.time())
        try:
            self._queue.put_nowait((render_id, event, ttl))
        except queue.Full:
            self._drops["queue_full"].inc()

    def _drain(self) -> None:
        import redis

        down_until = 0.0
        while not self._stop.is_set():
            try:
                item = self._queue.get(timeout=0.5)
            except queue.Empty:
                continue
            if time.monotonic() < down_until:
                self._drops["redis_unavailable"].inc()
                continue
            try:
                self._write(*item)
            except redis.ResponseError as exc:  # an id not above the last: a stale run
                log.debug("event %s of %s not shared: %s", item[1].id, item[0], exc)
                self._drops["refused"].inc()
            except redis.RedisError as exc:
                log.warning("job events: Redis is unavailable (%s); streams stay local", exc)
                self._drops["redis_unavailable"].inc()
                down_until = time.monotonic() + DOWN_RETRY_S
            else:
                self.metrics.shared_events_written.inc()

    def _write(self, job_id: str, event: StreamEvent, ttl_s: float) -> None:
        fields: dict[FieldT, EncodableT] = {"event": event.name, "data": json.dumps(event.data)}
        small = event.preview is not None and _pixels(event) <= PREVIEW_MAX_PIXELS
        preview = event.encode() if small else None  # here, off the loop; readers reuse it
        if preview is not None and len(preview["image"]) <= PREVIEW_MAX_CHARS:
            fields["preview"] = json.dumps(preview)
        pipe = self._writer.pipeline(transaction=False)
        pipe.xadd(_key(job_id), fields, id=f"0-{event.id}", maxlen=MAXLEN, approximate=True)
        pipe.expire(_key(job_id), max(1, math.ceil(ttl_s)))
        pipe.execute()

    # -- another process's side ------------------------------------------------------------
    def reader(self, job_id: str, after: int | None, ended: Ended) -> RemoteEvents:
        return RemoteEvents(self._reader, job_id, after or 0, ended, self.poll_s)

    async def close(self) -> None:
        self._stop.set()
        await asyncio.to_thread(self._thread.join, 5)
        self._writer.close()
        await self._reader.aclose()


class RemoteEvents:
    """One reader's events of a job another process runs: what the hub would replay of
    the Redis entries after ``after``, then each new one, ending with the terminal event,
    from Redis or, when Redis does not bring it within ``poll_s`` of the store saying the
    job ended, made from the store."""

    def __init__(
        self, client: redis.asyncio.Redis, job_id: str, after: int, ended: Ended, poll_s: float
    ) -> None:
        self._client, self._job_id, self._last = client, job_id, after
        self._ended, self._poll_s = ended, poll_s
        self._pending: deque[StreamEvent] = deque()
        self._checked = time.monotonic()
        self._caught_up = False

    async def next(self, timeout: float) -> StreamEvent | None:
        """The next event, or None after ``timeout`` seconds without one (keep-alive)."""
        deadline = time.monotonic() + timeout
        while not self._pending:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return None
            await self._read(min(remaining, self._poll_s))
            if not self._pending and time.monotonic() - self._checked >= self._poll_s:
                await self._check_store()
        return self._pending.popleft()

    async def _read(self, block_s: float | None) -> None:
        """Entries after the last one read; waits up to ``block_s`` (None: not at all)."""
        import redis

        block = None if block_s is None else max(1, int(block_s * 1000))
        try:
            if not self._caught_up:
                self._pending.extend(await self._catch_up())
                self._caught_up = True
                if self._pending:
                    return
            stream: dict[KeyT, StreamIdT] = {_key(self._job_id): f"0-{self._last}"}
            reply = cast(Entries, await self._client.xread(stream, 64, block))
        except redis.RedisError:  # away: the store still tells the end
            if block_s:
                await asyncio.sleep(block_s)
            return
        for _stream, entries in reply or []:
            for entry_id, fields in entries:
                self._last = _number(entry_id)
                self._pending.append(_event(self._last, fields))

    async def _catch_up(self) -> list[StreamEvent]:
        """The backlog after ``after`` as the hub replays it: the latest queued, started
        and step, and every other event (the terminal one), in id order. Read newest first,
        and no further once all three kinds are found (the hub logs nothing past a terminal
        event, so nothing older is left to replay): an earlier run's entries stay unread."""
        latest: dict[str, StreamEvent] = {}
        others: list[StreamEvent] = []
        async with aclosing(self._newest_first()) as entries:
            async for event_id, fields in entries:
                name = fields["event"]
                if name not in LATEST_ONLY:
                    others.append(_event(event_id, fields))
                elif name not in latest:
                    latest[name] = _event(event_id, fields)
                    if len(latest) == len(LATEST_ONLY):
                        break
        events = sorted([*latest.values(), *others], key=lambda event: event.id)
        if events:
            self._last = events[-1].id  # the newest entry, always kept: live follows it
        return events

    async def _newest_first(self) -> AsyncGenerator[tuple[int, dict[str, str]]]:
        """The entries after ``after``, newest first, a page at a time."""
        upper = "+"
        while True:
            args = (_key(self._job_id), upper, f"0-{self._last + 1}", CATCH_UP_PAGE)
            page = cast(Range, await self._client.xrevrange(*args))
            for entry_id, fields in page:
                yield _number(entry_id), fields
            if len(page) < CATCH_UP_PAGE:
                return
            upper = f"0-{_number(page[-1][0]) - 1}"

    async def _check_store(self) -> None:
        self._checked = time.monotonic()
        name = await self._ended()
        if name is None:
            return
        await self._read(None)  # what Redis has by now, its terminal event too
        if not any(event.terminal for event in self._pending):
            data = {"request_id": self._job_id}
            self._pending.append(StreamEvent(id=self._last + 1, name=name, data=data))

    def close(self) -> None:
        """Nothing held between reads."""


def _number(entry_id: str) -> int:
    """The event id of a stream entry id (``0-<event id>``)."""
    return int(entry_id.split("-")[1])


def _pixels(event: StreamEvent) -> int:
    return event.preview.width * event.preview.height if event.preview else 0


def _event(event_id: int, fields: dict[str, str]) -> StreamEvent:
    preview: dict[str, Any] | None = json.loads(fields["preview"]) if "preview" in fields else None
    return StreamEvent(
        id=event_id, name=fields["event"], data=json.loads(fields["data"]), encoded=preview
    )
