"""A client is charged only for an image it can get: faults provoked for real against the
server on loopback (the tiny model, slowed per step), with the ledger checked after each.

What each test provokes: a v1 client hanging up mid-render; an OpenAI ``n`` > 1 request
refused part-way; v2 jobs past their key's in-flight cap and a burst past the queue
bound; a running job cancelled; a job whose image cannot be stored; the whole server
SIGKILLed mid-render (SQLite and PostgreSQL); the database lost during a render.
"""

from __future__ import annotations

import contextlib
import json
import shutil
import socket
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, ClassVar

import pytest
import requests

from tests.conftest import (
    ROOT,
    AnyServer,
    InProcessServer,
    PostgresOutage,
    Server,
    create_key,
    fresh_database_url,
)
from zimage_server.billing import Pricing, format_credits
from zimage_server.billing.pricing import MICRO

ADMIN = "money-admin"
STEP_S = 0.3
ENV = {
    "ZIMAGE_AUTH": "true",
    "ZIMAGE_ADMIN_TOKEN": ADMIN,
    "ZIMAGE_DEBUG_STEP_DELAY_S": str(STEP_S),
    "ZIMAGE_MAX_QUEUE": "4",
    "ZIMAGE_DEFAULT_MAX_IN_FLIGHT": "32",
    "ZIMAGE_DEFAULT_RATE_LIMIT": "1000/minute",
}
SLOW = {"prompt": "a slow heron", "width": 256, "height": 256, "steps": 8}  # ~2.4 s


def record(test: str, **figures: object) -> None:
    """Merge this test's measured figures into artifacts/money.json (RELIABILITY.md)."""
    path = ROOT / "artifacts" / "money.json"
    path.parent.mkdir(exist_ok=True)
    data = json.loads(path.read_text()) if path.exists() else {}
    data[test] = figures
    path.write_text(json.dumps(data, indent=2) + "\n")


def usage(server: AnyServer, key: str) -> dict[str, Any]:
    r = requests.get(
        f"{server.url}/admin/keys/{key.split('_')[1]}/usage",
        headers={"x-admin-token": ADMIN},
        timeout=10,
    )
    assert r.status_code == 200, r.text
    return dict(r.json())


def depth(server: AnyServer) -> int:
    return int(requests.get(server.url + "/readyz", timeout=10).json()["queue_depth"])


def wait_for(condition: Callable[[], bool], timeout: float, what: str) -> float:
    """Poll until ``condition``; returns the seconds it took."""
    start = time.monotonic()
    while not condition():
        if time.monotonic() - start > timeout:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(0.05)
    return time.monotonic() - start


def settled(server: AnyServer, key: str, balance: str) -> bool:
    used = usage(server, key)
    return used["pending"] == "0" and used["balance"] == balance == used["ledger_sum"]


@pytest.fixture(scope="module")
def money(tmp_path_factory: pytest.TempPathFactory) -> Iterator[InProcessServer]:
    srv = InProcessServer(tmp_path_factory.mktemp("money"), env=ENV)
    yield srv
    srv.stop()


def test_a_v1_client_that_hangs_up_is_not_charged_and_its_render_stops(
    money: InProcessServer,
) -> None:
    key = create_key(money, ADMIN, 10)
    body = json.dumps(SLOW).encode()
    host, port = money.url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port))) as conn:
        conn.sendall(
            b"POST /v1/z-image-turbo HTTP/1.1\r\nHost: 127.0.0.1\r\n"
            b"Content-Type: application/json\r\nx-api-key: " + key.encode() + b"\r\n"
            b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body
        )
        wait_for(lambda: usage(money, key)["pending"] != "0", 10, "the hold")
        time.sleep(3 * STEP_S)  # a few steps into the 8
    stopped = wait_for(lambda: depth(money) == 0, 10, "the render to stop")
    assert stopped < 4 * STEP_S  # it would otherwise run its remaining ~5 steps (1.5 s)
    refunded = wait_for(lambda: settled(money, key, "10"), 5, "the refund")
    record("v1 hang-up", render_stopped_s=round(stopped, 2), refunded_s=round(refunded, 2))
    assert usage(money, key)["images"] == 0
    assert '"status": 499' in money.log()  # the access log says the client left


def test_openai_n_refused_part_way_cancels_the_siblings(money: InProcessServer) -> None:
    """Two places of four are taken; n=3 gets a 429, and its two queued siblings go too."""
    busy, key = create_key(money, ADMIN, 10), create_key(money, ADMIN, 10)
    with ThreadPoolExecutor(max_workers=2) as pool:
        background = [pool.submit(money.post, SLOW, headers={"x-api-key": busy}) for _ in range(2)]
        wait_for(lambda: depth(money) == 2, 10, "two renders queued")
        r = requests.post(
            money.url + "/v1/images/generations",
            json={"prompt": "three herons", "n": 3, "size": "256x256"},
            headers={"Authorization": f"Bearer {key}"},
            timeout=30,
        )
        assert r.status_code == 429, r.text
        assert depth(money) == 2  # the siblings were withdrawn, not left to render unpaid
        assert [f.result().status_code for f in background] == [200, 200]
    assert settled(money, key, "10") and usage(money, key)["images"] == 0


def submit(server: AnyServer, key: str, body: dict[str, Any] | None = None) -> requests.Response:
    return requests.post(
        server.url + "/v2/z-image-turbo",
        json=body or {**SLOW, "steps": 2},
        headers={"x-api-key": key},
        timeout=30,
    )


def wait_job(server: AnyServer, job: dict[str, Any], key: str) -> dict[str, Any]:
    def done() -> bool:
        status = requests.get(job["status_url"], headers={"x-api-key": key}, timeout=10)
        return status.json()["status"] in ("COMPLETED", "FAILED", "CANCELLED")

    wait_for(done, 60, f"job {job['request_id']}")
    r = requests.get(job["response_url"], headers={"x-api-key": key}, timeout=10)
    return dict(r.json())


def test_v2_jobs_hold_their_key_in_flight_slots_until_they_end(money: InProcessServer) -> None:
    key = create_key(money, ADMIN, 10, max_in_flight=2)
    first = [submit(money, key) for _ in range(2)]
    assert [r.status_code for r in first] == [202, 202]
    third = submit(money, key)
    assert third.status_code == 429 and "2 requests in flight" in third.json()["error"]
    for r in first:
        assert wait_job(money, r.json(), key)["status"] == "COMPLETED"
    wait_for(lambda: submit(money, key).status_code == 202, 10, "a freed slot")


def test_a_burst_of_v2_submissions_never_exceeds_the_queue_bound(money: InProcessServer) -> None:
    key = create_key(money, ADMIN, 10)
    wait_for(lambda: depth(money) == 0, 30, "an empty queue")
    with ThreadPoolExecutor(max_workers=16) as pool:
        replies = list(pool.map(lambda _: submit(money, key, SLOW), range(16)))
    codes = sorted(r.status_code for r in replies)
    record("v2 burst", accepted=codes.count(202), refused=codes.count(429), bound=4)
    assert codes == [202] * 4 + [429] * 12, codes
    for r in replies:
        if r.status_code == 202:
            assert wait_job(money, r.json(), key)["status"] == "COMPLETED"
    price = Pricing().price(256, 256, 8)
    assert usage(money, key)["spent"] == format_credits(4 * price)


def test_cancelling_a_running_job_pays_for_the_steps_it_used(money: InProcessServer) -> None:
    key = create_key(money, ADMIN, 10)
    job = submit(money, key, SLOW).json()

    def at_step(n: int) -> bool:
        status = requests.get(job["status_url"], headers={"x-api-key": key}, timeout=10).json()
        step = (status.get("progress") or {}).get("step", 0)
        return status["status"] == "PROCESSING" and step >= n

    wait_for(lambda: at_step(2), 30, "the job to run two steps")
    cancel = requests.post(job["cancel_url"], headers={"x-api-key": key}, timeout=30)
    assert cancel.json()["status"] == "CANCELLED"
    used = usage(money, key)
    price = Pricing().price(256, 256, 8)
    spent = round(float(used["spent"]) * 1e6)
    record("cancel running", spent_fraction=round(spent / price, 3))
    assert 2 * price // 8 <= spent < price, (spent, price)  # paid for some steps, not all
    assert used["pending"] == "0" and used["balance"] == used["ledger_sum"]


class _Receiver(BaseHTTPRequestHandler):
    received: ClassVar[list[dict[str, Any]]] = []

    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers["Content-Length"]))
        _Receiver.received.append(json.loads(body))
        self.send_response(200)
        self.end_headers()

    def log_message(self, *_: object) -> None:
        pass


def test_a_job_whose_image_cannot_be_stored_fails_refunded_and_notified(tmp_path: Path) -> None:
    receiver = ThreadingHTTPServer(("127.0.0.1", 0), _Receiver)
    threading.Thread(target=receiver.serve_forever, daemon=True).start()
    env = {
        **ENV,
        "ZIMAGE_WEBHOOK_SECRET": "money-webhooks",
        "ZIMAGE_WEBHOOK_ALLOWED_HOSTS": '["127.0.0.1"]',
        "ZIMAGE_WEBHOOK_BACKOFF_S": "0.2",
    }
    server = InProcessServer(tmp_path / "srv", env=env)
    outputs = server.settings.outputs_dir
    try:
        key = create_key(server, ADMIN, 10)
        hook = f"http://127.0.0.1:{receiver.server_address[1]}/hook"
        job = submit(server, key, {**SLOW, "webhook_url": hook}).json()
        wait_for(lambda: depth(server) == 1, 10, "the job to queue")
        shutil.rmtree(outputs)
        outputs.write_text("not a folder: the output disk is gone")  # saving now fails
        result = wait_job(server, job, key)
        assert result["status"] == "FAILED" and "could not be stored" in result["error"]
        assert settled(server, key, "10") and usage(server, key)["images"] == 0
        wait_for(lambda: bool(_Receiver.received), 10, "the webhook")
        assert _Receiver.received[-1]["status"] == "FAILED"
    finally:
        outputs.unlink(missing_ok=True)
        outputs.mkdir(exist_ok=True)
        server.stop()
        receiver.shutdown()


@pytest.mark.parametrize("kind", ["sqlite", "postgresql"])
def test_a_server_killed_mid_render_gives_the_hold_back(kind: str, tmp_path: Path) -> None:
    env = {
        **ENV,
        "ZIMAGE_DATABASE_URL": fresh_database_url(kind, tmp_path),
        "ZIMAGE_REQUEST_TIMEOUT_S": "4",
        "ZIMAGE_HOLD_GRACE_S": "0.5",
    }
    first = Server(tmp_path / "srv", env=env)
    try:
        key = create_key(first, ADMIN, 10)
        threading.Thread(
            target=lambda: _swallow(lambda: first.post(SLOW, headers={"x-api-key": key})),
            daemon=True,
        ).start()
        wait_for(lambda: depth(first) == 1 and usage(first, key)["pending"] != "0", 10, "a hold")
        first.proc.kill()  # SIGKILL: no shutdown hooks run
        killed_at = time.monotonic()
    finally:
        first.stop()
    second = Server(tmp_path / "srv", env=env)
    ready_s = time.monotonic() - killed_at  # a restart takes 5-25 s on a loaded 2-core box
    try:
        wait_for(lambda: settled(second, key, "10"), 30, "the hold to come back")
        back_s = time.monotonic() - killed_at
        record(f"server killed ({kind})", hold_back_after_kill_s=round(back_s, 1))
        # Its deadline and grace from the kill, or the sweep at start and every few seconds
        # once the new server is up, whichever is later.
        assert back_s < max(4 + 0.5, ready_s) + 10
        assert usage(second, key)["images"] == 0
        quick = {**SLOW, "steps": 1}
        assert second.post(quick, headers={"x-api-key": key}).status_code == 200
    finally:
        second.stop()


def _swallow(call: Callable[[], object]) -> None:
    with contextlib.suppress(requests.RequestException):  # the server was killed under it
        call()


def test_a_database_lost_mid_render_keeps_the_hold_honestly_then_returns_it(
    tmp_path: Path,
) -> None:
    url = fresh_database_url("postgresql", tmp_path)
    outage = PostgresOutage(url)
    env = {
        **ENV,
        "ZIMAGE_DATABASE_URL": url,
        "ZIMAGE_REQUEST_TIMEOUT_S": "5",
        "ZIMAGE_HOLD_GRACE_S": "0.5",
    }
    server = InProcessServer(tmp_path / "srv", env=env)
    try:
        key = create_key(server, ADMIN, 10)
        with ThreadPoolExecutor(max_workers=1) as pool:
            reply = pool.submit(server.post, SLOW, headers={"x-api-key": key})
            wait_for(lambda: depth(server) == 1, 10, "the render")
            outage.begin()
            r = reply.result()
        assert r.status_code == 503, r.text
        error = r.json()["error"]
        assert "nothing was charged" not in error and "returned automatically" in error
        outage.end()
        back_s = wait_for(lambda: settled(server, key, "10"), 20, "the hold to come back")
        record("database lost", status=r.status_code, hold_back_after_restore_s=round(back_s, 1))
    finally:
        server.stop()
        outage.close()


def prompt_sources(server: AnyServer) -> dict[str, float]:
    text = requests.get(server.url + "/metrics", timeout=10).text
    counts = {}
    for line in text.splitlines():
        if line.startswith("zimage_prompt_embeddings_total{"):
            source = line.split('source="', 1)[1].split('"', 1)[0]
            counts[source] = float(line.rsplit(" ", 1)[1])
    return counts


def test_one_key_cannot_learn_another_key_prompt_from_the_cache(money: InProcessServer) -> None:
    """The prompt cache is per key: a second key's identical prompt is encoded afresh
    (no tell-tale fast ``text_encode``), while the first key still gets its own hits."""
    alice, mallory = create_key(money, ADMIN, 10), create_key(money, ADMIN, 10)
    body = {**SLOW, "prompt": "alice's unreleased product", "steps": 1}

    def render(key: str) -> dict[str, float]:
        before = prompt_sources(money)
        assert money.post(body, headers={"x-api-key": key}).status_code == 200
        after = prompt_sources(money)
        return {k: v - before.get(k, 0.0) for k, v in after.items() if v != before.get(k, 0.0)}

    assert render(alice) == {"encoded": 1.0}
    assert render(mallory) == {"encoded": 1.0}  # not "cache": alice's prompt stays hers
    assert render(alice) == {"cache": 1.0}


def test_a_streamed_render_says_what_it_cost(money: InProcessServer) -> None:
    """A stream carries what a plain answer does: the key's rate-limit headers, and the
    credits charged (in its last event, since the charge comes at the end)."""
    key = create_key(money, ADMIN, 10)
    body = {**SLOW, "steps": 2, "base_64": True}
    headers = {"x-api-key": key, "Accept": "text/event-stream"}
    with requests.post(
        money.url + "/v1/z-image-turbo", json=body, headers=headers, stream=True, timeout=60
    ) as reply:
        assert reply.status_code == 200 and "x-rate-limit-remaining" in reply.headers
        lines = [line for line in reply.iter_lines(decode_unicode=True) if line]
    completed = json.loads(lines[lines.index("event: completed") + 1].removeprefix("data: "))
    price = format_credits(Pricing().price(256, 256, 2))
    assert completed["credits_consumed"] == price
    assert completed["credits_remaining"] == usage(money, key)["balance"]


def slowed_holds(
    money: InProcessServer, monkeypatch: pytest.MonkeyPatch, gate: Callable[[], object]
) -> None:
    """The server's real ledger, each hold entered only once ``gate()`` returns."""
    ledger = money.app.state.generation.ledger
    real = ledger.hold

    def hold(*args: Any) -> int:
        gate()
        return int(real(*args))

    monkeypatch.setattr(ledger, "hold", hold)


def test_the_hold_commits_while_the_request_renders(
    money: InProcessServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A key whose balance covers the price queues and renders while its hold commits:
    one slow commit (a busy database disk) does not add to a render's latency. Here the
    hold waits until the request is in the engine's queue, which it never would be if the
    hold had to commit first."""
    key = create_key(money, ADMIN, 10)
    wait_for(lambda: depth(money) == 0, 10, "an idle queue")
    queued: list[bool] = []

    def until_queued() -> None:
        try:
            wait_for(lambda: depth(money) >= 1, 5, "the render to be queued")
        except AssertionError:
            queued.append(False)
        else:
            queued.append(True)

    slowed_holds(money, monkeypatch, until_queued)
    r = money.post({**SLOW, "steps": 2}, headers={"x-api-key": key})
    assert r.status_code == 200, r.text
    assert queued == [True]
    price = Pricing().price(256, 256, 2)
    assert settled(money, key, format_credits(10 * MICRO - price))


def test_two_requests_racing_for_one_image_of_credit(
    money: InProcessServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Both see a balance that covers one image, so both start rendering; their holds
    then meet in the database: one image is charged and delivered, the other is refused
    for insufficient credits (406, Segmind's status for it), its render stopped at once,
    and nothing is left held."""
    price = Pricing().price(256, 256, 8)
    key = create_key(money, ADMIN, float(format_credits(price)))
    both = threading.Barrier(2, timeout=20)  # neither hold commits before both requests ran

    def timed(_: int) -> tuple[requests.Response, float]:
        start = time.monotonic()
        reply = money.post(SLOW, headers={"x-api-key": key})  # 8 steps: at least 2.4 s
        return reply, time.monotonic() - start

    slowed_holds(money, monkeypatch, both.wait)
    with ThreadPoolExecutor(max_workers=2) as pool:
        replies = dict(pool.map(timed, [0, 1]))
    assert sorted(r.status_code for r in replies) == [200, 406], [r.text for r in replies]
    refused = next(r for r in replies if r.status_code == 406)
    assert "Insufficient credits" in refused.json()["error"]
    assert replies[refused] < 8 * STEP_S - 0.6, replies  # it did not render to the end
    assert settled(money, key, "0") and usage(money, key)["images"] == 1
    assert wait_for(lambda: depth(money) == 0, 10, "the queue to drain") < 10
