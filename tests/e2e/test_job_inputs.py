"""A v2 image job's input images are kept apart from its row (``job_inputs``): polls and
lists never load them, the job still renders the bytes v1 does, also after another server
took it over; and an Idempotency-Key retry is answered from the body as the client sent
it, without fetching its image URL again (which may now fail, or serve other bytes)."""

from __future__ import annotations

import base64
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, ClassVar

import pytest
import requests
import sqlalchemy as sa

from tests.conftest import ADMIN, AUTH_ENV, InProcessServer, create_key, fresh_database_url
from tests.e2e.test_image_inputs import b64, photo, send_png, square_mask

INPAINT = "z-image-turbo-inpaint"
IMG2IMG = "z-image-turbo-img2img"


def body(**extra: Any) -> dict[str, Any]:
    base = {"prompt": "a fox", "steps": 2, "seed": 9, "image_format": "png", "base_64": True}
    return {**base, **extra}


def send(
    api: InProcessServer,
    key: str,
    slug: str,
    payload: dict[str, Any],
    version: str = "v2",
    **h: str,
) -> requests.Response:
    headers = {"x-api-key": key, **h}
    return requests.post(f"{api.url}/{version}/{slug}", json=payload, headers=headers, timeout=60)


def get(api: InProcessServer, key: str, path: str) -> requests.Response:
    return requests.get(f"{api.url}{path}", headers={"x-api-key": key}, timeout=10)


def wait_for(api: InProcessServer, key: str, job_id: str, *states: str) -> dict[str, Any]:
    deadline = time.monotonic() + 60
    while True:
        status = dict(get(api, key, f"/v2/requests/{job_id}/status").json())
        if status["status"] in states:
            return status
        assert time.monotonic() < deadline, status
        time.sleep(0.05)


class Statements:
    """The SQL a server's store runs while recording."""

    def __init__(self, api: InProcessServer) -> None:
        self.engine = api.app.state.jobs.repo.db.engine
        self.seen: list[str] = []
        sa.event.listen(self.engine, "before_cursor_execute", self._record)

    def _record(self, _conn: Any, _cursor: Any, statement: str, *_args: Any) -> None:
        self.seen.append(statement)

    def close(self) -> None:
        sa.event.remove(self.engine, "before_cursor_execute", self._record)


def stored(url: str, query: str, job_id: str) -> Any:
    """One value read straight from the server's database."""
    engine = sa.create_engine(url)
    try:
        with engine.connect() as connection:
            return connection.execute(sa.text(query), {"id": job_id}).scalar_one()
    finally:
        engine.dispose()


PARAMS_SIZE = "SELECT length(params) FROM jobs WHERE id = :id"
INPUT_ROWS = "SELECT count(*) FROM job_inputs WHERE job_id = :id"


@pytest.mark.parametrize("kind", ["sqlite", "postgresql"])
def test_polls_and_lists_load_no_images_and_a_taken_over_job_renders_as_v1(
    tmp_path: Path, kind: str
) -> None:
    url = fresh_database_url(kind, tmp_path)
    env = {
        **AUTH_ENV,
        "ZIMAGE_DATABASE_URL": url,
        "ZIMAGE_DEBUG_STEP_DELAY_S": "0.5",
        "ZIMAGE_JOB_LEASE_S": "1.5",
    }
    first = InProcessServer(tmp_path / "data", env=env)
    key = create_key(first, ADMIN, 100)
    payload = body(image=b64(photo(21)), mask_image=b64(square_mask()))
    try:
        job_id = send(first, key, INPAINT, payload).json()["request_id"]
        wait_for(first, key, job_id, "PROCESSING")  # its render has read its images
        statements = Statements(first)
        wait_for(first, key, job_id, "PROCESSING")
        listed = get(first, key, "/v2/requests?limit=100")
        get(first, key, f"/v2/requests/{job_id}")
        statements.close()
        assert [item["request_id"] for item in listed.json()["requests"]] == [job_id]
        assert statements.seen and not any("job_inputs" in s for s in statements.seen)
        assert stored(url, PARAMS_SIZE, job_id) < 2_000  # its images (10 kB here) are apart
        assert stored(url, INPUT_ROWS, job_id) == 1
    finally:
        first.stop()  # mid-render: its lease ends, the job stays unfinished
    second = InProcessServer(tmp_path / "data", env=env)
    try:
        wait_for(second, key, job_id, "COMPLETED")
        result = get(second, key, f"/v2/requests/{job_id}")
        v1 = send(second, key, INPAINT, payload, version="v1")
        assert result.json()["output"] == v1.json()["image"]
        assert stored(url, INPUT_ROWS, job_id) == 0  # deleted with the job's end
    finally:
        second.stop()


# -- Idempotency-Key retries --------------------------------------------------------------
class _Images(BaseHTTPRequestHandler):
    """One picture, until ``mode`` says "forbidden" (an expired presigned URL, say) or
    "changed" (other bytes at the same URL)."""

    mode: ClassVar[str] = "ok"
    hits: ClassVar[int] = 0

    def do_GET(self) -> None:
        _Images.hits += 1
        if _Images.mode == "forbidden":
            self.send_response(403)
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        data = base64.b64decode(b64(photo(31 if _Images.mode == "changed" else 30)))
        send_png(self, data)

    def log_message(self, *_args: object) -> None:
        pass


@pytest.fixture
def image_url() -> Iterator[str]:
    httpd = ThreadingHTTPServer(("127.0.0.2", 0), _Images)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    _Images.mode, _Images.hits = "ok", 0
    yield f"http://127.0.0.2:{httpd.server_address[1]}/photo.png"
    httpd.shutdown()


def test_a_retry_is_replayed_without_fetching_its_image_again(
    tmp_path: Path, image_url: str
) -> None:
    env = {
        **AUTH_ENV,
        "ZIMAGE_DATABASE_URL": fresh_database_url("sqlite", tmp_path),
        "ZIMAGE_INPUT_ALLOWED_NETWORKS": '["127.0.0.2/32"]',
    }
    api = InProcessServer(tmp_path / "data", env=env)
    try:
        key = create_key(api, ADMIN, 100)
        payload, retry = body(image=image_url, strength=0.5), {"Idempotency-Key": "order-1"}
        first = send(api, key, IMG2IMG, payload, **retry)
        assert first.status_code == 202 and _Images.hits == 1, first.text
        for mode in ("forbidden", "changed"):
            _Images.mode = mode
            again = send(api, key, IMG2IMG, dict(reversed(payload.items())), **retry)
            assert again.status_code == 202, (mode, again.text)
            assert again.headers["Idempotent-Replayed"] == "true"
            assert again.json()["request_id"] == first.json()["request_id"]
        other = send(api, key, IMG2IMG, {**payload, "strength": 0.6}, **retry)
        assert other.status_code == 409 and "different request body" in other.json()["error"]
        assert _Images.hits == 1  # no retry fetched the URL again
        _Images.mode = "forbidden"  # without a key the URL is fetched, and refused
        fresh = send(api, key, IMG2IMG, payload)
        assert fresh.status_code == 400 and "'image'" in fresh.json()["error"], fresh.text
        wait_for(api, key, first.json()["request_id"], "COMPLETED")
    finally:
        api.stop()
