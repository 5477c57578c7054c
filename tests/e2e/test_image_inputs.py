"""Images in: img2img and inpaint slugs, OpenAI's edits endpoint, and hostile inputs.

One tiny server with keys (so "nothing billed" is a balance that did not move), batching
on, and 127.0.0.2/32 allowed for input URLs: fetching works there, while 127.0.0.1 stays
refused by the address policy (Linux routes all of 127/8 to the loopback interface).
"""

from __future__ import annotations

import base64
import io
import json
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import openai
import pytest
import requests
from PIL import Image

from tests.conftest import ADMIN, AUTH_ENV, InProcessServer, create_key, fresh_database_url

STEPS = 4
SIZE = 256


@pytest.fixture(scope="module")
def api(tmp_path_factory: pytest.TempPathFactory) -> Iterator[InProcessServer]:
    folder = Path(tmp_path_factory.mktemp("inputs"))
    env = {
        **AUTH_ENV,
        "ZIMAGE_DATABASE_URL": fresh_database_url("sqlite", folder),
        "ZIMAGE_INPUT_ALLOWED_NETWORKS": '["127.0.0.2/32"]',
        "ZIMAGE_INPUT_MAX_PIXELS": str(2048 * 2048),
        "ZIMAGE_BATCH_WAIT_MS": "300",
    }
    srv = InProcessServer(folder, env=env)
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def key(api: InProcessServer) -> str:
    return create_key(api, ADMIN, 1000)


def photo(seed: int = 0, size: tuple[int, int] = (SIZE, SIZE)) -> Image.Image:
    """A smooth, structured test picture (gradients plus a disc), different per seed."""
    w, h = size
    y, x = np.mgrid[0:h, 0:w].astype(np.float32)
    rng = np.random.default_rng(seed)
    a, b, c = rng.uniform(0.5, 2.0, 3)
    disc = ((x - w * 0.6) ** 2 + (y - h * 0.4) ** 2 < (min(w, h) * 0.2) ** 2) * 120
    rgb = np.stack(
        [
            (np.sin(x / w * np.pi * a) * 127 + 128) * 0.6 + disc,
            (y / h * 255) * b % 255,
            (x + y) / (w + h) * 255 * c % 255,
        ],
        axis=-1,
    )
    return Image.fromarray(np.clip(rgb, 0, 255).astype(np.uint8))


def b64(image: Image.Image, fmt: str = "PNG") -> str:
    buffer = io.BytesIO()
    image.save(buffer, fmt)
    return base64.b64encode(buffer.getvalue()).decode()


def data_uri(image: Image.Image) -> str:
    return "data:image/png;base64," + b64(image)


def post(
    api: InProcessServer, key: str, slug: str, body: dict[str, Any], timeout: float = 120
) -> requests.Response:
    payload = {"steps": STEPS, "seed": 7, "image_format": "png", "base_64": True, **body}
    return requests.post(
        f"{api.url}/v1/{slug}", json=payload, headers={"x-api-key": key}, timeout=timeout
    )


def pixels(response: requests.Response) -> np.ndarray:
    assert response.status_code == 200, response.text
    data = base64.b64decode(response.json()["image"])
    return np.asarray(Image.open(io.BytesIO(data)).convert("RGB")).astype(np.float32)


def distance(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(a - b).mean())


def balance(api: InProcessServer, key: str) -> tuple[str, str]:
    reply = requests.get(
        f"{api.url}/admin/keys/{key.split('_')[1]}/usage",
        headers={"x-admin-token": ADMIN},
        timeout=10,
    )
    assert reply.status_code == 200, reply.text
    return reply.json()["balance"], reply.json()["pending"]


# -- img2img ------------------------------------------------------------------------------
def test_img2img_strength_one_ignores_the_input_and_lower_stays_closer(
    api: InProcessServer, key: str
) -> None:
    """The input's weight in the output, measured as how far apart the outputs of two
    different inputs are (the tiny model's VAE is random, so its round trip is far from
    any input: the distance to the input itself says little)."""

    def render(image: Image.Image, strength: float) -> np.ndarray:
        body = {"prompt": "a fox", "image": data_uri(image), "strength": strength}
        return pixels(post(api, key, "z-image-turbo-img2img", body))

    apart = {s: distance(render(photo(1), s), render(photo(2), s)) for s in (0.25, 0.5, 1.0)}
    # At strength 1 the start is pure noise, as in text-to-image: the input does not matter.
    assert apart[1.0] == 0.0
    assert apart[0.25] > apart[0.5] > 1.0, apart


def test_a_streamed_img2img_counts_the_steps_it_runs(api: InProcessServer, key: str) -> None:
    """At strength 0.5 half the steps run: ``started`` and every ``step`` say so."""
    body = {"prompt": "a fox", "image": data_uri(photo(4)), "strength": 0.5, "steps": 4}
    headers = {"x-api-key": key, "Accept": "text/event-stream"}
    with requests.post(
        api.url + "/v1/z-image-turbo-img2img", json=body, headers=headers, stream=True, timeout=120
    ) as reply:
        assert reply.status_code == 200
        data = [
            json.loads(line.removeprefix("data: "))
            for line in reply.iter_lines(decode_unicode=True)
            if line and line.startswith("data: {")
        ]
    totals = {event["total"] for event in data if "total" in event}
    assert totals == {2}, data


def test_img2img_size_defaults_to_the_input_and_is_returned_exactly(
    api: InProcessServer, key: str
) -> None:
    response = post(
        api, key, "z-image-turbo-img2img", {"prompt": "a fox", "image": b64(photo(3, (300, 260)))}
    )
    assert response.status_code == 200, response.text
    body = response.json()
    assert (body["width"], body["height"]) == (300, 260)
    image = Image.open(io.BytesIO(base64.b64decode(body["image"])))
    assert image.size == (300, 260)
    # an explicit size wins
    explicit = post(
        api,
        key,
        "z-image-turbo-img2img",
        {"prompt": "a fox", "image": b64(photo(3, (300, 260))), "width": 256, "height": 384},
    )
    assert (explicit.json()["width"], explicit.json()["height"]) == (256, 384)


def test_same_seed_same_bytes(api: InProcessServer, key: str) -> None:
    body = {"prompt": "a fox", "image": b64(photo(4)), "strength": 0.5}
    first = post(api, key, "z-image-turbo-img2img", body)
    second = post(api, key, "z-image-turbo-img2img", body)
    assert first.status_code == 200 and first.json()["image"] == second.json()["image"]


# -- inpaint ------------------------------------------------------------------------------
def square_mask(size: int = SIZE) -> Image.Image:
    mask = np.zeros((size, size), np.uint8)
    mask[64:192, 64:192] = 255
    return Image.fromarray(mask)


def test_inpaint_keeps_unmasked_pixels_and_repaints_the_rest(
    api: InProcessServer, key: str
) -> None:
    source = photo(5)
    out = pixels(
        post(
            api,
            key,
            "z-image-turbo-inpaint",
            {"prompt": "a fox", "image": b64(source), "mask_image": b64(square_mask())},
        )
    )
    target = np.asarray(source).astype(np.float32)
    keep = np.asarray(square_mask()) == 0
    assert distance(out[keep], target[keep]) < 1.0
    assert distance(out[~keep], target[~keep]) > 10.0


def test_batched_equals_batch_of_one_for_each_task(api: InProcessServer, key: str) -> None:
    cases = [
        ("z-image-turbo-img2img", {"image": b64(photo(6)), "strength": 0.75}),
        ("z-image-turbo-img2img", {"image": b64(photo(7)), "strength": 0.75}),
        ("z-image-turbo-inpaint", {"image": b64(photo(6)), "mask_image": b64(square_mask())}),
        ("z-image-turbo-inpaint", {"image": b64(photo(7)), "mask_image": b64(square_mask())}),
    ]

    def run(i: int) -> requests.Response:
        slug, body = cases[i]
        return post(api, key, slug, {"prompt": f"a fox {i}", "seed": 100 + i, **body})

    with ThreadPoolExecutor(len(cases)) as pool:
        batched = list(pool.map(run, range(len(cases))))
    singles = [run(i) for i in range(len(cases))]
    for together, alone in zip(batched, singles, strict=True):
        assert np.abs(pixels(together) - pixels(alone)).max() <= 2


# -- OpenAI's edits -----------------------------------------------------------------------
def png_file(image: Image.Image) -> io.BytesIO:
    buffer = io.BytesIO()
    image.save(buffer, "PNG")
    buffer.seek(0)
    buffer.name = "image.png"
    return buffer


def test_openai_edit_without_and_with_a_mask(api: InProcessServer, key: str) -> None:
    client = openai.OpenAI(base_url=api.url + "/v1", api_key=key, max_retries=0)
    source = photo(8)
    plain = client.images.edit(
        image=png_file(source),
        prompt="a fox",
        size="256x256",
        response_format="b64_json",
        extra_body={"num_inference_steps": STEPS, "seed": 3},
    )
    first = Image.open(io.BytesIO(base64.b64decode(plain.data[0].b64_json or "")))
    assert first.size == (256, 256)
    alpha = np.full((SIZE, SIZE), 255, np.uint8)
    alpha[64:192, 64:192] = 0  # transparent: edit here
    mask = Image.fromarray(np.dstack([np.zeros((SIZE, SIZE, 3), np.uint8), alpha]), "RGBA")
    masked = client.images.edit(
        image=png_file(source),
        mask=png_file(mask),
        prompt="a fox",
        n=2,
        response_format="b64_json",
        extra_body={"num_inference_steps": STEPS, "seed": 3},
    )
    assert len(masked.data) == 2
    out = np.asarray(
        Image.open(io.BytesIO(base64.b64decode(masked.data[0].b64_json or ""))).convert("RGB")
    ).astype(np.float32)
    keep = alpha == 255
    target = np.asarray(source).astype(np.float32)
    assert distance(out[keep], target[keep]) < 1.0
    assert distance(out[~keep], target[~keep]) > 10.0


def test_openai_edit_refuses_a_mask_without_alpha(api: InProcessServer, key: str) -> None:
    client = openai.OpenAI(base_url=api.url + "/v1", api_key=key, max_retries=0)
    with pytest.raises(openai.BadRequestError) as caught:
        client.images.edit(image=png_file(photo(9)), mask=png_file(photo(9)), prompt="a fox")
    assert "mask" in str(caught.value) and "alpha" in str(caught.value)


@pytest.mark.parametrize(
    "headers",
    [{"Origin": "http://evil.example"}, {"Origin": "null"}, {"Sec-Fetch-Site": "cross-site"}],
)
def test_a_cross_site_form_post_is_refused(
    api: InProcessServer, key: str, headers: dict[str, str]
) -> None:
    """A form needs no CORS preflight: another site's page must not drive renders."""
    r = requests.post(
        api.url + "/v1/images/edits",
        files={"image": ("photo.png", png_file(photo(11)), "image/png")},
        data={"prompt": "a fox"},
        headers={"Authorization": f"Bearer {key}", **headers},
        timeout=30,
    )
    assert r.status_code == 403 and "another site" in r.json()["error"]["message"]
    same_site = {"Origin": api.url, "Sec-Fetch-Site": "same-origin"}
    ok = requests.post(
        api.url + "/v1/images/edits",
        files={"image": ("photo.png", png_file(photo(11)), "image/png")},
        data={"prompt": "a fox", "size": "256x256"},
        headers={"Authorization": f"Bearer {key}", **same_site},
        timeout=120,
    )
    assert ok.status_code == 200, ok.text


# -- hostile inputs -----------------------------------------------------------------------


def send_png(handler: BaseHTTPRequestHandler, data: bytes) -> None:
    """A 200 with ``data`` as a PNG (the image servers these tests fetch from)."""
    handler.send_response(200)
    handler.send_header("Content-Type", "image/png")
    handler.send_header("Content-Length", str(len(data)))
    handler.end_headers()
    handler.wfile.write(data)


class _Handler(BaseHTTPRequestHandler):
    hits: ClassVar[list[str]] = []

    def do_GET(self) -> None:
        _Handler.hits.append(self.path)
        if self.path == "/redirect":
            self.send_response(302)
            self.send_header("Location", "http://127.0.0.2/photo.png")
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        data = base64.b64decode(b64(photo(10)))
        send_png(self, data)

    def log_message(self, *_args: object) -> None:
        pass


@pytest.fixture(scope="module")
def image_host() -> Iterator[str]:
    """An image server on 127.0.0.2 (allowed) whose port also answers on nothing else."""
    httpd = ThreadingHTTPServer(("127.0.0.2", 0), _Handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"127.0.0.2:{httpd.server_address[1]}"
    httpd.shutdown()


def test_an_allowed_url_is_fetched(api: InProcessServer, key: str, image_host: str) -> None:
    body = {"prompt": "a fox", "image": f"http://{image_host}/photo.png", "strength": 0.5}
    assert post(api, key, "z-image-turbo-img2img", body).status_code == 200


def bomb() -> str:
    """A PNG that claims 20000x20000 pixels (400 megapixels) in a few hundred kB."""
    buffer = io.BytesIO()
    Image.new("L", (20000, 20000)).save(buffer, "PNG", optimize=False)
    return base64.b64encode(buffer.getvalue()).decode()


def hostile_cases(image_host: str) -> list[tuple[str, dict[str, Any], str, str]]:
    """(slug, body, field, words the message must contain)."""
    source = b64(photo(11))
    small_mask = b64(Image.new("L", (128, 128), 255))
    return [
        ("z-image-turbo-img2img", {"image": bomb()}, "image", "pixels"),
        (
            "z-image-turbo-img2img",
            {"image": base64.b64encode(b"%PDF-1.4 hello").decode()},
            "image",
            "PNG, JPEG or WebP",
        ),
        ("z-image-turbo-img2img", {"image": "not base64 at all!"}, "image", "base64"),
        (
            "z-image-turbo-img2img",
            {"image": "http://127.0.0.1:9/photo.png"},
            "image",
            "private or local",
        ),
        (
            "z-image-turbo-img2img",
            {"image": f"http://{image_host.replace('127.0.0.2', '127.0.0.1')}/photo.png"},
            "image",
            "private or local",
        ),
        ("z-image-turbo-img2img", {"image": f"http://{image_host}/redirect"}, "image", "redirects"),
        (
            "z-image-turbo-inpaint",
            {"image": source, "mask_image": small_mask},
            "mask_image",
            "same size",
        ),
        ("z-image-turbo-inpaint", {"image": source}, "mask_image", "Missing"),
        ("z-image-turbo-img2img", {}, "image", "Missing"),
        ("z-image-turbo-img2img", {"image": source, "strength": 0}, "strength", "above 0"),
        ("z-image-turbo", {"image": source}, "image", "z-image-turbo-img2img"),
    ]


def test_hostile_inputs_are_clear_400s_unbilled_and_the_server_stays_ready(
    api: InProcessServer, key: str, image_host: str
) -> None:
    before = balance(api, key)
    _Handler.hits.clear()
    for slug, body, field, words in hostile_cases(image_host):
        response = post(api, key, slug, {"prompt": "a fox", **body})
        assert response.status_code == 400, (slug, body.keys(), response.text)
        error = response.json()
        message = str(error)
        assert field in message and words in message, message
    assert _Handler.hits == ["/redirect"]  # the loopback URL was refused without connecting
    # A 50 MB image fits the body limit (three largest inputs) but not an image's: a 400
    # naming it. A body over the limit is a 413 before it is read to its end.
    fifty = b'{"prompt": "a fox", "image": "' + b"A" * (50 * 2**20) + b'"}'
    response = requests.post(
        f"{api.url}/v1/z-image-turbo-img2img",
        data=fifty,
        headers={"x-api-key": key, "content-type": "application/json"},
        timeout=60,
    )
    assert response.status_code == 400 and "'image'" in response.text, response.text[:300]
    huge = b"x" * (66 * 2**20)
    response = requests.post(
        f"{api.url}/v1/z-image-turbo-img2img",
        data=huge,
        headers={"x-api-key": key, "content-type": "application/json"},
        timeout=60,
    )
    assert response.status_code == 413 and "at most" in response.text
    assert balance(api, key) == before
    assert requests.get(api.url + "/readyz", timeout=10).status_code == 200


def test_controlnet_without_weights_is_a_404_that_names_the_setting(
    api: InProcessServer, key: str
) -> None:
    """This server has no ZIMAGE_CONTROLNET: the slug is known, not served, on v1 and v2."""
    before = balance(api, key)
    for version in ("v1", "v2"):
        response = requests.post(
            f"{api.url}/{version}/z-image-turbo-controlnet",
            json={"prompt": "a fox", "control_image": b64(photo(12))},
            headers={"x-api-key": key},
            timeout=30,
        )
        assert response.status_code == 404, response.text
        assert "ZIMAGE_CONTROLNET" in response.json()["error"]
    assert balance(api, key) == before
