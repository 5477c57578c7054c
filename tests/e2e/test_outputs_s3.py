"""Outputs in an S3-compatible bucket (moto's S3 server on loopback): image URLs through
the API or presigned, expiry after the TTL, and a clear 503 with nothing billed when the
bucket cannot be reached."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import requests

from tests.backing import S3Server, free_port
from tests.conftest import InProcessServer, create_key
from tests.e2e.test_jobs import submit, usage, wait_terminal

ADMIN = "jobs-admin"
BODY = {"prompt": "a fox in a bucket", "width": 256, "height": 256, "steps": 2}
TTL_S = 60


@pytest.fixture(scope="module", autouse=True)
def credentials() -> Iterator[None]:
    """moto's dummy credentials, where boto3 looks for them (read at the first request)."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("AWS_ACCESS_KEY_ID", "testing")
        patch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
        yield


@pytest.fixture(scope="module")
def s3() -> Iterator[S3Server]:
    server = S3Server()
    yield server
    server.stop()


def bucket_server(folder: Path, s3_url: str, bucket: str, **extra: str) -> InProcessServer:
    env = {
        "ZIMAGE_MODEL": "null",
        "ZIMAGE_AUTH": "true",
        "ZIMAGE_ADMIN_TOKEN": ADMIN,
        "ZIMAGE_OUTPUT_BUCKET": bucket,
        "ZIMAGE_OUTPUT_S3_ENDPOINT": s3_url,
        "ZIMAGE_OUTPUT_S3_REGION": "us-east-1",
        "ZIMAGE_OUTPUT_TTL_S": str(TTL_S),
        **extra,
    }
    return InProcessServer(folder, env=env)


def keys_in(s3: S3Server) -> set[str]:
    listed = s3.client().list_objects_v2(Bucket=s3.bucket, Prefix="outputs/")
    return {item["Key"] for item in listed.get("Contents", [])}


@pytest.mark.parametrize("mode", ["api", "presigned"])
def test_image_urls_serve_from_the_bucket_until_the_ttl(
    s3: S3Server, tmp_path: Path, mode: str
) -> None:
    server = bucket_server(tmp_path, s3.url, s3.bucket, ZIMAGE_OUTPUT_URLS=mode)
    try:
        key = create_key(server, ADMIN, 10)
        reply = server.post(BODY, headers={"x-api-key": key})
        assert reply.status_code == 200, reply.text
        url = reply.json()["image"]
        assert url.startswith(server.url + "/v1/outputs/" if mode == "api" else s3.url + "/")
        output_id = url.split("?")[0].rsplit("/", 1)[1]
        assert f"outputs/{output_id}" in keys_in(s3)  # in the bucket, not on local disk
        assert not list((tmp_path / "outputs").glob("*.webp"))
        image = requests.get(url, timeout=10)
        assert image.status_code == 200 and image.content[:4] == b"RIFF"
        assert image.headers["content-type"] == "image/webp"
        job = submit(server, key, BODY).json()  # a v2 job's output too
        output = wait_terminal(job["status_url"], key)
        assert output["status"] == "COMPLETED"
        result = requests.get(job["response_url"], headers={"x-api-key": key}, timeout=10)
        assert requests.get(result.json()["output"], timeout=10).content[:4] == b"RIFF"
        with server.clock.travel(TTL_S + 1):
            expired = requests.get(f"{server.url}/v1/outputs/{output_id}", timeout=10)
            assert expired.status_code == 404 and "expired" in expired.json()["error"]
            assert server.app.state.outputs.sweep() >= 2
        assert f"outputs/{output_id}" not in keys_in(s3)
        assert requests.get(url, timeout=10).status_code in (403, 404)  # gone either way
    finally:
        server.stop()


def test_an_unreachable_bucket_is_a_503_and_nothing_is_billed(tmp_path: Path) -> None:
    nowhere = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    server = bucket_server(tmp_path, nowhere, "missing")
    try:
        key = create_key(server, ADMIN, 10)
        reply = server.post(BODY, headers={"x-api-key": key})
        assert reply.status_code == 503 and reply.headers["retry-after"] == "5"
        assert "output store" in reply.json()["error"] and "nothing was charged" in reply.text
        job = submit(server, key, BODY).json()
        final = wait_terminal(job["status_url"], key)
        assert final["status"] == "FAILED" and "output store" in final["error"]
        used = usage(server, key)
        assert used["images"] == 0 and used["balance"] == "10"
        assert used["ledger_sum"] == used["balance"]
    finally:
        server.stop()
