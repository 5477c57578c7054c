"""A job's events on every API process: two tiny-model servers over one PostgreSQL store
and one Redis. A job runs on the process that took it (A); its event stream read on the
other (B) comes through Redis, complete and in order, previews included; a reader that
reconnects to either process with ``Last-Event-ID`` resumes without duplicates; and with
Redis stopped mid-render the render and the owner's own stream carry on, and the owner's
``/metrics`` count the events it could not write."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from tests.backing import RedisServer
from tests.conftest import Server, fresh_database_url
from tests.e2e.test_streams import Event, decode, names, parse

STEP_DELAY_S = 0.2
JOB: dict[str, Any] = {"prompt": "a fox on two processes", "width": 256, "height": 256}


@pytest.fixture(scope="module")
def pair(
    tmp_path_factory: pytest.TempPathFactory, redis_server: RedisServer
) -> Iterator[tuple[Server, Server]]:
    """Two ``zimage serve --tiny`` processes, started side by side."""
    data = tmp_path_factory.mktemp("pair")
    env = {
        "ZIMAGE_DATABASE_URL": fresh_database_url("postgresql", data),
        "ZIMAGE_STREAM_REDIS_URL": redis_server.url,  # limits stay in memory: auth is off
        "ZIMAGE_DEBUG_STEP_DELAY_S": str(STEP_DELAY_S),
        "ZIMAGE_STREAM_KEEPALIVE_S": "0.5",
    }
    first = Server(data, env=env, wait=False)
    second = Server(data, env=env, wait=False)
    first.wait_ready()
    second.wait_ready()
    yield first, second
    first.stop()
    second.stop()


def submit(server: Server, **fields: Any) -> str:
    reply = httpx.post(f"{server.url}/v2/z-image-turbo", json={**JOB, **fields}, timeout=30)
    assert reply.status_code == 202, reply.text
    return str(reply.json()["request_id"])


def read(server: Server, job_id: str, last: int | None = None, until: str = "") -> list[Event]:
    """The job's events from ``server``; with ``until``, the connection drops after the
    first event of that name."""
    headers = {"Last-Event-ID": str(last)} if last is not None else {}
    url = f"{server.url}/v2/requests/{job_id}/events"
    events: list[Event] = []
    with httpx.stream("GET", url, headers=headers, timeout=30) as reply:
        assert reply.status_code == 200
        for event in parse(reply.iter_lines()):
            events.append(event)
            if event[1] == until:
                break
    return events


WRITTEN = "zimage_shared_events_written_total"
DROPPED = 'zimage_shared_events_dropped_total{reason="redis_unavailable"}'


def scrape(server: Server) -> dict[str, float]:
    text = httpx.get(f"{server.url}/metrics", timeout=10).text
    pairs = (line.rpartition(" ") for line in text.splitlines() if not line.startswith("#"))
    return {series: float(value) for series, _, value in pairs if series}


def rises(server: Server, series: str, above: float) -> float:
    """The series once it is above ``above`` (the writer thread counts just after Redis
    answers), within 10 s."""
    deadline = time.monotonic() + 10
    while (value := scrape(server)[series]) <= above:
        assert time.monotonic() < deadline, (series, value)
        time.sleep(0.1)
    return value


def ids(events: list[Event]) -> list[int]:
    return [event_id for event_id, _, _ in events if event_id is not None]


def test_a_job_run_on_one_process_streams_in_full_from_the_other(
    pair: tuple[Server, Server],
) -> None:
    owner, other = pair
    job_id = submit(owner, steps=4, preview_size=32)
    events = read(other, job_id)
    assert names(events) == ["queued", "started", "step", "step", "step", "step", "completed"]
    assert ids(events) == sorted(set(ids(events))) and len(ids(events)) == len(events)
    steps = [data for _, name, data in events if name == "step"]
    assert [(s["step"], s["total"]) for s in steps] == [(1, 4), (2, 4), (3, 4), (4, 4)]
    assert all(decode(s["preview"]).size == (32, 32) for s in steps)
    for server in pair:  # the completed event is the body of GET /v2/requests/{id}
        final = httpx.get(f"{server.url}/v2/requests/{job_id}", timeout=10).json()
        assert events[-1][2] == final and final["status"] == "COMPLETED"
    numbered = {event_id: name for event_id, name, _ in events}
    replay = read(owner, job_id)  # the owner's replay: the latest of each kind, same ids
    assert names(replay) == ["queued", "started", "step", "completed"]
    assert all(numbered[event_id] == name for event_id, name, _ in replay), (replay, events)


def test_a_reader_resumes_on_either_process_without_duplicates(
    pair: tuple[Server, Server],
) -> None:
    owner, other = pair
    job_id = submit(owner, steps=6, preview=True)
    first = read(other, job_id, until="step")  # through Redis, then the connection drops
    second = read(owner, job_id, last=ids(first)[-1], until="step")  # the owner's hub
    rest = read(other, job_id, last=ids(second)[-1])  # Redis again, to the end
    seen = first + second + rest
    assert ids(seen) == sorted(set(ids(seen))), seen  # increasing: nothing twice
    assert names(first)[:2] == ["queued", "started"] and names(rest)[-1] == "completed"
    steps = [data["step"] for _, name, data in seen if name == "step"]
    assert steps == sorted(set(steps)) and steps[-1] == 6
    assert all(data["preview"]["width"] == 256 for _, name, data in seen if name == "step")
    # Past its terminal event, a finished job's stream sends that event again and ends.
    for server in pair:
        again = read(server, job_id, last=ids(rest)[-1])
        assert names(again) == ["completed"] and again[0][2]["status"] == "COMPLETED"


def test_with_redis_stopped_mid_render_the_render_and_local_stream_carry_on(
    pair: tuple[Server, Server], redis_server: RedisServer
) -> None:
    owner, other = pair
    before = scrape(owner)
    job_id = submit(owner, steps=8)
    local: list[Event] = []
    reader = threading.Thread(target=lambda: local.extend(read(owner, job_id)), daemon=True)
    reader.start()
    remote = read(other, job_id, until="step")  # through Redis while it is up
    rises(owner, WRITTEN, before[WRITTEN])
    redis_server.stop()
    try:
        started = time.monotonic()
        rest = read(other, job_id, last=ids(remote)[-1])  # Redis away: the store says the end
        reader.join(30)
        took = time.monotonic() - started
    finally:
        redis_server.start()
    assert names(local)[:2] == ["queued", "started"] and names(local)[-1] == "completed"
    assert [data["step"] for _, name, data in local if name == "step"][-1] == 8
    assert names(rest)[-1] == "completed" and rest[-1][2]["status"] == "COMPLETED"
    assert took < 8 * STEP_DELAY_S + 10, took  # not stalled behind Redis
    assert "Redis is unavailable" in owner.log()  # its events were being dropped meanwhile
    away = scrape(owner)
    assert away[DROPPED] > before[DROPPED], (before, away)
    # Redis back: the next job's events reach the other process again, and are counted.
    assert names(read(other, submit(owner, steps=2)))[-1] == "completed"
    rises(owner, WRITTEN, away[WRITTEN])
