"""Segmind v2 async jobs over real HTTP: poll, cancel, idempotency, deadlines, webhooks,
and recovery after the server (a subprocess, for that test) is SIGKILLed."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
import requests

from tests.conftest import AnyServer, InProcessServer, Server, create_key
from zimage_server.billing import Pricing, format_credits
from zimage_server.jobs.webhooks import verify

ADMIN = "jobs-admin"
SECRET = "webhook-secret"
STEP_DELAY_S = 0.3
JOB = {"prompt": "an async fox", "width": 256, "height": 256, "steps": 2}
PRICE = Pricing().price(256, 256, 2)  # micro-credits of one JOB
ENV = {
    "ZIMAGE_AUTH": "true",
    "ZIMAGE_ADMIN_TOKEN": ADMIN,
    "ZIMAGE_WEBHOOK_SECRET": SECRET,
    "ZIMAGE_WEBHOOK_ALLOWED_HOSTS": '["127.0.0.1"]',
    "ZIMAGE_WEBHOOK_BACKOFF_S": "0.2",
    "ZIMAGE_DEBUG_STEP_DELAY_S": str(STEP_DELAY_S),
    "ZIMAGE_MAX_QUEUE": "32",
    "ZIMAGE_DEFAULT_MAX_IN_FLIGHT": "32",
    "ZIMAGE_DEFAULT_RATE_LIMIT": "1000/minute",
}


def new_key(server: AnyServer, credits: str = "10") -> str:
    return create_key(server, ADMIN, float(credits))


def usage(server: AnyServer, key: str) -> dict[str, Any]:
    r = requests.get(
        f"{server.url}/admin/keys/{key.split('_')[1]}/usage",
        headers={"x-admin-token": ADMIN},
        timeout=10,
    )
    return dict(r.json())


def submit(
    server: AnyServer, key: str, body: dict[str, Any] | None = None, **headers: str
) -> requests.Response:
    return requests.post(
        server.url + "/v2/z-image-turbo",
        json=body or JOB,
        timeout=30,
        headers={"x-api-key": key, **headers},
    )


def get(url: str, key: str) -> requests.Response:
    return requests.get(url, headers={"x-api-key": key}, timeout=30)


def wait_terminal(url: str, key: str, timeout: float = 60) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        body = get(url, key).json()
        if body["status"] in ("COMPLETED", "FAILED", "CANCELLED"):
            return dict(body)
        time.sleep(0.1)
    raise AssertionError(f"{url} did not finish")


@pytest.fixture(scope="module")
def jobs_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[InProcessServer]:
    server = InProcessServer(tmp_path_factory.mktemp("jobs"), env=ENV)
    yield server
    server.stop()


def test_submit_poll_result_matches_v1(jobs_server: InProcessServer) -> None:
    key = new_key(jobs_server)
    body = {**JOB, "seed": 99}
    r = submit(jobs_server, key, body)
    assert r.status_code == 202
    job = r.json()
    assert job["status"] == "QUEUED"
    for name in ("status_url", "response_url", "cancel_url"):
        assert job[name].startswith(jobs_server.url + "/v2/requests/" + job["request_id"])
    assert wait_terminal(job["status_url"], key)["status"] == "COMPLETED"
    result = get(job["response_url"], key).json()
    assert result["status"] == "COMPLETED" and result["seed"] == 99
    assert set(result["metrics"]) >= {"inference_time", "queue_time", "credits"}
    image = requests.get(result["output"], timeout=10).content
    v1 = jobs_server.post(body, headers={"x-api-key": key, "Accept": "image/*"})
    assert v1.status_code == 200 and v1.content == image
    listed = get(jobs_server.url + "/v2/requests", key).json()["requests"]
    assert [item["request_id"] for item in listed] == [job["request_id"]]


def test_base64_output(jobs_server: InProcessServer) -> None:
    key = new_key(jobs_server)
    job = submit(jobs_server, key, {**JOB, "base_64": True, "image_format": "png"}).json()
    wait_terminal(job["status_url"], key)
    import base64

    output = get(job["response_url"], key).json()["output"]
    assert base64.b64decode(output)[:8] == b"\x89PNG\r\n\x1a\n"


def test_ten_jobs_positions_cancel_queued_and_running(jobs_server: InProcessServer) -> None:
    key = new_key(jobs_server, "1")
    with ThreadPoolExecutor(max_workers=10) as pool:
        jobs = [r.json() for r in pool.map(lambda _: submit(jobs_server, key), range(10))]
    jobs.sort(key=lambda j: get(j["status_url"], key).json().get("queue_position") or 0)
    fifth, second, last = jobs[4], jobs[1], jobs[9]
    cancelled = requests.post(fifth["cancel_url"], headers={"x-api-key": key}, timeout=10).json()
    assert cancelled["status"] == "CANCELLED"
    positions = []
    while True:  # wait for the second to run, watching the last one's position fall
        positions.append(get(last["status_url"], key).json().get("queue_position"))
        if get(second["status_url"], key).json()["status"] == "PROCESSING":
            break
        time.sleep(0.05)
    running = requests.post(second["cancel_url"], headers={"x-api-key": key}, timeout=30).json()
    assert running["status"] == "CANCELLED"
    while (body := get(last["status_url"], key).json())["status"] == "QUEUED":
        positions.append(body["queue_position"])
        time.sleep(0.1)
    assert (
        positions[0] >= 7 and positions == sorted(positions, reverse=True) and min(positions) == 1
    )
    finals = {j["request_id"]: wait_terminal(j["status_url"], key)["status"] for j in jobs}
    expected = {j["request_id"]: "COMPLETED" for j in jobs}
    expected[fifth["request_id"]] = expected[second["request_id"]] = "CANCELLED"
    assert finals == expected
    used = usage(jobs_server, key)
    assert (
        used["images"] == 8
        and used["spent"] == format_credits(8 * PRICE)
        and used["ledger_sum"] == used["balance"]
    )
    again = requests.post(fifth["cancel_url"], headers={"x-api-key": key}, timeout=10)
    assert again.status_code == 409 and "already CANCELLED" in again.json()["error"]


def test_idempotency_key(jobs_server: InProcessServer) -> None:
    key = new_key(jobs_server)
    with ThreadPoolExecutor(max_workers=2) as pool:
        pair = list(
            pool.map(lambda _: submit(jobs_server, key, **{"Idempotency-Key": "abc"}), range(2))
        )
    assert [r.status_code for r in pair] == [202, 202]
    assert pair[0].json()["request_id"] == pair[1].json()["request_id"]
    assert len(get(jobs_server.url + "/v2/requests", key).json()["requests"]) == 1
    other = submit(jobs_server, key, {**JOB, "steps": 3}, **{"Idempotency-Key": "abc"})
    assert other.status_code == 409 and "different request body" in other.json()["error"]
    wait_terminal(pair[0].json()["status_url"], key)
    assert usage(jobs_server, key)["images"] == 1


def test_jobs_are_private_to_their_key(jobs_server: InProcessServer) -> None:
    owner, stranger = new_key(jobs_server), new_key(jobs_server)
    job = submit(jobs_server, owner).json()
    for url in (job["status_url"], job["response_url"]):
        assert get(url, stranger).status_code == 404
    assert (
        requests.post(job["cancel_url"], headers={"x-api-key": stranger}, timeout=10).status_code
        == 404
    )
    assert get(jobs_server.url + "/v2/requests", stranger).json()["requests"] == []
    assert get(job["status_url"], "zk_bad_key").status_code == 401


def test_deadline_fails_the_job_unbilled_and_v1_gets_504(jobs_server: InProcessServer) -> None:
    key = new_key(jobs_server)
    slow = {**JOB, "steps": 8}  # 8 x 0.3 s
    job = submit(jobs_server, key, slow, **{"X-Deadline-Seconds": "0.5"}).json()
    final = wait_terminal(job["status_url"], key)
    assert final["status"] == "FAILED" and "Deadline" in final["error"]
    assert get(job["status_url"], key).status_code == 422
    v1 = jobs_server.post(slow, headers={"x-api-key": key, "X-Deadline-Seconds": "0.5"})
    assert v1.status_code == 504
    bad = jobs_server.post(slow, headers={"x-api-key": key, "X-Deadline-Seconds": "soon"})
    assert bad.status_code == 400 and "X-Deadline-Seconds" in bad.json()["error"]
    used = usage(jobs_server, key)
    assert used["images"] == 0 and used["balance"] == "10"


class Receiver:
    """A webhook receiver on loopback that fails its first ``failures`` deliveries."""

    def __init__(self, failures: int) -> None:
        self.failures, self.received = failures, []
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers["Content-Length"]))
                outer.received.append((dict(self.headers), body))
                self.send_response(500 if len(outer.received) <= outer.failures else 200)
                self.end_headers()

            def log_message(self, *_args: object) -> None:
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/hook"


def test_webhook_retried_and_signed(jobs_server: InProcessServer) -> None:
    receiver = Receiver(failures=2)
    key = new_key(jobs_server)
    job = submit(jobs_server, key, {**JOB, "webhook_url": receiver.url}).json()
    wait_terminal(job["status_url"], key)
    deadline = time.monotonic() + 20
    while len(receiver.received) < 3 and time.monotonic() < deadline:
        time.sleep(0.1)
    receiver.httpd.shutdown()
    assert len(receiver.received) == 3
    headers, body = receiver.received[-1]
    payload = json.loads(body)
    assert payload["request_id"] == job["request_id"] and payload["status"] == "COMPLETED"
    assert payload["output"].startswith(jobs_server.url)
    assert verify(SECRET.encode(), headers["X-Zimage-Signature"], body)
    assert not verify(SECRET.encode(), headers["X-Zimage-Signature"], body.replace(b"}", b" }"))
    assert not verify(b"other-secret", headers["X-Zimage-Signature"], body)


@pytest.mark.parametrize("url", ["http://localhost:9/x", "http://10.1.2.3/x", "ftp://x/y", "x"])
def test_webhook_targets_not_allowed_are_refused(jobs_server: InProcessServer, url: str) -> None:
    key = new_key(jobs_server)
    r = submit(jobs_server, key, {**JOB, "webhook_url": url})
    assert r.status_code == 400 and "'webhook_url'" in r.json()["error"]
    assert usage(jobs_server, key)["images"] == 0


def test_restart_after_sigkill_runs_every_job_once(tmp_path: Path) -> None:
    data = tmp_path / "restart"
    first = Server(data, env=ENV)
    key = new_key(first, "1")
    jobs = [submit(first, key).json() for _ in range(4)]
    deadline = time.monotonic() + 30
    while get(jobs[0]["status_url"], key).json()["status"] != "PROCESSING":
        assert time.monotonic() < deadline
        time.sleep(0.05)
    first.proc.kill()  # SIGKILL: no shutdown hooks run
    first.stop()
    # The restart runs in process: its clock, not a sleep, takes the results past their TTL.
    second = InProcessServer(data, env={**ENV, "ZIMAGE_OUTPUT_TTL_S": "60"})
    try:
        for job in jobs:  # the new server listens on another port
            for name in ("status_url", "response_url"):
                job[name] = job[name].replace(first.url, second.url)
        finals = [wait_terminal(j["status_url"], key)["status"] for j in jobs]
        assert finals == ["COMPLETED"] * 4
        used = usage(second, key)
        assert used["images"] == 4 and used["spent"] == format_credits(4 * PRICE)
        assert used["balance"] == format_credits(1_000_000 - 4 * PRICE)
        assert get(jobs[0]["response_url"], key).status_code == 200
        with second.clock.travel(61):
            expired = get(jobs[0]["response_url"], key)
        assert expired.status_code == 404 and "expired" in expired.json()["error"]
    finally:
        second.stop()


def test_cli_sees_the_servers_key_store(jobs_server: InProcessServer) -> None:
    # `zimage keys` acts on the store the server uses, through ZIMAGE_DATA_DIR alone.
    prefix = new_key(jobs_server).split("_")[1]
    run = subprocess.run(
        [sys.executable, "-m", "zimage_server", "keys", "list"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        env={**os.environ, "ZIMAGE_DATA_DIR": str(jobs_server.data_dir)},
    )
    assert run.returncode == 0 and prefix in run.stderr
