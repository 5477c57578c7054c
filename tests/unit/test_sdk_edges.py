"""The SDK and CLI where the server is not the problem: unreachable, big images, markup."""

from __future__ import annotations

import asyncio
import io
import socket
import subprocess
import sys

import httpx
import pytest
from PIL import Image
from rich.console import Console

from zimage_server import cli
from zimage_server.client import APIConnectionError, AsyncZImageClient, ZImageClient
from zimage_server.client._shared import GeneratedImage, job_output
from zimage_server.protocol import JobResult


def closed_port() -> int:
    """A loopback port nothing listens on (bound, then released)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
    return port


def test_an_unreachable_server_is_one_typed_error() -> None:
    url = f"http://127.0.0.1:{closed_port()}"
    with ZImageClient(url, max_retries=0) as client, pytest.raises(APIConnectionError) as down:
        client.generate("a fox")
    assert down.value.url == url and str(down.value).startswith(f"cannot reach {url}: ")

    async def run() -> None:
        async with AsyncZImageClient(url, max_retries=0) as client:
            await client.generate("a fox")

    with pytest.raises(APIConnectionError):
        asyncio.run(run())


def test_zimage_generate_against_a_server_that_is_down_prints_one_line() -> None:
    url = f"http://127.0.0.1:{closed_port()}"
    run = subprocess.run(
        [sys.executable, "-m", "zimage_server", "generate", "a fox", "--url", url],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert run.returncode == 1
    lines = [line for line in run.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith(f"error: cannot reach {url}"), run.stderr


def png(width: int, height: int) -> bytes:
    out = io.BytesIO()
    Image.new("RGB", (width, height)).save(out, "PNG")
    return out.getvalue()


def test_an_image_repr_is_short_and_v2_results_know_their_size() -> None:
    data = png(320, 256)
    result = JobResult(request_id="r", status="COMPLETED", output=None, seed=7, metrics=None)
    image = job_output(result, "png", data)
    assert (image.width, image.height) == (320, 256)
    assert repr(image) == f"GeneratedImage(png, 320x256, {len(data)} bytes, seed=7)"
    assert "\\x" not in repr(GeneratedImage(b"\x89PNG" * 1000, 1, "png"))


def test_raw_image_replies_know_their_size() -> None:
    def reply(_request: httpx.Request) -> httpx.Response:
        return httpx.Response(200, content=png(300, 260), headers={"content-type": "image/png"})

    with ZImageClient("http://test", transport=httpx.MockTransport(reply)) as client:
        image = client.generate("a fox")
    assert (image.width, image.height, image.image_format) == (300, 260, "png")


def test_cli_errors_print_brackets_as_they_are(monkeypatch: pytest.MonkeyPatch) -> None:
    out = io.StringIO()
    monkeypatch.setattr(cli, "console", Console(file=out, width=200))
    cli._error('Ray Serve is not installed: pip install "zimage-server[ray]"')
    assert out.getvalue().strip() == (
        'error: Ray Serve is not installed: pip install "zimage-server[ray]"'
    )
