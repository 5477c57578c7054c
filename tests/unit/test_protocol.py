"""The protocol models against the app that uses them, in process (a fake engine, no
worker): the OpenAPI schema documents each route's errors with right examples, and every
response model round-trips the exact bytes the routes send."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from pydantic import BaseModel, SecretStr
from starlette.testclient import TestClient

from zimage_server.api.main import create_app
from zimage_server.api.responses import render_model
from zimage_server.core.config import Settings
from zimage_server.engine import EngineState, RenderResult, RenderSpec
from zimage_server.protocol import (
    ImageResponse,
    ImagesResponse,
    JobList,
    JobResult,
    JobStatusBody,
    ModelList,
    OpenAIError,
    SegmindError,
    SubmittedJob,
    segmind,
)


class FakeEngine:
    """Renders a grey image at once; enough for the HTTP layer."""

    max_queue = 8
    depth = 0
    failure = None
    state = EngineState.READY

    async def start(self) -> None: ...

    async def stop(self) -> None: ...

    async def render(
        self, spec: RenderSpec, timeout: float, job_id: str | None = None, admitted: bool = False
    ) -> RenderResult:
        rgb = bytes([128]) * (spec.width * spec.height * 3)
        return RenderResult(
            rgb=rgb, width=spec.width, height=spec.height, timings={"denoise": 0.001}
        )

    def admit(self, reserve: str | None = None) -> None: ...

    def unreserve(self, job_id: str) -> None: ...

    def position(self, job_id: str) -> int | None:
        return None

    def progress(self, job_id: str) -> tuple[int, int] | None:
        return None

    def cancel(self, job_id: str) -> bool:
        return False

    def watch(self, listener: Any) -> None: ...

    def restarts(self) -> float:
        return 0.0

    def load_seconds(self) -> float:
        return 0.0


def app_for(folder: Path, admin_token: str | None = None) -> Any:
    token = SecretStr(admin_token) if admin_token else None
    settings = Settings(data_dir=folder, auth=False, admin_token=token)
    return create_app(settings, engine=FakeEngine())


@pytest.fixture(scope="module")
def client(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TestClient]:
    app = app_for(tmp_path_factory.mktemp("protocol"))
    with TestClient(app, base_url="http://localhost") as test_client:  # a served host
        yield test_client


def test_admin_paths_are_documented_only_when_the_admin_api_is_on(tmp_path: Path) -> None:
    off = app_for(tmp_path / "off").openapi()["paths"]
    on = app_for(tmp_path / "on", admin_token="admin").openapi()["paths"]
    assert not [path for path in off if path.startswith("/admin")]
    assert "/admin/keys" in on and "/v1/{model}" in on


def operations(spec: dict[str, Any]) -> Iterator[tuple[str, str, dict[str, Any]]]:
    for path, methods in spec["paths"].items():
        for method, operation in methods.items():
            yield path, method, operation


def test_error_examples_are_right_per_status(client: TestClient) -> None:
    spec = client.get("/openapi.json").json()
    seen: dict[str, set[str]] = {}
    for path, method, operation in operations(spec):
        envelope = OpenAIError if path.startswith(("/v1/images", "/v1/models")) else SegmindError
        for status, response in operation["responses"].items():
            examples = response.get("content", {}).get("application/json", {}).get("examples")
            if not status.isdigit() or int(status) < 400 or examples is None:
                continue
            for example in examples.values():
                body = envelope.model_validate(example["value"])
                message = body.error if isinstance(body, SegmindError) else body.error.message
                seen.setdefault(message, set()).add(status)
        assert "422" not in operation["responses"] or "requests/" in path, (path, method)
    assert all(len(statuses) == 1 for statuses in seen.values()), seen  # one status a message
    v1 = spec["paths"]["/v1/{model}"]["post"]["responses"]
    assert "Invalid 'steps'" in str(v1["400"]) and "Invalid 'steps'" not in str(v1["404"])
    assert "Unknown model" in str(v1["404"]) and "Retry-After" in v1["429"]["headers"]
    assert {"400", "404", "429", "502", "503", "504", "default"} <= set(v1)
    oai = spec["paths"]["/v1/images/generations"]["post"]["responses"]
    assert (
        oai["400"]["content"]["application/json"]["examples"]["InvalidRequest"]["value"]["error"][
            "param"
        ]
        == "size"
    )


def round_trips(content: bytes, model: type[BaseModel]) -> BaseModel:
    parsed = model.model_validate_json(content)
    assert render_model(parsed) == content, model
    return parsed


def test_v1_bodies_round_trip(client: TestClient) -> None:
    small = {"prompt": "a fox", "width": 256, "height": 256, "seed": 3}
    for extra in ({}, {"base_64": True, "image_format": "png"}):
        r = client.post("/v1/z-image-turbo", json={**small, **extra})
        assert r.status_code == 200
        image = round_trips(r.content, ImageResponse)
        assert isinstance(image, ImageResponse) and image.seed == 3
    bad = client.post("/v1/z-image-turbo", json={**small, "steps": 0})
    error = round_trips(bad.content, SegmindError)
    assert error == SegmindError(
        error="Invalid 'steps': must be an integer from 1 to 75 (got 0).",
        request_id=bad.headers["x-request-id"],
    )


def test_v2_bodies_round_trip(client: TestClient) -> None:
    r = client.post("/v2/z-image-turbo", json={"prompt": "a fox", "width": 256, "height": 256})
    assert r.status_code == 202
    job = round_trips(r.content, SubmittedJob)
    assert isinstance(job, SubmittedJob)
    deadline = time.monotonic() + 30
    while (status := client.get(job.status_url)).json()["status"] != "COMPLETED":
        assert time.monotonic() < deadline
        time.sleep(0.02)
    assert "queue_position" not in status.json()
    round_trips(status.content, JobStatusBody)
    result = round_trips(client.get(job.response_url).content, JobResult)
    assert isinstance(result, JobResult) and result.metrics is not None
    assert "error" not in client.get(job.response_url).json()
    round_trips(client.get("/v2/requests").content, JobList)
    finished = client.post(job.cancel_url)
    assert finished.status_code == 409 and "already COMPLETED" in finished.json()["error"]


def test_openai_bodies_round_trip(client: TestClient) -> None:
    for response_format in ("b64_json", "url"):
        r = client.post(
            "/v1/images/generations",
            json={"prompt": "a fox", "size": "256x256", "n": 2, "response_format": response_format},
        )
        assert r.status_code == 200
        images = round_trips(r.content, ImagesResponse)
        assert isinstance(images, ImagesResponse) and len(images.data) == 2
        assert set(r.json()["data"][0]) == {response_format, "revised_prompt", "seed"}
    round_trips(client.get("/v1/models").content, ModelList)
    bad = client.post("/v1/images/generations", json={"prompt": "x", "size": "9x9"})
    assert OpenAIError.model_validate_json(bad.content).error.param == "size"


@pytest.mark.parametrize(
    ("content", "expected"),
    [
        (b"", "The request body is empty"),
        (b"{not json", "The request body is not valid JSON: key must be a string"),
        (b"\xff{", "The request body is not valid JSON: expected value"),
        (b"[1, 2]", "The request body must be a JSON object"),
        (b"null", "The request body must be a JSON object"),
    ],
)
def test_body_level_errors_keep_our_messages(
    client: TestClient, content: bytes, expected: str
) -> None:
    for path in ("/v1/z-image-turbo", "/v2/z-image-turbo"):
        r = client.post(path, content=content, headers={"content-type": "application/json"})
        assert r.status_code == 400 and r.json()["error"].startswith(expected), r.text
    oai = client.post(
        "/v1/images/generations", content=content, headers={"content-type": "application/json"}
    )
    assert oai.status_code == 400


@pytest.mark.parametrize("content_type", [None, "text/plain", "application/x-www-form-urlencoded"])
def test_a_body_not_labelled_json_is_refused(client: TestClient, content_type: str | None) -> None:
    # What a page on another site may post without a CORS preflight.
    body = b'{"prompt": "a fox", "width": 256, "height": 256}'
    headers = {"content-type": content_type} if content_type else {}
    for path in ("/v1/z-image-turbo", "/v2/z-image-turbo", "/v1/images/generations"):
        r = client.post(path, content=body, headers=headers)
        assert r.status_code == 415, r.text
        assert "application/json" in r.text and (content_type or "none") in r.text


def test_allowed_values_reads_a_cached_schema() -> None:
    segmind.allowed_values("steps")
    before = segmind._properties.cache_info()
    assert segmind.allowed_values("quality") == "an integer from 1 to 100"
    after = segmind._properties.cache_info()
    assert after.misses == before.misses and after.hits == before.hits + 1


def test_the_protocol_and_the_sdk_import_no_web_framework() -> None:
    import subprocess
    import sys

    code = (
        "import sys\n"
        "import zimage_server.client, zimage_server.protocol\n"
        "web = [m for m in ('fastapi', 'starlette', 'torch') if m in sys.modules]\n"
        "assert not web, web\n"
    )
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False)
    assert run.returncode == 0, run.stderr
