"""Two API processes over one PostgreSQL store, one with ControlNet weights and one without:
each claims only the jobs whose task it renders. The ControlNet jobs of a stopped ControlNet
process wait QUEUED (visible as such, not FAILED) while the other process takes over its
text-to-image job, and are rendered once a process with ControlNet starts again. The store
begins at the revision before jobs had a task column, holding a job row from then."""

from __future__ import annotations

import json
import re
import time
from pathlib import Path
from typing import Any

import requests
import sqlalchemy as sa

from tests.conftest import Server, create_key, fresh_database_url
from tests.e2e.test_controlnet import SLUG, control, tiny_controlnet
from tests.e2e.test_controlnet import submit as submit_task
from tests.e2e.test_jobs import get, submit, wait_terminal
from zimage_server.protocol import GenerationParams
from zimage_server.store.db import Database

ADMIN = "claims-admin"
LEASE_S = 1.5
JOB = {"prompt": "a fox", "width": 256, "height": 256, "steps": 2}
ENV = {
    "ZIMAGE_AUTH": "true",
    "ZIMAGE_ADMIN_TOKEN": ADMIN,
    "ZIMAGE_JOB_LEASE_S": str(LEASE_S),
    "ZIMAGE_MAX_QUEUE": "16",
    "ZIMAGE_DEFAULT_MAX_IN_FLIGHT": "16",
}


def old_store(url: str) -> str:
    """The store at revision 0005 with one QUEUED job, no process's, stored then: its
    params have no task (text-to-image)."""
    database = Database(url)
    database.upgrade("0005")
    params = GenerationParams.model_validate(JOB).model_dump(mode="json")
    del params["task"]
    now = time.time()
    with database.engine.begin() as connection:
        connection.execute(
            sa.text(
                "INSERT INTO jobs (id, owner, status, params, seed, price, base_url, body_hash,"
                " created_at, deadline_at) VALUES ('0ld', 'anonymous', 'QUEUED', :params, 1, 0,"
                " 'http://127.0.0.1', :hash, :now, :deadline)"
            ),
            {"params": json.dumps(params), "hash": "0" * 64, "now": now, "deadline": now + 600},
        )
    database.dispose()
    return "0ld"


def stored(url: str, job_id: str) -> dict[str, Any]:
    engine = sa.create_engine(url)
    with engine.connect() as connection:
        row = connection.execute(
            sa.text("SELECT status, task, claimed_by FROM jobs WHERE id = :id"), {"id": job_id}
        ).one()
    engine.dispose()
    return dict(row._mapping)


def test_controlnet_jobs_are_rendered_only_by_a_process_with_controlnet(tmp_path: Path) -> None:
    database = fresh_database_url("postgresql", tmp_path)
    old = old_store(database)
    data, env = tmp_path / "data", {**ENV, "ZIMAGE_DATABASE_URL": database}
    with_controlnet = {**env, "ZIMAGE_CONTROLNET": str(tiny_controlnet(tmp_path / "cn"))}
    # Slow steps: its jobs are still unfinished when it stops.
    first = Server(data, {**with_controlnet, "ZIMAGE_DEBUG_STEP_DELAY_S": "3"}, wait=False)
    plain = Server(data, env, wait=False)
    servers = [first.start(), plain.start()]
    try:
        key = create_key(first, ADMIN, 10)
        refused = submit_task(plain, key, SLUG, control(1))
        assert refused.status_code == 404 and "ZIMAGE_CONTROLNET" in refused.text
        controlnet_jobs = [submit_task(first, key, SLUG, control(i)) for i in (1, 2)]
        text_job = submit(first, key, JOB)
        assert [r.status_code for r in [*controlnet_jobs, text_job]] == [202] * 3
        first.stop()  # its leases end: the other process may take its jobs at once
        status_url = text_job.json()["status_url"].replace(first.url, plain.url)
        assert wait_terminal(status_url, key, timeout=60)["status"] == "COMPLETED"
        time.sleep(LEASE_S)  # three more heartbeats, each one a chance to claim
        for job in controlnet_jobs:
            url = job.json()["status_url"].replace(first.url, plain.url)
            body = get(url, key).json()
            assert body["status"] == "QUEUED" and "error" not in body, body
        _assert_completed(database, old)  # upgraded by the first process to start
        _assert_the_wait_is_reported(plain)
        second = Server(data, with_controlnet, wait=False)
        servers.append(second.start())
        replica = requests.get(second.url + "/readyz", timeout=10).json()["replica"]
        for job in controlnet_jobs:
            url = job.json()["status_url"].replace(first.url, plain.url)
            assert wait_terminal(url, key, timeout=60)["status"] == "COMPLETED"
            assert stored(database, job.json()["request_id"])["claimed_by"] == replica
    finally:
        for server in servers:
            server.stop()


def _assert_completed(database: str, job_id: str) -> None:
    deadline = time.monotonic() + 30
    while (row := stored(database, job_id))["status"] != "COMPLETED":
        assert time.monotonic() < deadline, row
        time.sleep(0.2)
    assert row["task"] == "text-to-image"


def _assert_the_wait_is_reported(server: Server) -> None:
    """readyz and metrics show the ControlNet jobs waiting, apart from the other tasks."""
    ready = requests.get(server.url + "/readyz", timeout=10).json()
    assert ready["cluster_tasks"]["controlnet"]["depth"] == 2, ready
    assert ready["cluster_queue_depth"] == 2 and "text-to-image" not in ready["cluster_tasks"]
    metrics = requests.get(server.url + "/metrics", timeout=10).text
    waited = re.search(
        r'zimage_cluster_task_oldest_wait_seconds\{task="controlnet"\} (\S+)', metrics
    )
    assert waited is not None and float(waited.group(1)) > LEASE_S, metrics
