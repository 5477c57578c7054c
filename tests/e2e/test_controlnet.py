"""ControlNet (plain and inpainting) on v1, and every image task as a v2 job.

One tiny server with keys, batching on, a LoRA installed, and ``ZIMAGE_CONTROLNET`` naming
a tiny random ``ZImageControlNetModel`` built here to fit the tiny transformer and saved in
diffusers format, so the worker loads it through the real loading path. A ControlNet is
zero-initialised where it feeds the transformer (it starts as a no-op); those weights are
made random here, or no control image could change anything.
"""

from __future__ import annotations

import base64
import io
import re
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import requests
import torch
from diffusers import ZImageControlNetModel
from PIL import Image

from tests.conftest import (
    ADMIN,
    AUTH_ENV,
    AnyServer,
    InProcessServer,
    create_key,
    fresh_database_url,
    shared_tiny_model,
)
from tests.e2e.test_image_inputs import b64, balance, distance, photo, pixels, square_mask
from tests.loras import ATTENTION, adapter_weights, save_diffusers
from zimage_server.billing import Pricing, format_credits
from zimage_server.images.control import canny

STEPS = 2
SIZE = 256
SLUG = "z-image-turbo-controlnet"


def tiny_controlnet(folder: Path) -> Path:
    """A random ControlNet of the union 2.0 layout (control input: image latents, mask,
    masked-image latents = 33 channels, so it serves plain and inpainting ControlNet),
    shaped like the tiny transformer (dim 64, 2 layers, 1 refiner layer, 2 heads)."""
    torch.manual_seed(0)
    model = ZImageControlNetModel(
        control_layers_places=[0, 1],
        control_refiner_layers_places=[0],
        control_in_dim=33,
        add_control_noise_refiner="control_noise_refiner",
        dim=64,
        n_refiner_layers=1,
        n_heads=2,
        n_kv_heads=2,
    )
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for weight in model.parameters():
            if not weight.any():  # the zero-initialised projections into the transformer
                weight.copy_(torch.randn(weight.shape, generator=generator) * 0.5)
    model.save_pretrained(folder)
    return folder


def controlnet_server(folder: Path, **env: str) -> InProcessServer:
    """A tiny server with keys, batching, the ControlNet above and a LoRA named "style";
    ``env`` adds settings."""
    loras = folder / "loras"
    save_diffusers(adapter_weights(shared_tiny_model(), ATTENTION, 4, seed=1), loras / "style")
    settings = {
        **AUTH_ENV,
        "ZIMAGE_DATABASE_URL": fresh_database_url("sqlite", folder),
        "ZIMAGE_CONTROLNET": str(tiny_controlnet(folder / "controlnet")),
        "ZIMAGE_LORA_DIR": str(loras),
        "ZIMAGE_BATCH_WAIT_MS": "300",
        **env,
    }
    return InProcessServer(folder / "data", env=settings)


@pytest.fixture(scope="module")
def api(tmp_path_factory: pytest.TempPathFactory) -> Iterator[InProcessServer]:
    server = controlnet_server(Path(tmp_path_factory.mktemp("controlnet")))
    yield server
    server.stop()


@pytest.fixture(scope="module")
def key(api: InProcessServer) -> str:
    return create_key(api, ADMIN, 1000)


def post(
    api: InProcessServer, key: str, body: dict[str, Any], slug: str = SLUG
) -> requests.Response:
    payload = {"prompt": "a fox", "steps": STEPS, "seed": 7, "image_format": "png"}
    payload |= {"base_64": True, **body}
    return requests.post(
        f"{api.url}/v1/{slug}", json=payload, headers={"x-api-key": key}, timeout=120
    )


def control(picture: int, **extra: Any) -> dict[str, Any]:
    return {"control_image": b64(photo(picture)), **extra}


# -- ControlNet on v1 ---------------------------------------------------------------------
def test_the_output_follows_the_control_image_and_scale_zero_is_text_to_image(
    api: InProcessServer, key: str
) -> None:
    first = post(api, key, control(1))
    other = post(api, key, control(2))
    off = post(api, key, control(1, controlnet_conditioning_scale=0))
    plain = post(api, key, {"width": SIZE, "height": SIZE}, slug="z-image-turbo")
    assert distance(pixels(first), pixels(other)) > 1.0
    assert distance(pixels(first), pixels(off)) > 1.0
    # At scale 0 the ControlNet's residuals are multiplied by 0: exactly text-to-image.
    assert off.json()["image"] == plain.json()["image"]


def test_warm_up_built_the_controlnet_pipelines_so_no_request_pays_for_them(
    api: InProcessServer, key: str
) -> None:
    """The worker reports ``timings.pipeline_build`` (also a stage on ``/metrics``) when a
    request builds its task's pipeline; warm-up built them all and rendered a ControlNet
    image, so neither these requests nor any before them on this server built one."""
    inpaint = {"image": b64(photo(5)), "mask_image": b64(square_mask())}
    for reply in (post(api, key, control(5)), post(api, key, control(5, **inpaint))):
        assert reply.status_code == 200, reply.text
        assert "pipeline_build" not in reply.json()["timings"], reply.json()["timings"]
    stages = requests.get(api.url + "/metrics", timeout=10).text
    assert 'zimage_stage_duration_seconds_count{stage="denoise"}' in stages
    assert 'stage="pipeline_build"' not in stages


def test_same_seed_same_bytes_and_the_price_has_the_surcharge(
    api: InProcessServer, key: str
) -> None:
    first, second = post(api, key, control(3)), post(api, key, control(3))
    assert first.status_code == 200 and first.json()["image"] == second.json()["image"]
    price = Pricing(controlnet_surcharge=0.5).price(SIZE, SIZE, STEPS, controlnet=True)
    assert first.headers["x-credits-consumed"] == format_credits(price)
    assert price == Pricing().price(SIZE, SIZE, STEPS) * 3 // 2


def test_canny_turns_a_photo_into_its_edges_end_to_end(api: InProcessServer, key: str) -> None:
    edges = canny(photo(4))
    as_canny = post(api, key, control(4, control_type="canny"))
    given_edges = post(api, key, {"control_image": b64(edges)})
    as_is = post(api, key, control(4))
    assert as_canny.json()["image"] == given_edges.json()["image"]
    assert distance(pixels(as_canny), pixels(as_is)) > 1.0


def test_size_defaults_to_the_control_image_and_is_returned_exactly(
    api: InProcessServer, key: str
) -> None:
    body = {"control_image": b64(photo(5, (300, 260)))}
    reply = post(api, key, body)
    assert (reply.json()["width"], reply.json()["height"]) == (300, 260)
    image = Image.open(io.BytesIO(base64.b64decode(reply.json()["image"])))
    assert image.size == (300, 260)


def batch_sizes(api: InProcessServer) -> tuple[float, float]:
    """The batch-size histogram (one observation per image, of its batch's size): its sum
    and count, which differ once an image shared its batch."""
    text = requests.get(api.url + "/metrics", timeout=10).text
    found = dict(re.findall(r"^zimage_batch_size_(sum|count) (\S+)$", text, re.MULTILINE))
    return float(found["sum"]), float(found["count"])


def test_batched_equals_batch_of_one(api: InProcessServer, key: str) -> None:
    """Not bitwise: batched float outputs are within 7e-6 of the batch-of-one ones, which
    after rounding to 8 bits moves ~30 of 196,608 values by one level (measured); held to
    test_batching.py's standard for text-to-image: 2 levels in at most 0.1% of values."""
    cases = [control(10 + i, seed=100 + i, prompt=f"a fox {'x' * i}") for i in range(3)]

    def run(body: dict[str, Any]) -> requests.Response:
        return post(api, key, body)

    sum_before, images_before = batch_sizes(api)
    with ThreadPoolExecutor(len(cases)) as pool:
        together = list(pool.map(run, cases))
    total, images = batch_sizes(api)
    assert images - images_before == 3 and total - sum_before > 3  # some were batched
    for shared, alone in zip(together, [run(body) for body in cases], strict=True):
        diff = np.abs(pixels(shared) - pixels(alone))
        assert diff.max() <= 2 and (diff > 0).mean() <= 0.001


def test_controlnet_inpainting_keeps_the_unmasked_pixels(api: InProcessServer, key: str) -> None:
    source = photo(6)
    body = {"image": b64(source), "mask_image": b64(square_mask()), **control(7)}
    out = pixels(post(api, key, body))
    target = np.asarray(source).astype(np.float32)
    keep = np.asarray(square_mask()) == 0
    assert distance(out[keep], target[keep]) < 1.0
    assert distance(out[~keep], target[~keep]) > 10.0


def test_loras_apply_to_controlnet(api: InProcessServer, key: str) -> None:
    """At scale 0 a ControlNet render is text-to-image, so with a LoRA it must be the
    text-to-image render with that LoRA: the adapter reaches the ControlNet pipeline's
    transformer (the random ControlNet's residuals at 0.75 dwarf the tiny LoRA's effect)."""
    lora = {"loras": [{"path": "style", "scale": 1.0}]}
    off = post(api, key, control(8, controlnet_conditioning_scale=0))
    styled = post(api, key, control(8, controlnet_conditioning_scale=0, **lora))
    plain = post(api, key, {"width": SIZE, "height": SIZE, **lora}, slug="z-image-turbo")
    assert "lora_load" in styled.json()["timings"]
    assert styled.json()["image"] == plain.json()["image"]
    assert np.abs(pixels(off) - pixels(styled)).max() > 8  # as test_loras.py measures


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"control_image": base64.b64encode(b"not an image").decode()}, "control_image"),
        ({"control_image": "data:image/png;base64,???"}, "control_image"),
        ({}, "control_image"),
        ({"image": b64(photo(1)), **control(1)}, "mask_image"),
        ({"strength": 0.5, **control(1)}, "strength"),
        (control(1, controlnet_conditioning_scale=3), "controlnet_conditioning_scale"),
        (control(1, control_type="depth"), "control_type"),
    ],
)
def test_bad_controlnet_requests_are_400s_naming_the_field_unbilled(
    api: InProcessServer, key: str, body: dict[str, Any], field: str
) -> None:
    before = balance(api, key)
    reply = post(api, key, body)
    assert reply.status_code == 400 and f"'{field}'" in reply.json()["error"], reply.text
    assert balance(api, key) == before


def test_control_fields_on_another_slug_are_refused(api: InProcessServer, key: str) -> None:
    body = {"image": b64(photo(1)), "control_type": "canny"}
    reply = post(api, key, body, slug="z-image-turbo-img2img")
    assert reply.status_code == 400 and "z-image-turbo-controlnet" in reply.json()["error"]


# -- image tasks as v2 jobs ---------------------------------------------------------------
def submit(api: AnyServer, key: str, slug: str, body: dict[str, Any]) -> requests.Response:
    payload = {"prompt": "a fox", "steps": STEPS, "seed": 9, "image_format": "png"}
    payload |= {"base_64": True, **body}
    return requests.post(
        f"{api.url}/v2/{slug}", json=payload, headers={"x-api-key": key}, timeout=60
    )


def job_image(api: InProcessServer, key: str, reply: requests.Response) -> str:
    assert reply.status_code == 202, reply.text
    headers, deadline = {"x-api-key": key}, time.monotonic() + 60
    while True:
        status = requests.get(reply.json()["status_url"], headers=headers, timeout=10).json()
        if status["status"] not in ("QUEUED", "PROCESSING"):
            break
        assert time.monotonic() < deadline, status
        time.sleep(0.05)
    assert status["status"] == "COMPLETED", status
    result = requests.get(reply.json()["response_url"], headers=headers, timeout=10).json()
    return str(result["output"])


V2_CASES = [
    ("z-image-turbo-img2img", {"image": b64(photo(20, (300, 260))), "strength": 0.5}),
    ("z-image-turbo-inpaint", {"image": b64(photo(21)), "mask_image": b64(square_mask())}),
    (SLUG, {"control_image": b64(photo(22)), "control_type": "canny"}),
    (SLUG, {"image": b64(photo(23)), "mask_image": b64(square_mask()), **control(24)}),
]


def test_v2_jobs_render_every_image_task_as_v1_does(api: InProcessServer, key: str) -> None:
    """The job stores its decoded images (PNGs at render size, the control image already
    pre-processed) and renders the very image a v1 request does, at the input's size."""
    jobs = [submit(api, key, slug, body) for slug, body in V2_CASES]
    for (slug, body), job in zip(V2_CASES, jobs, strict=True):
        output = job_image(api, key, job)
        v1 = post(api, key, {**body, "seed": 9}, slug=slug)
        assert output == v1.json()["image"], slug
    first = Image.open(io.BytesIO(base64.b64decode(job_image(api, key, jobs[0]))))
    assert first.size == (300, 260)


@pytest.mark.parametrize(
    ("slug", "body", "field"),
    [
        ("z-image-turbo-img2img", {"image": "bm90IGFuIGltYWdl"}, "image"),
        (
            "z-image-turbo-inpaint",
            {"image": b64(photo(1)), "mask_image": b64(square_mask(128))},
            "mask_image",
        ),
        (SLUG, {"control_image": "bm90IGFuIGltYWdl"}, "control_image"),
    ],
)
def test_v2_refuses_a_bad_image_at_submission_unbilled(
    api: InProcessServer, key: str, slug: str, body: dict[str, Any], field: str
) -> None:
    before = balance(api, key)
    reply = submit(api, key, slug, body)
    assert reply.status_code == 400 and f"'{field}'" in reply.json()["error"], reply.text
    assert balance(api, key) == before
