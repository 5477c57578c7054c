"""Operations: metrics, structured logs, readiness states, graceful shutdown, and each
failure mode provoked for real (bodies too big, disk full, database gone, load bursts).

``ops`` is a subprocess (``zimage serve``): its tests read the CLI's JSON log, the
workers' own log lines included. Drain needs a process to signal. The other failure modes
run in process."""

from __future__ import annotations

import itertools
import json
import signal
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

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

ADMIN = "ops-admin"
SMALL = {"prompt": "an operator's cat", "width": 256, "height": 256, "steps": 1}


def new_key(server: AnyServer, credits: float = 10) -> str:
    return create_key(server, ADMIN, credits)


def balance(server: AnyServer, key: str) -> str:
    r = requests.get(
        f"{server.url}/admin/keys/{key.split('_')[1]}/usage",
        headers={"x-admin-token": ADMIN},
        timeout=10,
    )
    return str(r.json()["balance"])


@pytest.fixture(scope="module")
def ops(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    server = Server(
        tmp_path_factory.mktemp("ops"),
        env={
            "ZIMAGE_AUTH": "true",
            "ZIMAGE_ADMIN_TOKEN": ADMIN,
            "ZIMAGE_MAX_QUEUE": "4",
            "ZIMAGE_DEFAULT_MAX_IN_FLIGHT": "64",
            "ZIMAGE_DEFAULT_RATE_LIMIT": "10000/minute",
            "ZIMAGE_DEBUG_FAULTS": "true",
        },
    )
    yield server
    server.stop()


def test_metrics_after_a_render(ops: Server) -> None:
    key = new_key(ops)
    assert ops.post(SMALL, headers={"x-api-key": key}).status_code == 200
    text = requests.get(ops.url + "/metrics", timeout=10).text
    prefix = key.split("_")[1]
    assert 'zimage_requests_total{method="POST",route="/v1/{model}",status="200"}' in text
    for stage in ("queue_wait", "text_encode", "denoise", "vae_decode", "image_encode"):
        assert f'zimage_stage_duration_seconds_count{{stage="{stage}"}}' in text
    for stage in ("auth", "credits_hold", "credits_capture"):  # what the key's checks cost
        assert f'zimage_stage_duration_seconds_count{{stage="{stage}"}} 1.0' in text
    assert f'zimage_images_total{{key="{prefix}"}} 1.0' in text
    assert f'zimage_gpu_seconds_total{{key="{prefix}"}}' in text
    for name in (
        "zimage_queue_depth",
        "zimage_batch_size_count",
        "zimage_worker_restarts",
        "zimage_model_load_seconds",
        "zimage_ready 1.0",
    ):
        assert name in text
    assert key not in text


def test_a_keyed_render_times_its_key_check_and_ledger_commits(ops: Server) -> None:
    """``timings`` shows what the key adds to a request (outside ``generation_time``,
    which starts after the hold): its check, the credit hold's commit, the capture's."""
    r = ops.post(SMALL, headers={"x-api-key": new_key(ops)})
    timings = r.json()["timings"]
    for stage in ("auth", "credits_hold", "credits_capture"):
        assert 0 < timings[stage] < 5, timings


def test_logs_are_json_lines_without_keys_or_prompts(ops: Server) -> None:
    key = new_key(ops)
    secret_prompt = "a very private prompt 7731"
    r = ops.post(
        {**SMALL, "prompt": secret_prompt},
        headers={"x-api-key": key, "X-Request-ID": "ops-trace-1"},
    )
    assert r.status_code == 200
    time.sleep(0.2)
    lines = [json.loads(line) for line in ops.log().splitlines() if line.startswith("{")]
    access = [e for e in lines if e.get("request_id") == "ops-trace-1"]
    assert len(access) == 1
    entry = access[0]
    assert entry["status"] == 200 and entry["log_key"] == key.split("_")[1]
    assert entry["log_seed"] == r.json()["seed"] and "denoise" in entry["log_timings"]
    assert key not in ops.log() and secret_prompt not in ops.log()


def test_body_over_the_limit_is_413(ops: Server) -> None:
    r = requests.post(
        ops.url + "/v1/z-image-turbo",
        data=b"{" + b" " * 2_000_000 + b"}",
        headers={"Content-Type": "application/json"},
        timeout=30,
    )
    assert r.status_code == 413 and "at most 1048576 bytes" in r.json()["error"]


def test_burst_of_ten_times_the_queue(ops: Server) -> None:
    key = new_key(ops, 1000)

    def call(_: int) -> tuple[int, float]:
        start = time.monotonic()
        status = ops.post(SMALL, headers={"x-api-key": key}).status_code
        return status, time.monotonic() - start

    with ThreadPoolExecutor(max_workers=40) as pool:
        results = list(pool.map(call, range(40)))
    statuses = {status for status, _ in results}
    figures = {
        "requests": len(results),
        "threads": 40,
        "max_queue": 4,
        "ok": sum(1 for status, _ in results if status == 200),
        "rejected_429": sum(1 for status, _ in results if status == 429),
        "max_latency_s": round(max(seconds for _, seconds in results), 3),
    }
    (ROOT / "artifacts").mkdir(exist_ok=True)
    (ROOT / "artifacts" / "burst.json").write_text(json.dumps(figures, indent=2) + "\n")
    assert statuses <= {200, 429} and 200 in statuses and 429 in statuses
    assert max(seconds for _, seconds in results) < 120
    ready = requests.get(ops.url + "/readyz", timeout=10).json()
    assert ready["status"] == "READY" and ready["queue_depth"] == 0
    oks = sum(1 for status, _ in results if status == 200)
    assert balance(ops, key) == f"{1000 - 0.01 * oks:g}"


def test_full_output_disk_is_507_and_unbilled(tmp_path: Path) -> None:
    server = InProcessServer(  # the null model: the disk is refused before any render
        tmp_path / "full",
        env={
            "ZIMAGE_MODEL": "null",
            "ZIMAGE_AUTH": "true",
            "ZIMAGE_ADMIN_TOKEN": ADMIN,
            "ZIMAGE_OUTPUT_MIN_FREE_BYTES": str(10**18),
        },
    )
    try:
        key = new_key(server)
        r = server.post(SMALL, headers={"x-api-key": key})
        assert r.status_code == 507 and "output disk is full" in r.json()["error"]
        assert balance(server, key) == "10"
    finally:
        server.stop()


def test_model_that_never_loads_ends_failed(tmp_path: Path) -> None:
    broken = tmp_path / "broken-model"
    broken.mkdir()
    (broken / "model_index.json").write_text('{"_class_name": "ZImagePipeline"}')
    server = InProcessServer(
        tmp_path / "failed",
        env={"ZIMAGE_AUTH": "false", "ZIMAGE_MODEL": str(broken)},
        wait=False,
    )
    try:
        deadline = time.monotonic() + 180
        while (ready := requests.get(server.url + "/readyz", timeout=10)).json()[
            "status"
        ] != "FAILED":
            assert time.monotonic() < deadline, ready.text
            time.sleep(0.5)
        assert ready.status_code == 503 and ready.json()["reason"]
        r = server.post(SMALL)
        assert r.status_code == 503 and "failed to load" in r.json()["error"]
        assert server.worker_pids() == []  # no restart loop
    finally:
        server.stop()


def test_workers_killed_while_loading_back_off_then_fail_with_the_reason(tmp_path: Path) -> None:
    """A worker that dies before it can report (here SIGKILLed while it loads, as by an
    OOM killer or a wrong user) is restarted after 0.5 s, then 1 s, and after the third
    death the server is FAILED and says how the worker died: no hot restart loop."""
    import psutil

    server = InProcessServer(  # a slow warm-up (4 steps x 1 s): time to kill each start
        tmp_path / "killed",
        env={"ZIMAGE_WARMUP_STEPS": "4", "ZIMAGE_DEBUG_STEP_DELAY_S": "1"},
        wait=False,
    )
    killed: dict[int, float] = {}
    try:
        deadline = time.monotonic() + 120
        while (ready := requests.get(server.url + "/readyz", timeout=10).json())[
            "status"
        ] != "FAILED":
            assert time.monotonic() < deadline, ready
            for pid in server.worker_pids():
                if pid not in killed:
                    psutil.Process(pid).kill()
                    killed[pid] = time.monotonic()
            time.sleep(0.02)
        assert ready["reason"] == (
            "the worker was killed by SIGKILL while loading the model (3 failed starts)"
        )
        time.sleep(2)
        assert server.worker_pids() == [] and len(killed) == 3  # nothing restarts it
        starts = [
            float(json.loads(line)["ts"])
            for line in server.log().splitlines()
            if "started on" in line
        ]
        gaps = [b - a for a, b in itertools.pairwise(starts)]
        assert len(starts) == 3 and gaps[0] >= 0.5 and gaps[1] >= 1.0, gaps
        r = server.post(SMALL)
        assert r.status_code == 503 and "killed by SIGKILL" in r.json()["error"]
    finally:
        server.stop()


def test_database_down_is_503_and_loses_nothing(tmp_path: Path) -> None:
    url = fresh_database_url("postgresql", tmp_path)
    outage = PostgresOutage(url)
    server = InProcessServer(  # the null model: what matters is the store, not the image
        tmp_path / "db",
        env={
            "ZIMAGE_MODEL": "null",
            "ZIMAGE_AUTH": "true",
            "ZIMAGE_ADMIN_TOKEN": ADMIN,
            "ZIMAGE_DATABASE_URL": url,
        },
    )
    try:
        key = new_key(server)
        outage.begin()
        r = server.post(SMALL, headers={"x-api-key": key})
        assert r.status_code == 503 and "database is unavailable" in r.json()["error"]
        assert r.headers["retry-after"]
        outage.end()
        assert balance(server, key) == "10"
        assert server.post(SMALL, headers={"x-api-key": key}).status_code == 200
    finally:
        server.stop()
        outage.close()


def test_sqlite_file_deleted_under_the_server_fails_closed(tmp_path: Path) -> None:
    """SQLite would go on writing to the unlinked file (all of it lost at the next start):
    the server notices the file is gone and refuses what needs the store, with the reason."""
    url = fresh_database_url("sqlite", tmp_path)
    server = InProcessServer(
        tmp_path / "gone",
        env={
            "ZIMAGE_MODEL": "null",
            "ZIMAGE_AUTH": "true",
            "ZIMAGE_ADMIN_TOKEN": ADMIN,
            "ZIMAGE_DATABASE_URL": url,
        },
    )
    try:
        key = new_key(server)
        assert server.post(SMALL, headers={"x-api-key": key}).status_code == 200
        for suffix in ("", "-wal", "-shm"):
            Path(url.split("///", 1)[1] + suffix).unlink(missing_ok=True)
        r = server.post(SMALL, headers={"x-api-key": key})
        assert r.status_code == 503, r.text
        assert (
            "store.db was removed or replaced" in r.json()["error"]
            and "restart" in r.json()["error"]
        )
        admin = requests.post(
            server.url + "/admin/keys",
            headers={"x-admin-token": ADMIN},
            json={"name": "lost", "credits": 5},
            timeout=10,
        )
        assert admin.status_code == 503
        ready = requests.get(server.url + "/readyz", timeout=10)
        assert ready.status_code == 503 and ready.json()["status"] == "UNAVAILABLE"
        assert "was removed" in ready.json()["reason"]
        assert requests.get(server.url + "/healthz", timeout=10).status_code == 200
        assert not Path(url.split("///", 1)[1]).exists()  # nothing written to a new file either
    finally:
        server.stop()


def test_sigterm_drains_in_flight_and_exits_zero(tmp_path: Path) -> None:
    server = Server(  # not given the shared tiny model: this one builds it, as users' do
        tmp_path / "drain",
        env={"ZIMAGE_MAX_QUEUE": "8", "ZIMAGE_DEBUG_STEP_DELAY_S": "0.3"},
        seed_tiny=False,
    )
    slow = {**SMALL, "steps": 3}
    results: list[int] = []
    threads = [
        threading.Thread(target=lambda: results.append(server.post(slow).status_code))
        for _ in range(4)
    ]
    for thread in threads:
        thread.start()
    time.sleep(1.0)
    server.proc.send_signal(signal.SIGTERM)
    time.sleep(0.3)
    refused = server.post(SMALL)
    assert refused.status_code == 503 and refused.headers["retry-after"] == "5"
    assert requests.get(server.url + "/healthz", timeout=5).status_code == 200
    ready = requests.get(server.url + "/readyz", timeout=5)  # a balancer must move on
    assert ready.status_code == 503 and ready.json()["status"] == "DRAINING"
    for thread in threads:
        thread.join(60)
    assert results == [200, 200, 200, 200]
    assert server.proc.wait(timeout=60) == 0
    server.stop()


def test_out_of_memory_fails_one_request_and_the_worker_keeps_serving(ops: Server) -> None:
    key = new_key(ops)
    pids = ops.worker_pids()
    r = ops.post({**SMALL, "prompt": "[[fault:oom]] a cat"}, headers={"x-api-key": key})
    assert r.status_code == 500 and "Out of accelerator memory" in r.json()["error"]
    assert ops.post(SMALL, headers={"x-api-key": key}).status_code == 200
    assert ops.worker_pids() == pids
    assert balance(ops, key) == "9.99"


def test_worker_killed_mid_batch_requeues_async_jobs(ops: Server) -> None:
    import psutil

    key = new_key(ops)
    headers = {"x-api-key": key}
    job = requests.post(
        ops.url + "/v2/z-image-turbo",
        headers=headers,
        timeout=10,
        json={**SMALL, "width": 1024, "height": 1024, "steps": 30},
    ).json()
    deadline = time.monotonic() + 60
    while (
        requests.get(job["status_url"], headers=headers, timeout=10).json()["status"]
        != "PROCESSING"
    ):
        assert time.monotonic() < deadline
        time.sleep(0.05)
    psutil.Process(ops.worker_pids()[0]).kill()
    sync = ops.post({**SMALL, "prompt": "[[fault:exit]] dies mid-batch"}, headers=headers)
    while (status := requests.get(job["status_url"], headers=headers, timeout=10).json())[
        "status"
    ] not in ("COMPLETED", "FAILED"):
        assert time.monotonic() < deadline + 120
        time.sleep(0.2)
    assert status["status"] == "COMPLETED"
    assert sync.status_code == 502
    usage = requests.get(
        f"{ops.url}/admin/keys/{key.split('_')[1]}/usage",
        headers={"x-admin-token": ADMIN},
        timeout=10,
    ).json()
    assert usage["images"] == 1 and usage["spent"] == "3.75"


def test_request_id_reaches_error_bodies_and_the_worker_log(ops: Server) -> None:
    key = new_key(ops)
    r = ops.post(
        {**SMALL, "prompt": "[[fault:error]] a cat"},
        headers={"x-api-key": key, "X-Request-ID": "trace-fault-9"},
    )
    assert r.status_code == 500 and r.json()["request_id"] == "trace-fault-9"
    assert "injected by [[fault:error]]" in r.json()["error"]
    deadline = time.monotonic() + 10
    while "(requests trace-fault-9) failed" not in ops.log():
        assert time.monotonic() < deadline
        time.sleep(0.1)
    assert balance(ops, key) == "10"
