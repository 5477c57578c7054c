"""The hub's taps and the Redis copy of a job's events, against a real ``redis-server``:
one numbering on both sides, bounded entries and previews, an expiry, and a publisher
that never waits, with Redis up or away."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import redis
import redis.asyncio

from tests.backing import RedisServer, free_port
from zimage_server.engine import RenderUpdate
from zimage_server.engine.protocol import Preview
from zimage_server.streams import ProgressHub, StreamEvent
from zimage_server.streams.shared import MAXLEN, RemoteEvents, SharedEvents, takeover_id


def _hub(shared: SharedEvents) -> ProgressHub:
    hub = ProgressHub(lambda _render: None)
    hub.tap(shared.publish)
    return hub


def _settle(shared: SharedEvents) -> None:
    deadline = time.monotonic() + 10
    while not shared._queue.empty():
        assert time.monotonic() < deadline
        time.sleep(0.01)
    time.sleep(0.2)  # the last write


def _counted(shared: SharedEvents, reason: str = "") -> float:
    """Its ``/metrics`` counter: events written, or (with a reason) dropped."""
    registry = shared.metrics.registry
    if not reason:
        return registry.get_sample_value("zimage_shared_events_written_total") or 0.0
    labels = {"reason": reason}
    return registry.get_sample_value("zimage_shared_events_dropped_total", labels) or 0.0


def _read_all(url: str, job: str, after: int = 0) -> list[StreamEvent]:
    """What another process reads back (its own client, on its own loop)."""

    async def ended() -> str | None:
        return None

    async def drain() -> list[StreamEvent]:
        client = redis.asyncio.Redis.from_url(url, decode_responses=True)
        reader, events = RemoteEvents(client, job, after, ended, poll_s=1.0), []
        while (event := await reader.next(0.3)) is not None:
            events.append(event)
            if event.terminal:
                break
        await client.aclose()
        return events

    return asyncio.run(drain())


def test_a_tracked_jobs_events_reach_redis_under_the_hubs_ids(redis_server: RedisServer) -> None:
    shared = SharedEvents(redis_server.url, retention_s=60)
    hub = _hub(shared)
    try:
        hub.open("job-1")
        hub.open("not-a-job")  # a v1 stream's render: nobody else can read it
        shared.track("job-1", time.time() + 30)
        rgb = bytes(range(256)) * 48  # 64 x 64 x 3
        for render in ("job-1", "not-a-job"):
            hub.update(RenderUpdate(render_id=render, stage="started", total=2))
            preview = Preview(render, 64, 64, rgb, 0)
            hub.update(
                RenderUpdate(render_id=render, stage="step", step=1, total=2, preview=preview)
            )
            hub.finish(render, "completed", {"request_id": render})
        _settle(shared)
        events = _read_all(redis_server.url, "job-1")
        local = hub.get("job-1")
        assert local is not None
        assert [(e.id, e.name) for e in events] == [(e.id, e.name) for e in local.log]
        assert events[1].encoded is not None and events[1].encoded["width"] == 64
        assert local.log[1].encoded == events[1].encoded  # encoded once, for both sides
        assert [e.name for e in _read_all(redis_server.url, "job-1", after=events[0].id)] == [
            "step",
            "completed",
        ]
        client = redis.Redis.from_url(redis_server.url)
        assert 0 < client.ttl("zimage:events:job-1") <= 60  # ended: the retention only
        assert not client.exists("zimage:events:not-a-job")
        # A large preview stays local: Redis gets the step without it.
        shared.track("job-big", time.time() + 30)
        hub.open("job-big")
        big = Preview("job-big", 640, 640, bytes(640 * 640 * 3), 0)
        hub.update(RenderUpdate(render_id="job-big", stage="step", step=1, total=1, preview=big))
        _settle(shared)
        (step,) = _read_all(redis_server.url, "job-big")
        assert step.name == "step" and step.data["step"] == 1 and step.encoded is None
        assert 30 < client.ttl("zimage:events:job-big") <= 90  # running: deadline + retention
        assert _counted(shared) == 4  # job-1's three events and job-big's step
        assert not any(_counted(shared, r) for r in ("queue_full", "redis_unavailable", "refused"))
    finally:
        asyncio.run(shared.close())


def test_a_taken_over_job_continues_above_the_earlier_runs_ids(
    redis_server: RedisServer,
) -> None:
    shared = SharedEvents(redis_server.url, retention_s=60)
    earlier, later = _hub(shared), _hub(shared)
    try:
        shared.track("job-2", time.time() + 30)
        earlier.open("job-2")
        for _ in range(MAXLEN + 250):  # more than kept: Redis trims the oldest
            earlier.update(RenderUpdate(render_id="job-2", stage="step", step=1, total=8))
        shared.track("job-2", time.time() + 30)
        later.open("job-2", first_id=takeover_id())
        later.update(RenderUpdate(render_id="job-2", stage="started", total=8))
        earlier.update(
            RenderUpdate(render_id="job-2", stage="step", step=2, total=8)
        )  # the stale run: refused
        _settle(shared)
        client = redis.Redis.from_url(redis_server.url)
        assert client.xlen("zimage:events:job-2") < MAXLEN + 250
        events = _read_all(redis_server.url, "job-2", after=MAXLEN + 250)
        assert [e.name for e in events] == ["started"] and events[0].id > 10**15
        assert _counted(shared, "refused") == 1  # the stale run's step
    finally:
        asyncio.run(shared.close())


def test_publishing_never_waits_when_redis_is_away(tmp_path: Path) -> None:
    shared = SharedEvents(f"redis://127.0.0.1:{free_port()}/0", retention_s=60)
    hub = _hub(shared)
    try:
        shared.track("job-3", time.time() + 30)
        hub.open("job-3")
        start = time.perf_counter()
        for step in range(5000):
            hub.update(RenderUpdate(render_id="job-3", stage="step", step=step, total=5000))
        took = time.perf_counter() - start
        assert took < 1.0, took  # no Redis round trip on the caller's thread
        # Beyond the bounded queue, or while Redis is away: each event counted as dropped.
        deadline = time.monotonic() + 10
        while _counted(shared, "queue_full") + _counted(shared, "redis_unavailable") < 5000:
            assert time.monotonic() < deadline
            time.sleep(0.01)
        assert _counted(shared, "queue_full") + _counted(shared, "redis_unavailable") == 5000
        assert _counted(shared) == 0 and _counted(shared, "refused") == 0
        subscription = hub.subscribe("job-3")
        hub.finish("job-3", "completed", {"request_id": "job-3"})
        names = [e.name for e in subscription._pending]
        assert names[-1] == "completed"  # local readers never noticed
    finally:
        asyncio.run(shared.close())


def _ids(events: Iterable[StreamEvent | None]) -> list[tuple[int, str, dict[str, Any]]]:
    return [(e.id, e.name, e.data) for e in events if e is not None]


def test_a_remote_reader_catches_up_like_a_local_one_then_follows_live(
    redis_server: RedisServer,
) -> None:
    """40 queue moves, the start and 30 steps with previews: a new or resuming reader gets
    the latest of each kind after its id on either side, then each live event as it comes."""
    shared = SharedEvents(redis_server.url, retention_s=60)
    hub = _hub(shared)
    rgb = bytes(range(256)) * 48  # 64 x 64 x 3

    async def never() -> str | None:
        return None

    async def scenario() -> None:
        client = redis.asyncio.Redis.from_url(redis_server.url, decode_responses=True)

        async def backlog(after: int) -> tuple[RemoteEvents, list[StreamEvent]]:
            reader, events = RemoteEvents(client, "job-4", after, never, poll_s=1.0), []
            while (event := await reader.next(0.15)) is not None:
                events.append(event)
            return reader, events

        try:
            for after in (0, 20, 40, 41, 50, 71):
                local = hub.subscribe("job-4", after or None)
                _reader, remote = await backlog(after)
                assert _ids(remote) == _ids(local._pending), after
                local.close()
            reader, remote = await backlog(0)
            assert [(e.id, e.name) for e in remote] == [
                (40, "queued"),
                (41, "started"),
                (71, "step"),
            ]
            assert remote[0].data["queue_position"] == 1 and remote[2].data["step"] == 30
            assert remote[2].encoded is not None and remote[2].encoded["width"] == 64
            live = hub.subscribe("job-4", 71)
            hub.update(RenderUpdate(render_id="job-4", stage="step", step=31, total=31))
            event = await reader.next(5)
            assert event is not None and (event.id, event.data["step"]) == (72, 31)
            hub.finish("job-4", "completed", {"request_id": "job-4"})
            event = await reader.next(5)
            assert event is not None and (event.id, event.name) == (73, "completed")
            assert [e.id for e in live._pending] == [72, 73]  # the same, locally
            for after in (0, 41, 72):  # ended: the terminal event always comes last
                local = hub.subscribe("job-4", after or None)
                _reader, remote = await backlog(after)
                assert _ids(remote) == _ids(local._pending) and remote[-1].terminal, after
        finally:
            await client.aclose()

    try:
        shared.track("job-4", time.time() + 30)
        hub.open("job-4")
        for position in range(40, 0, -1):  # ids 1..40, the last at queue position 1
            hub.update(RenderUpdate(render_id="job-4", stage="queued", position=position - 1))
        hub.update(RenderUpdate(render_id="job-4", stage="started", total=31))  # id 41
        for step in range(1, 31):  # ids 42..71
            preview = Preview("job-4", 64, 64, rgb, 0)
            hub.update(
                RenderUpdate(render_id="job-4", stage="step", step=step, total=31, preview=preview)
            )
        _settle(shared)
        asyncio.run(scenario())
    finally:
        asyncio.run(shared.close())
