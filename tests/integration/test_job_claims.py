"""A job's task in its own column (SQLite and PostgreSQL): rows from before it get theirs
from their params, and a replica claims only the tasks it renders."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator

import pytest
import sqlalchemy as sa

from zimage_server.jobs.repository import JobRepository, NewJob
from zimage_server.protocol import GenerationParams
from zimage_server.store.db import Database

EVERY_TASK = ("text-to-image", "img2img", "inpaint", "controlnet")
WITHOUT_CONTROLNET = ("text-to-image", "img2img", "inpaint")


@pytest.fixture
def repo(database_url: str) -> Iterator[JobRepository]:
    database = Database(database_url)
    database.upgrade()
    yield JobRepository(database, ttl_s=3600)
    database.dispose()


def lapsed_job(repo: JobRepository, job_id: str, task: str, age_s: float) -> None:
    """A job whose process died: unclaimed, created ``age_s`` ago."""
    params = GenerationParams(prompt="a fox", task=task).model_dump_json()  # type: ignore[arg-type]
    new = NewJob(
        id=job_id,
        owner="anonymous",
        key_id=None,
        params=params,
        task=task,
        inputs=None,
        seed=1,
        price=0,
        webhook_url=None,
        base_url="http://127.0.0.1",
        idempotency_key=None,
        body_hash="0" * 64,
        deadline_at=time.time() + 600,
        claimed_by="gone",
        lease_until=time.time() - 1,
    )
    repo.create(new)
    with repo.db.session() as session:
        session.execute(
            sa.text("UPDATE jobs SET created_at = :at WHERE id = :id"),
            {"at": time.time() - age_s, "id": job_id},
        )


def test_a_replica_claims_only_the_tasks_it_renders(repo: JobRepository) -> None:
    for i, task in enumerate(["controlnet", "text-to-image", "controlnet", "inpaint"]):
        lapsed_job(repo, f"job{i}", task, age_s=100 - i)
    plain = repo.claim("plain", 30, 10, WITHOUT_CONTROLNET)
    assert [(job.id, job.task) for job in plain] == [("job1", "text-to-image"), ("job3", "inpaint")]
    assert repo.claim("plain", 30, 10, WITHOUT_CONTROLNET) == []  # the others wait
    view = repo.queue_view()
    assert view.depth == 4 and view.tasks["controlnet"].depth == 2
    assert view.oldest_wait_of("controlnet") == pytest.approx(100, abs=5)
    assert view.oldest_wait_of("img2img") == 0.0
    controlnet = repo.claim("controlnet", 30, 1, EVERY_TASK)  # the oldest first
    assert [job.id for job in controlnet] == ["job0"]
    assert [job.id for job in repo.claim("controlnet", 30, 10, EVERY_TASK)] == ["job2"]


def test_a_taken_over_job_keeps_to_the_same_rule(repo: JobRepository) -> None:
    """A ControlNet job whose ControlNet replica stopped is not taken over by one without."""
    lapsed_job(repo, "cn", "controlnet", age_s=1)
    assert [job.id for job in repo.claim("first", 30, 10, EVERY_TASK)] == ["cn"]
    assert repo.release_claims("first") == 1
    assert repo.claim("plain", 30, 10, WITHOUT_CONTROLNET) == []
    assert repo.get("cn").claimed_by == "first"
    assert [job.id for job in repo.claim("second", 30, 10, EVERY_TASK)] == ["cn"]


def test_the_migration_gives_old_rows_their_task(database_url: str) -> None:
    database = Database(database_url)
    database.upgrade("0005")
    legacy = GenerationParams(prompt="a fox").model_dump(mode="json")
    del legacy["task"]  # from before tasks: text-to-image
    rows = {
        "old": legacy,
        "cn": {**legacy, "task": "controlnet"},
        "edit": {**legacy, "task": "inpaint"},
    }
    with database.engine.begin() as connection:
        for job_id, params in rows.items():
            connection.execute(
                sa.text(
                    "INSERT INTO jobs (id, owner, status, params, seed, price, base_url, "
                    "body_hash, created_at, deadline_at) VALUES (:id, 'anonymous', 'QUEUED', "
                    ":params, 1, 0, 'http://127.0.0.1', :hash, 1, 2)"
                ),
                {"id": job_id, "params": json.dumps(params), "hash": "0" * 64},
            )
    database.upgrade()
    with database.engine.connect() as connection:
        tasks = dict(connection.execute(sa.text("SELECT id, task FROM jobs")).all())
    database.dispose()
    assert tasks == {"old": "text-to-image", "cn": "controlnet", "edit": "inpaint"}
