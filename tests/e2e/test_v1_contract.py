"""The Segmind v1 contract, over real HTTP against the tiny server (in process)."""

from __future__ import annotations

import base64
import io
import json
import re
import subprocess
import sys
import threading
import time

import pytest
import requests
from PIL import Image

from tests.conftest import ROOT, InProcessServer

SPEC = ROOT.parent / "shared" / "spec" / "segmind-z-image-turbo.txt"
SPEC_COPY = ROOT / "tests" / "fixtures" / "segmind-z-image-turbo.txt"
SMALL = {"width": 256, "height": 256, "steps": 2}


def image_of(response: requests.Response) -> Image.Image:
    return Image.open(io.BytesIO(response.content))


def spec_example_client(url: str) -> str:
    """The spec's own Python client, changed only as the brief allows."""
    text = (SPEC if SPEC.exists() else SPEC_COPY).read_text()
    lines = text.split("API Endpoint")[0].splitlines()
    code = "\n".join(
        re.sub(r"^\s*\d+", "", line, count=1) for line in lines if re.match(r"^\s*\d+", line)
    )
    assert "requests.post(url, headers=headers, json=data)" in code
    return code.replace("https://api.segmind.com", url).replace(": false", ": False")


@pytest.mark.slow
def test_spec_example_client_works_unchanged(server: InProcessServer) -> None:
    run = subprocess.run(
        [sys.executable, "-c", spec_example_client(server.url)],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert run.returncode == 0, run.stderr
    assert not run.stdout.startswith("Error"), run.stdout
    result = json.loads(run.stdout)
    assert result["image"].startswith(server.url + "/v1/outputs/")
    assert result["seed"] >= 0 and result["width"] == 1024 and result["height"] == 1024
    # The Hindi prompt is longer than the 512-token window: truncated, not rejected.
    assert result["prompt_tokens"] == 512
    image = requests.get(result["image"], timeout=10)
    assert image.status_code == 200
    assert image.headers["content-type"] == "image/webp"
    assert image_of(image).format == "WEBP" and image_of(image).size == (1024, 1024)


def test_response_headers(server: InProcessServer) -> None:
    r = server.post({"prompt": "a red fox", **SMALL, "seed": 7})
    assert r.status_code == 200
    assert r.headers["content-type"] == "application/json"
    assert r.headers["x-seed"] == "7"
    assert float(r.headers["x-generation-time"]) > 0
    assert re.fullmatch(r"[0-9a-f]{24}", r.headers["x-request-id"])
    body = r.json()
    assert set(body["timings"]) == {
        "queue_wait",
        "text_encode",
        "denoise",
        "vae_decode",
        "image_encode",
    }


def test_client_request_id_is_echoed(server: InProcessServer) -> None:
    r = server.post({"prompt": ""}, headers={"X-Request-ID": "trace-123"})
    assert r.status_code == 400 and r.headers["x-request-id"] == "trace-123"


@pytest.mark.parametrize(("fmt", "pil"), [("jpeg", "JPEG"), ("png", "PNG"), ("webp", "WEBP")])
def test_each_format_by_url(server: InProcessServer, fmt: str, pil: str) -> None:
    body = server.post({"prompt": "a lighthouse", **SMALL, "image_format": fmt}).json()
    assert body["image_format"] == fmt and body["image"].endswith("." + fmt)
    image = requests.get(body["image"], timeout=10)
    assert image.headers["content-type"] == f"image/{fmt}"
    assert image_of(image).format == pil


@pytest.mark.parametrize("fmt", ["jpeg", "webp"])
def test_lower_quality_gives_fewer_bytes(server: InProcessServer, fmt: str) -> None:
    sizes = []
    for quality in (20, 95):
        r = server.post(
            {"prompt": "a lighthouse", **SMALL, "seed": 3, "image_format": fmt, "quality": quality},
            headers={"Accept": "image/*"},
        )
        assert r.status_code == 200
        sizes.append(len(r.content))
    assert sizes[0] < sizes[1]


def test_base_64(server: InProcessServer) -> None:
    r = server.post({"prompt": "a lighthouse", **SMALL, "base_64": True, "image_format": "png"})
    body = r.json()
    assert not body["image"].startswith("data:")
    image = Image.open(io.BytesIO(base64.b64decode(body["image"])))
    assert image.format == "PNG" and image.size == (256, 256)


@pytest.mark.parametrize("accept", ["image/*", "image/jpeg", "image/jpeg, application/json;q=0.5"])
def test_accept_image_gives_raw_bytes(server: InProcessServer, accept: str) -> None:
    r = server.post(
        {"prompt": "a lighthouse", **SMALL, "image_format": "jpeg"}, headers={"Accept": accept}
    )
    assert r.status_code == 200 and r.headers["content-type"] == "image/jpeg"
    assert image_of(r).format == "JPEG"
    assert r.headers["x-seed"].isdigit()


@pytest.mark.parametrize(
    ("accept", "fmt"),
    [
        ("image/png", "png"),
        ("image/jpeg", "jpeg"),
        ("image/*", "webp"),  # a wildcard keeps the default
        ("image/png;q=0.5, image/jpeg", "jpeg"),  # q-values honoured
        ("image/png;q=0.5, image/*", "webp"),  # the specific range's q applies to png
        ("image/avif", "webp"),  # nothing we encode is acceptable: the default, not 406
        ("IMAGE/PNG", "png"),  # media types are case-insensitive
        ("image/png;q=abc", "png"),  # a malformed q-value does not make a 500
    ],
)
def test_accept_chooses_the_format_when_the_body_names_none(
    server: InProcessServer, accept: str, fmt: str
) -> None:
    r = server.post({"prompt": "a lighthouse", **SMALL}, headers={"Accept": accept})
    assert r.status_code == 200 and r.headers["content-type"] == f"image/{fmt}"
    assert image_of(r).format == {"jpeg": "JPEG", "png": "PNG", "webp": "WEBP"}[fmt]
    assert "accept" in r.headers["vary"].lower()


def test_body_image_format_wins_over_accept(server: InProcessServer) -> None:
    """Never 406 for Accept: Segmind's clients (and ours) read 406 as insufficient credits."""
    r = server.post(
        {"prompt": "a lighthouse", **SMALL, "image_format": "png"}, headers={"Accept": "image/jpeg"}
    )
    assert r.status_code == 200 and r.headers["content-type"] == "image/png"
    assert image_of(r).format == "PNG"


@pytest.mark.parametrize("accept", ["application/json", "*/*", "application/json, image/png;q=0.5"])
def test_accept_preferring_json_gives_json(server: InProcessServer, accept: str) -> None:
    r = server.post({"prompt": "a lighthouse", **SMALL}, headers={"Accept": accept})
    assert r.status_code == 200 and r.headers["content-type"] == "application/json"
    assert r.json()["image_format"] == "webp"


def test_odd_size_returns_exactly_that_size(server: InProcessServer) -> None:
    r = server.post(
        {"prompt": "a wide valley", "width": 1000, "height": 600, "steps": 1},
        headers={"Accept": "image/png"},
    )
    assert r.status_code == 200 and image_of(r).size == (1000, 600)


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("steps", 1),
        ("steps", 75),
        ("guidance_scale", 0),
        ("guidance_scale", 15),
        ("seed", -1),
        ("seed", 2**63 - 1),
        ("width", 2048),
        ("height", 2048),
        ("quality", 1),
        ("quality", 100),
        ("base_64", True),
        ("base_64", False),
    ],
)
def test_every_parameter_at_its_limits(server: InProcessServer, field: str, value: object) -> None:
    body = {"prompt": "limits", "width": 256, "height": 256, "steps": 1, field: value}
    if field in ("width", "height"):
        # The other side at its minimum keeps the tiny model quick at 2048.
        body["width" if field == "height" else "height"] = 256
    r = server.post(body)
    assert r.status_code == 200, r.text
    out = r.json()
    if field in ("width", "height", "steps", "quality"):
        assert out[field] == value
    if field == "seed" and value != -1:
        assert out["seed"] == value


@pytest.mark.parametrize(
    ("field", "value", "allowed"),
    [
        ("steps", 0, "from 1 to 75"),
        ("steps", 76, "from 1 to 75"),
        ("guidance_scale", -0.1, "from 0 to 15"),
        ("guidance_scale", 15.5, "from 0 to 15"),
        ("seed", -2, "from -1 to 9223372036854775807"),
        ("seed", 2**63, "from -1 to"),
        ("height", 255, "from 256 to 2048"),
        ("height", 2049, "from 256 to 2048"),
        ("width", 255, "from 256 to 2048"),
        ("width", 2049, "from 256 to 2048"),
        ("quality", 0, "from 1 to 100"),
        ("quality", 101, "from 1 to 100"),
        ("image_format", "gif", "one of 'jpeg', 'png', 'webp'"),
        ("steps", "eight", "an integer"),
        ("width", True, "an integer"),
        ("steps", 8.5, "an integer"),
        ("guidance_scale", "lots", "a number"),
        ("base_64", "maybe", "true or false"),
        ("prompt", 42, "a non-empty string"),
        ("prompt", "", "a non-empty string"),
        ("prompt", "   ", "a non-empty string"),
        ("prompt", None, "a non-empty string"),
    ],
)
def test_bad_values_name_the_field_and_the_allowed_values(
    server: InProcessServer, field: str, value: object, allowed: str
) -> None:
    r = server.post({"prompt": "bad values", field: value})
    assert r.status_code == 400
    assert r.headers["content-type"] == "application/json"
    message = r.json()["error"]
    assert f"'{field}'" in message and allowed in message


@pytest.mark.parametrize(
    ("data", "expected"),
    [
        (b"", "body is empty"),
        (b"{not json", "not valid JSON"),
        (b"[1, 2]", "must be a JSON object"),
        (b"{}", "Missing required field 'prompt'"),
        (b"\xff\xfe", "not valid JSON"),
    ],
)
def test_malformed_bodies_give_400(server: InProcessServer, data: bytes, expected: str) -> None:
    r = requests.post(
        server.url + "/v1/z-image-turbo",
        data=data,
        headers={"Content-Type": "application/json"},
        timeout=10,
    )
    assert r.status_code == 400 and expected in r.json()["error"]


def test_unknown_fields_are_ignored(server: InProcessServer) -> None:
    r = server.post({"prompt": "a cat", **SMALL, "negative_prompt": "dog", "scheduler": "x"})
    assert r.status_code == 200


def test_too_long_prompt_in_characters_is_400(server: InProcessServer) -> None:
    r = server.post({"prompt": "a" * 10_001})
    assert r.status_code == 400 and "at most 10000 characters" in r.json()["error"]


def test_same_seed_same_bytes(server: InProcessServer) -> None:
    body = {"prompt": "a tidy desk", **SMALL, "seed": 1234}
    first = server.post(body, headers={"Accept": "image/*"})
    second = server.post(body, headers={"Accept": "image/*"})
    assert first.content == second.content
    other = server.post({**body, "seed": 1235}, headers={"Accept": "image/*"})
    assert other.content != first.content


def test_random_seed_is_reported_and_reproducible(server: InProcessServer) -> None:
    body = {"prompt": "a tidy desk", **SMALL, "seed": -1}
    first = server.post(body, headers={"Accept": "image/*"})
    second = server.post(body, headers={"Accept": "image/*"})
    seeds = [int(first.headers["x-seed"]), int(second.headers["x-seed"])]
    assert seeds[0] != seeds[1] and min(seeds) >= 0
    again = server.post({**body, "seed": seeds[0]}, headers={"Accept": "image/*"})
    assert again.content == first.content


def test_guidance_mapping_counts_transformer_passes(server: InProcessServer) -> None:
    steps = 3
    base = {"prompt": "a guided cat", "width": 256, "height": 256, "steps": steps, "seed": 5}
    runs = {
        g: server.post({**base, "guidance_scale": g, "base_64": True}).json() for g in (0, 1, 3)
    }
    assert runs[0]["transformer_passes"] == steps
    assert runs[1]["transformer_passes"] == steps
    assert runs[3]["transformer_passes"] == 2 * steps
    assert runs[1]["image"] == runs[0]["image"]
    assert runs[3]["image"] != runs[1]["image"]


def test_prompts_in_any_script(server: InProcessServer) -> None:
    for prompt in ["ड्रैगन फ्रूट", "一幅创意海报", "Ünïcödé ☕ 🚀", "مرحبا"]:
        assert server.post({"prompt": prompt, **SMALL}).status_code == 200


def test_over_long_prompt_is_truncated_not_rejected(server: InProcessServer) -> None:
    r = server.post({"prompt": "word " * 2000, **SMALL})
    assert r.status_code == 200 and r.json()["prompt_tokens"] == 512


def test_unknown_model_is_404(server: InProcessServer) -> None:
    r = server.post({"prompt": "x"}, path="/v1/stable-diffusion-xl")
    assert r.status_code == 404 and "z-image-turbo" in r.json()["error"]


def test_wrong_method_is_405(server: InProcessServer) -> None:
    r = requests.get(server.url + "/v1/z-image-turbo", timeout=10)
    assert r.status_code == 405
    assert "POST" in r.json()["error"] and "POST" in r.headers["allow"]
    for path in ("/v1/models", "/v1/loras"):  # not the render route's POST, that path matches too
        r = requests.delete(server.url + path, timeout=10)
        assert r.status_code == 405 and "GET" in r.headers["allow"], (path, r.headers)


@pytest.mark.parametrize(
    "output_id",
    [
        "..%2F..%2Fserver.log",
        "%2e%2e%2fserver.log",
        "AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA.webp",
        "server.log",
        "..",
        "x" * 300,
    ],
)
def test_output_path_tricks_are_404(server: InProcessServer, output_id: str) -> None:
    r = requests.get(f"{server.url}/v1/outputs/{output_id}", timeout=10)
    assert r.status_code == 404 and "error" in r.json()


def test_probes(server: InProcessServer) -> None:
    assert requests.get(server.url + "/healthz", timeout=5).json() == {"status": "ok"}
    ready = requests.get(server.url + "/readyz", timeout=5)
    assert ready.status_code == 200 and ready.json()["status"] == "READY"


def test_openapi_documents_the_contract(server: InProcessServer) -> None:
    spec = requests.get(server.url + "/openapi.json", timeout=5).json()
    op = spec["paths"]["/v1/{model}"]["post"]
    schema = op["requestBody"]["content"]["application/json"]["schema"]
    props = schema["properties"]
    assert schema["required"] == ["prompt"]
    assert (props["steps"]["minimum"], props["steps"]["maximum"], props["steps"]["default"]) == (
        1,
        75,
        8,
    )
    assert props["image_format"]["enum"] == ["jpeg", "png", "webp"]
    assert {"400", "404", "429", "502", "503", "504"} <= set(op["responses"])
    assert "/v1/outputs/{output_id}" in spec["paths"]


def test_worker_killed_mid_request_gives_502_then_recovers(server: InProcessServer) -> None:
    import psutil

    server.wait_ready()
    pids = server.worker_pids()
    assert len(pids) == 1
    result: dict[str, requests.Response] = {}
    slow = {"prompt": "slow", "width": 1024, "height": 1024, "steps": 30}
    thread = threading.Thread(target=lambda: result.setdefault("r", server.post(slow)))
    thread.start()
    worker = psutil.Process(pids[0])
    deadline = time.monotonic() + 30
    while worker.cpu_percent(interval=0.2) < 50 and time.monotonic() < deadline:
        pass  # wait until the worker is busy with the request
    worker.kill()
    thread.join(60)
    r = result["r"]
    assert r.status_code == 502
    assert "worker process died" in r.json()["error"]
    server.wait_ready()
    assert server.worker_pids() != pids
    assert server.post({"prompt": "after the crash", **SMALL}).status_code == 200
