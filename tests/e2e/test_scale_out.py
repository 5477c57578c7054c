"""Two API processes over one PostgreSQL store and one Redis: jobs and webhooks run under
leases (a SIGKILLed process's work is taken over and completes exactly once, billed once),
and a key's limits hold across both processes."""

from __future__ import annotations

import contextlib
import json
import threading
import time
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest
import redis
import requests
import sqlalchemy as sa

from tests.backing import RedisServer
from tests.conftest import Server, create_key, fresh_database_url
from tests.e2e.test_jobs import Receiver, submit, usage, wait_terminal
from zimage_server.billing import Pricing, format_credits

ADMIN = "jobs-admin"  # test_jobs' helpers speak to servers with this token
JOB = {"prompt": "a fox on two replicas", "width": 256, "height": 256, "steps": 4}
PRICE = Pricing().price(256, 256, 4)
LEASE_S = 1.5


@pytest.fixture(scope="module")
def pair(
    tmp_path_factory: pytest.TempPathFactory, redis_server: RedisServer
) -> Iterator[tuple[Server, Server, str]]:
    """Two ``zimage serve --model null`` processes on one store, one Redis, one folder."""
    data = tmp_path_factory.mktemp("pair")
    database = fresh_database_url("postgresql", data)
    env = {
        "ZIMAGE_AUTH": "true",
        "ZIMAGE_ADMIN_TOKEN": ADMIN,
        "ZIMAGE_DATABASE_URL": database,
        "ZIMAGE_RATE_LIMIT_STORAGE": redis_server.url,
        "ZIMAGE_JOB_LEASE_S": str(LEASE_S),
        "ZIMAGE_DEBUG_STEP_DELAY_S": "0.15",
        "ZIMAGE_WEBHOOK_SECRET": "s",
        "ZIMAGE_WEBHOOK_ALLOWED_HOSTS": '["127.0.0.1"]',
        "ZIMAGE_WEBHOOK_BACKOFF_S": "0.2",
        "ZIMAGE_MAX_QUEUE": "64",
        "ZIMAGE_DEFAULT_MAX_IN_FLIGHT": "64",
        "ZIMAGE_DEFAULT_RATE_LIMIT": "1000/minute",
        "ZIMAGE_REQUEST_TIMEOUT_S": "5",
        "ZIMAGE_HOLD_GRACE_S": "1",
    }
    args = ("--model", "null")
    first = Server(data, env=env, args=args, wait=False)
    second = Server(data, env=env, args=args, wait=False)
    first.start()
    second.start()
    yield first, second, database
    first.stop()
    second.stop()


def test_a_keys_limits_hold_across_both_processes(pair: tuple[Server, Server, str]) -> None:
    first, second, _ = pair
    limited = create_key(first, ADMIN, 10, rate_limit="5/minute")
    answers = [submit((first, second)[i % 2], limited).status_code for i in range(12)]
    assert Counter(answers) == {202: 5, 429: 7}
    capped = create_key(second, ADMIN, 10, max_in_flight=2)  # each job holds a slot
    answers = [submit((first, second)[i % 2], capped).status_code for i in range(4)]
    assert Counter(answers) == {202: 2, 429: 2}


def test_readyz_names_the_replica_and_the_clusters_queue(
    pair: tuple[Server, Server, str],
) -> None:
    first, second, _ = pair
    key = create_key(first, ADMIN, 10)
    for _ in range(6):  # more than one process renders at once (0.6 s each)
        assert submit(first, key, JOB).status_code == 202
    deadline = time.monotonic() + 10
    while True:  # each replica's heartbeat reads the store's view every LEASE_S / 3
        ready = [requests.get(s.url + "/readyz", timeout=10).json() for s in (first, second)]
        if all(r["cluster_queue_depth"] >= 3 for r in ready):
            break
        assert time.monotonic() < deadline, ready
        time.sleep(0.1)
    assert ready[0]["replica"] != ready[1]["replica"]
    assert all(r["cluster_oldest_wait_s"] > 0 for r in ready)
    metrics = requests.get(second.url + "/metrics", timeout=10).text
    assert "zimage_cluster_queue_depth" in metrics


def test_a_stream_read_on_the_other_process_gets_the_end(
    pair: tuple[Server, Server, str],
) -> None:
    """A balancer may send the events reader to a process that is not running the job:
    it learns the end from the store and sends the terminal event, then closes."""
    first, second, _ = pair
    key = create_key(first, ADMIN, 10)
    job = submit(first, key, JOB).json()
    started = time.monotonic()
    with requests.get(
        f"{second.url}/v2/requests/{job['request_id']}/events",
        headers={"x-api-key": key},
        stream=True,
        timeout=30,
    ) as reply:
        events = [line for line in reply.iter_lines(decode_unicode=True) if line]
    assert "event: completed" in events, events
    assert time.monotonic() - started < 15  # not the 30 s timeout: the stream ended


def test_sigkill_mid_burst_loses_nothing_and_bills_once(
    pair: tuple[Server, Server, str], redis_server: RedisServer
) -> None:
    first, second, database = pair
    key = create_key(first, ADMIN, 1)
    receiver = Receiver(failures=0)
    body = {**JOB, "webhook_url": receiver.url}
    with ThreadPoolExecutor(max_workers=8) as pool:
        jobs = list(pool.map(lambda i: submit((first, second)[i % 2], key, body), range(16)))
    assert [r.status_code for r in jobs] == [202] * 16
    # v1 requests on the one to be killed: they wait behind its jobs, in flight at the kill.
    doomed = [_v1_in_background(first, key) for _ in range(3)]
    time.sleep(1.5)  # each process has rendered two of its eight jobs (0.6 s each)
    first.proc.kill()  # SIGKILL: no shutdown hooks, its leases simply stop being renewed
    first.stop()
    survivor = second.post(JOB, headers={"x-api-key": key})
    assert survivor.status_code == 200
    for thread in doomed:
        thread.join(30)
    finals = [
        wait_terminal(job.json()["status_url"].replace(first.url, second.url), key, timeout=90)
        for job in jobs
    ]
    assert [f["status"] for f in finals] == ["COMPLETED"] * 16
    expected = 1_000_000 - 17 * PRICE  # 16 jobs and the survivor's v1 request
    deadline = time.monotonic() + 30  # the killed v1 holds come back after deadline + grace
    while (used := usage(second, key))["balance"] != format_credits(expected):
        assert time.monotonic() < deadline, used
        time.sleep(0.25)
    assert used["images"] == 17 and used["spent"] == format_credits(17 * PRICE)
    assert used["ledger_sum"] == used["balance"]
    _assert_each_job_billed_once(database, [f["request_id"] for f in finals])
    _assert_webhooks_once(receiver, {f["request_id"] for f in finals})
    _assert_slots_come_back(redis_server)


def _v1_in_background(server: Server, key: str) -> threading.Thread:
    def call() -> None:
        with contextlib.suppress(requests.ConnectionError):  # killed under it: the point
            server.post(JOB, headers={"x-api-key": key})

    thread = threading.Thread(target=call, daemon=True)
    thread.start()
    return thread


def _assert_each_job_billed_once(database: str, job_ids: list[str]) -> None:
    engine = sa.create_engine(database)
    with engine.connect() as connection:
        rows = connection.execute(
            sa.text("SELECT reference, kind FROM ledger WHERE reference IS NOT NULL")
        ).all()
        pending = connection.execute(sa.text("SELECT count(*) FROM pending_holds")).scalar()
    engine.dispose()
    kinds = Counter((reference, kind) for reference, kind in rows if reference in job_ids)
    assert all(kinds[(job, "hold")] == 1 for job in job_ids), kinds
    assert not any(kind != "hold" for _, kind in kinds), kinds  # no release of a job's hold
    assert pending == 0


def _assert_webhooks_once(receiver: Receiver, job_ids: set[str]) -> None:
    """One delivery per job (a delivery may repeat under its id only if a process died
    between the receiver's answer and the row's update: at least once, deduplicated)."""
    deadline = time.monotonic() + 20
    while len({_job_of(body) for _, body in receiver.received}) < len(job_ids):
        assert time.monotonic() < deadline
        time.sleep(0.1)
    time.sleep(LEASE_S)  # no late duplicate
    receiver.httpd.shutdown()
    deliveries: dict[str, set[str]] = {}
    for headers, body in receiver.received:
        deliveries.setdefault(_job_of(body), set()).add(headers["X-Zimage-Delivery"])
    assert set(deliveries) == job_ids
    assert all(len(ids) == 1 for ids in deliveries.values()), deliveries
    assert all(json.loads(body)["status"] == "COMPLETED" for _, body in receiver.received)


def _job_of(body: bytes) -> str:
    return str(json.loads(body)["request_id"])


def _assert_slots_come_back(server: RedisServer) -> None:
    """The killed process's in-flight slots expire: no key keeps a slot once idle."""
    client: Any = redis.Redis.from_url(server.url)
    deadline = time.monotonic() + LEASE_S + 5
    while True:
        now = float(client.time()[0]) + 1
        live = {k: client.zcount(k, now, "+inf") for k in client.scan_iter("zimage:inflight:*")}
        if not any(live.values()):
            break
        assert time.monotonic() < deadline, live
        time.sleep(0.25)
    client.close()
