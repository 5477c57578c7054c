"""Admission control, deadlines, output expiry and readiness on a deliberately slow server."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests

from tests.conftest import InProcessServer

STEP_DELAY_S = 0.5


@pytest.fixture(scope="module")
def slow_server(
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[tuple[InProcessServer, int]]:
    srv = InProcessServer(
        tmp_path_factory.mktemp("slow"),
        env={
            "ZIMAGE_MAX_QUEUE": "1",
            "ZIMAGE_REQUEST_TIMEOUT_S": "2",
            "ZIMAGE_DEBUG_STEP_DELAY_S": str(STEP_DELAY_S),
            "ZIMAGE_OUTPUT_TTL_S": "2",
        },
        wait=False,
    )
    first_ready = requests.get(srv.url + "/readyz", timeout=5)
    srv.wait_ready()
    yield srv, first_ready.status_code
    srv.stop()


def test_readyz_is_503_until_the_model_is_loaded(slow_server: tuple[InProcessServer, int]) -> None:
    server, first_status = slow_server
    assert first_status == 503
    assert requests.get(server.url + "/healthz", timeout=5).status_code == 200
    assert requests.get(server.url + "/readyz", timeout=5).json()["status"] == "READY"


def test_full_queue_is_429_and_deadline_is_504(slow_server: tuple[InProcessServer, int]) -> None:
    server, _ = slow_server
    slow = {"prompt": "slow", "width": 256, "height": 256, "steps": 8}  # 8 x 0.5 s > 2 s
    result: dict[str, requests.Response] = {}
    thread = threading.Thread(target=lambda: result.setdefault("r", server.post(slow)))
    thread.start()
    until = time.monotonic() + 30  # the slow request is queued (a busy machine may lag)
    while requests.get(server.url + "/readyz", timeout=5).json()["queue_depth"] < 1:
        assert time.monotonic() < until, "the slow request never reached the queue"
        time.sleep(0.05)
    busy = server.post({**slow, "steps": 1})
    ready = requests.get(server.url + "/readyz", timeout=5)
    assert ready.status_code == 503 and ready.json()["status"] == "BUSY"
    assert busy.status_code == 429
    assert int(busy.headers["retry-after"]) >= 1
    assert "queue is full" in busy.json()["error"]
    thread.join(30)
    timed_out = result["r"]
    assert timed_out.status_code == 504 and "deadline" in timed_out.json()["error"]
    # The abandoned render is cancelled between steps, so the worker is free again soon.
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        quick = server.post({**slow, "steps": 1})
        if quick.status_code == 200:
            break
        time.sleep(0.2)
    assert quick.status_code == 200
    assert "cancelled between steps" in server.log()


def test_outputs_expire_after_their_ttl(slow_server: tuple[InProcessServer, int]) -> None:
    server, _ = slow_server
    deadline = time.monotonic() + 60
    while (
        r := server.post({"prompt": "ttl", "width": 256, "height": 256, "steps": 1})
    ).status_code != 200:
        assert time.monotonic() < deadline, r.text  # 429/504 while a slow machine catches up
        time.sleep(0.5)
    body = r.json()
    assert requests.get(body["image"], timeout=5).status_code == 200
    with server.clock.travel(2.5):  # the server's clock, instead of waiting 2.5 s
        expired = requests.get(body["image"], timeout=5)
    assert expired.status_code == 404 and "expired" in expired.json()["error"]


def test_startup_error_is_one_line(tmp_path: Path) -> None:
    import subprocess
    import sys

    run = subprocess.run(
        [sys.executable, "-m", "zimage_server", "serve", "--model", "Nobody/No-Such-Model"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        env={"ZIMAGE_DATA_DIR": str(tmp_path), "HF_HOME": str(tmp_path / "hf"), "PATH": ""},
    )
    assert run.returncode == 2
    assert "Traceback" not in run.stderr
    lines = [line for line in run.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "hf download Nobody/No-Such-Model" in lines[0]
