"""The progress hub: one channel of ordered events per render, fanned out to readers.

The engine tells the hub each render's ``queued``, ``started`` and ``step`` (with an
optional preview); whoever owns the render's outcome (the job runner, a streaming v1 or
OpenAI request) ends its channel with ``completed``, ``failed`` or ``cancelled``. Events
are numbered per channel, so a reader that reconnects with ``Last-Event-ID`` gets what it
missed from the channel's short log: the latest queue position, the start, the latest
step and the terminal event.

Readers never slow a render: publishing only appends to each reader's bounded buffer,
where a new step replaces the oldest unread step beyond ``buffer`` (steps are lossy by
design; queued, started and the terminal event are never dropped). Memory is bounded by
readers x ``buffer`` and by ``max_channels`` finished channels kept ``retention_s``.

Taps (``tap``) see every event as it is published, on the publisher's thread: the shared
event log (``streams.shared``) copies a job's events to Redis for the other API processes.
"""

from __future__ import annotations

import asyncio
import base64
import logging
import time
from collections import OrderedDict, deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

from zimage_server.engine import RenderUpdate
from zimage_server.engine.protocol import Preview
from zimage_server.images.encode import encode_preview

log = logging.getLogger("zimage.streams")
TERMINAL = frozenset({"completed", "failed", "cancelled"})
Position = Callable[[str], int | None]  # the engine's: 0 = next, None = not waiting


@dataclass(eq=False, kw_only=True)
class StreamEvent:
    """One event of a channel. ``preview`` is raw RGB until a writer encodes it once
    (into ``encoded``), so a step that every reader skips is never encoded."""

    id: int
    name: str
    data: dict[str, Any]
    preview: Preview | None = None
    encoded: dict[str, Any] | None = None

    @property
    def terminal(self) -> bool:
        return self.name in TERMINAL

    def encode(self) -> dict[str, Any] | None:
        """The preview as base64 WebP with its costs, encoded once (blocking: call it from
        a thread). Several threads may race here: each would encode the same bytes."""
        preview = self.preview
        if self.encoded is None and preview is not None:
            start = time.perf_counter()
            webp = encode_preview(preview.rgb, (preview.width, preview.height))
            self.encoded = {
                "width": preview.width,
                "height": preview.height,
                "format": "webp",
                "image": base64.b64encode(webp).decode("ascii"),
                "compute_ms": round(preview.compute_s * 1000, 3),
                "encode_ms": round((time.perf_counter() - start) * 1000, 3),
            }
        return self.encoded


Tap = Callable[[str, StreamEvent], None]  # (render id, event), on the publisher's thread


class EventSource(Protocol):
    """What an event stream reads: a hub ``Subscription``, or another process's events
    read back from Redis (``streams.shared``)."""

    async def next(self, timeout: float) -> StreamEvent | None: ...

    def close(self) -> None: ...


class Subscription:
    """One reader's buffer; steps beyond ``limit`` replace the oldest unread one."""

    def __init__(self, channel: Channel, limit: int) -> None:
        self._channel = channel
        self._limit = limit
        self._pending: deque[StreamEvent] = deque()
        self._wake = asyncio.Event()
        self.dropped = 0  # steps skipped because this reader fell behind

    def push(self, event: StreamEvent) -> None:
        if event.name == "queued":  # only the newest position matters
            self._drop("queued", keep=0)
        elif event.name == "step":
            self._drop("step", keep=self._limit - 1)
        self._pending.append(event)
        self._wake.set()

    def _drop(self, name: str, keep: int) -> None:
        same = [pending for pending in self._pending if pending.name == name]
        for stale in same[: max(0, len(same) - keep)]:
            self._pending.remove(stale)
            self.dropped += name == "step"

    @property
    def buffered(self) -> int:
        return len(self._pending)

    async def wait(self) -> None:
        """Until an event is pending (not taking it)."""
        while not self._pending:
            self._wake.clear()
            await self._wake.wait()

    async def next(self, timeout: float) -> StreamEvent | None:
        """The next event, or None after ``timeout`` seconds without one (keep-alive)."""
        if not self._pending:
            self._wake.clear()
            try:
                await asyncio.wait_for(self._wake.wait(), timeout)
            except TimeoutError:
                return None
        return self._pending.popleft()

    def close(self) -> None:
        self._channel.subscribers.discard(self)


@dataclass(eq=False)
class Channel:
    """One render's events: a short log for replays and the live readers."""

    render_id: str
    log: list[StreamEvent] = field(default_factory=list)
    subscribers: set[Subscription] = field(default_factory=set)
    next_id: int = 1
    position: int | None = None  # 1 = next, while queued
    started: bool = False
    finished_at: float | None = None

    def publish(
        self, name: str, data: dict[str, Any], preview: Preview | None = None
    ) -> StreamEvent | None:
        """Number, log and fan out one event; nothing follows a terminal event."""
        if self.finished_at is not None:
            return None
        event = StreamEvent(id=self.next_id, name=name, data=data, preview=preview)
        self.next_id += 1
        if name in ("queued", "started", "step"):  # the log keeps only the latest of each
            self.log = [old for old in self.log if old.name != name]
        self.log.append(event)
        for subscriber in self.subscribers:
            subscriber.push(event)
        return event

    def replay(self, after: int | None) -> list[StreamEvent]:
        return [event for event in self.log if after is None or event.id > after]


class ProgressHub:
    """Channels by render id; the engine's listener and the readers' entry point."""

    def __init__(
        self,
        position: Position,
        *,
        buffer: int = 8,
        retention_s: float = 300.0,
        max_channels: int = 10_000,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._position = position
        self._buffer = buffer
        self._retention_s = retention_s
        self._max_channels = max_channels
        self._clock = clock
        self._channels: OrderedDict[str, Channel] = OrderedDict()
        self._taps: list[Tap] = []

    def open(self, render_id: str, first_id: int | None = None) -> Channel:
        """The render's channel, made if new (before the render is queued, so that a
        reader who asks at once finds it). ``first_id``: number its next events from
        there on (a job taken over from another process continues above that one's ids)."""
        channel = self._channels.get(render_id)
        if channel is None:
            self._prune()
            channel = self._channels[render_id] = Channel(render_id)
        if first_id is not None:
            channel.next_id = max(channel.next_id, first_id)
        return channel

    def tap(self, listener: Tap) -> None:
        """Tell ``listener`` every event published from now on (it must not block)."""
        self._taps.append(listener)

    def _publish(
        self, channel: Channel, name: str, data: dict[str, Any], preview: Preview | None = None
    ) -> None:
        event = channel.publish(name, data, preview)
        if event is None:
            return
        for listener in self._taps:
            try:
                listener(channel.render_id, event)
            except Exception:  # a tap's bug must not fail the render
                log.exception("an event tap failed on %s", name)

    def get(self, render_id: str) -> Channel | None:
        return self._channels.get(render_id)

    def discard(self, render_id: str) -> None:
        self._channels.pop(render_id, None)

    def subscribe(self, render_id: str, after: int | None = None) -> Subscription:
        """A reader of the render's channel, primed with the logged events after ``after``."""
        channel = self.open(render_id)
        subscription = Subscription(channel, self._buffer)
        replay = channel.replay(after)
        if channel.finished_at is not None and not any(event.terminal for event in replay):
            replay.append(channel.log[-1])  # a finished render always ends its stream
        for event in replay:
            subscription.push(event)
        channel.subscribers.add(subscription)
        return subscription

    def update(self, update: RenderUpdate) -> None:
        """The engine's listener: publish queued, started and step events."""
        if update.stage == "started":
            self._refresh_positions(update.render_id)
        channel = self._channels.get(update.render_id)
        if channel is None or channel.finished_at is not None:
            return
        data: dict[str, Any] = {"request_id": update.render_id}
        if update.stage == "queued":
            channel.position = None if update.position is None else update.position + 1
            self._publish(channel, "queued", {**data, "queue_position": channel.position})
        elif update.stage == "started":
            channel.started = True
            self._publish(channel, "started", {**data, "step": 0, "total": update.total})
        else:
            step = {"step": update.step, "total": update.total}
            self._publish(channel, "step", {**data, **step}, update.preview)

    def finish(self, render_id: str, name: str, data: dict[str, Any]) -> None:
        """End the render's channel with its terminal event (kept ``retention_s``)."""
        channel = self._channels.get(render_id)
        if channel is None:
            return
        self._publish(channel, name, data)
        channel.finished_at = self._clock()

    def _refresh_positions(self, starting: str) -> None:
        """A batch started: the renders still waiting moved up; tell their readers."""
        for channel in self._channels.values():
            if channel.started or channel.finished_at is not None:
                continue
            if channel.render_id == starting or not channel.subscribers:
                continue
            position = self._position(channel.render_id)
            if position is not None and position + 1 != channel.position:
                channel.position = position + 1
                data = {"request_id": channel.render_id, "queue_position": channel.position}
                self._publish(channel, "queued", data)

    def _prune(self) -> None:
        """Forget finished channels past their retention, and the oldest finished ones
        while there are more than ``max_channels``."""
        now, excess = self._clock(), len(self._channels) - self._max_channels + 1
        for render_id, channel in list(self._channels.items()):
            if channel.finished_at is None:
                continue
            if excess > 0 or now - channel.finished_at > self._retention_s:
                del self._channels[render_id]
                excess -= 1

    def __len__(self) -> int:
        return len(self._channels)
