"""The clients people already use: the official openai package, our SDK and our CLI."""

from __future__ import annotations

import asyncio
import base64
import io
import os
import subprocess
import sys
from pathlib import Path

import openai
import pytest
import requests
from PIL import Image

from tests.conftest import ADMIN, InProcessServer, create_key
from zimage_server.client import (
    AsyncZImageClient,
    AuthenticationError,
    BadRequestError,
    ZImageClient,
)


@pytest.fixture(scope="module")
def api(auth_server: InProcessServer) -> InProcessServer:
    """The session's server with keys and the admin API on (batches of up to 4)."""
    return auth_server


def new_key(server: InProcessServer, **extra: object) -> str:
    return create_key(server, ADMIN, 100, **extra)


@pytest.fixture(scope="module")
def key(api: InProcessServer) -> str:
    return new_key(api)


def oai(api: InProcessServer, key: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=api.url + "/v1", api_key=key, max_retries=0)


def test_openai_b64_json_of_the_requested_size(api: InProcessServer, key: str) -> None:
    result = oai(api, key).images.generate(
        model="z-image-turbo",
        prompt="a red fox",
        size="512x256",
        response_format="b64_json",
        extra_body={"num_inference_steps": 2, "seed": 5},
    )
    image = Image.open(io.BytesIO(base64.b64decode(result.data[0].b64_json or "")))
    assert image.size == (512, 256) and image.format == "PNG"


def test_openai_url_and_output_format(api: InProcessServer, key: str) -> None:
    result = oai(api, key).images.generate(
        prompt="a red fox",
        size="256x320",
        response_format="url",
        output_format="webp",
        extra_body={"num_inference_steps": 1},
    )
    url = result.data[0].url or ""
    image = Image.open(io.BytesIO(requests.get(url, timeout=10).content))
    assert image.format == "WEBP" and image.size == (256, 320)


def test_openai_n2_gives_two_different_images(api: InProcessServer, key: str) -> None:
    result = oai(api, key).images.generate(
        prompt="two foxes",
        n=2,
        size="256x256",
        extra_body={"num_inference_steps": 1, "seed": 9},
    )
    first, second = (base64.b64decode(d.b64_json or "") for d in result.data)
    assert len(result.data) == 2 and first != second


def test_openai_bad_size_is_a_bad_request_error(api: InProcessServer, key: str) -> None:
    with pytest.raises(openai.BadRequestError) as error:
        oai(api, key).images.generate(prompt="x", size="100x100")  # type: ignore[arg-type]
    body = error.value.body
    assert isinstance(body, dict) and body["param"] == "size"
    assert "256 to 2048" in body["message"] and body["type"] == "invalid_request_error"


def test_openai_wrong_key_and_models(api: InProcessServer, key: str) -> None:
    with pytest.raises(openai.AuthenticationError):
        oai(api, "zk_nope_nope").images.generate(prompt="x", size="256x256")
    assert [m.id for m in oai(api, key).models.list()] == ["z-image-turbo"]


def test_sdk_generate_sync_and_async(api: InProcessServer, key: str) -> None:
    with ZImageClient(api.url, key) as client:
        image = client.generate(
            "a lighthouse", width=320, height=256, steps=1, seed=3, image_format="png"
        )
    assert image.seed == 3 and image.to_pil().size == (320, 256)
    assert image.credits_consumed == "0.01"

    async def run() -> bytes:
        async with AsyncZImageClient(api.url, key) as client:
            again = await client.generate(
                "a lighthouse", width=320, height=256, steps=1, seed=3, image_format="png"
            )
            return again.data

    assert asyncio.run(run()) == image.data


def test_sdk_jobs_submit_wait_cancel(api: InProcessServer, key: str) -> None:
    with ZImageClient(api.url, key) as client:
        job = client.submit("an async lighthouse", width=256, height=256, steps=1, seed=4)
        image = client.wait(job.request_id)
        assert image.seed == 4 and image.to_pil().size == (256, 256)
        slow = client.submit("slow", width=1024, height=1024, steps=40)
        assert client.cancel(slow.request_id)["status"] == "CANCELLED"
        with pytest.raises(Exception, match="CANCELLED"):
            client.wait(slow.request_id)


def test_sdk_typed_errors(api: InProcessServer, key: str) -> None:
    with ZImageClient(api.url, key) as client, pytest.raises(BadRequestError, match="steps"):
        client.generate("x", steps=0)
    with ZImageClient(api.url, "zk_bad_key") as client, pytest.raises(AuthenticationError):
        client.generate("x")


def test_sdk_retries_429_after_retry_after(api: InProcessServer) -> None:
    limited = new_key(api, rate_limit="1/3second")
    # A cheap request (400, bad body) uses up the window at once.
    spent = requests.post(
        api.url + "/v1/z-image-turbo", headers={"x-api-key": limited}, json={}, timeout=10
    )
    assert spent.status_code == 400
    with ZImageClient(api.url, limited, max_retries=3) as client:
        image = client.generate("second", width=256, height=256, steps=1)
        assert client.retries_done >= 1 and image.data


def cli(*args: str, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "zimage_server", "generate", *args],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
        # Wide enough that rich does not wrap "seed 11" onto two lines after a long path.
        env={**os.environ, "COLUMNS": "200", **env},
    )


def test_cli_generate_writes_an_image(api: InProcessServer, key: str, tmp_path: Path) -> None:
    out = tmp_path / "fox.jpg"
    run = cli(
        "a fox",
        "-o",
        str(out),
        "--width",
        "256",
        "--height",
        "320",
        "--steps",
        "1",
        "--seed",
        "11",
        ZIMAGE_URL=api.url,
        ZIMAGE_API_KEY=key,
    )
    assert run.returncode == 0, run.stderr
    assert "seed 11" in run.stderr
    with Image.open(out) as image:
        assert image.format == "JPEG" and image.size == (256, 320)


def test_cli_401_is_a_clear_error(api: InProcessServer, tmp_path: Path) -> None:
    run = cli("a fox", "-o", str(tmp_path / "x.webp"), "--url", api.url, "--api-key", "zk_x_y")
    assert run.returncode == 1
    assert "error 401" in run.stderr and "Invalid API key" in run.stderr
    assert "Traceback" not in run.stderr and not (tmp_path / "x.webp").exists()


def test_openai_prompt_over_the_server_limit_is_a_bad_request(
    api: InProcessServer, key: str
) -> None:
    with pytest.raises(openai.BadRequestError) as error:
        oai(api, key).images.generate(prompt="a" * 10_001, size="256x256")
    body = error.value.body
    assert isinstance(body, dict) and body["param"] == "prompt"
    assert "at most 10000 characters" in body["message"]
