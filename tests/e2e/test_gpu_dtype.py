"""Every task in the GPU's dtype, on the CPU: ``ZIMAGE_DTYPE=bfloat16``.

CPU tests run float32 by default, so a path that changes or mixes dtypes only fails on a
GPU (the first lent H200 found one: building the image-to-image pipelines cast the bf16
model to float32). This server runs the tiny model in bfloat16, as CUDA would, with a LoRA,
a ControlNet, previews and batching, and every task must render through it.
"""

from __future__ import annotations

from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import requests

from tests.conftest import ADMIN, InProcessServer, create_key
from tests.e2e.test_controlnet import STEPS, controlnet_server
from tests.e2e.test_controlnet import post as controlnet_post
from tests.e2e.test_image_inputs import b64, photo, pixels, square_mask


@pytest.fixture(scope="module")
def api(tmp_path_factory: pytest.TempPathFactory) -> Iterator[InProcessServer]:
    folder = Path(tmp_path_factory.mktemp("bf16"))
    server = controlnet_server(folder, ZIMAGE_DTYPE="bfloat16", ZIMAGE_WARMUP_SIZE="256")
    yield server
    server.stop()


@pytest.fixture(scope="module")
def key(api: InProcessServer) -> str:
    return create_key(api, ADMIN, 1000)


def post(api: InProcessServer, key: str, slug: str, body: dict[str, Any]) -> requests.Response:
    """The ControlNet tests' request (2 steps, seed 7, PNG), at 256x256 on any slug."""
    return controlnet_post(api, key, {"width": 256, "height": 256, **body}, slug)


def rendered(reply: requests.Response) -> np.ndarray:
    assert reply.status_code == 200, reply.text[:500]
    image = pixels(reply)
    assert image.shape == (256, 256, 3) and image.std() > 1  # a picture, not a flat fill
    return image


def test_the_model_is_still_bfloat16_after_warm_up(api: InProcessServer) -> None:
    """The dtype at ready is the transformer's own, read after warm-up has built every
    task's pipeline (the step that once cast it to float32)."""
    assert "ready on cpu (bfloat16)" in api.log()


def test_every_task_renders_in_bfloat16(api: InProcessServer, key: str) -> None:
    plain = rendered(post(api, key, "z-image-turbo", {}))
    styled = rendered(post(api, key, "z-image-turbo", {"loras": [{"path": "style"}]}))
    assert not np.array_equal(plain, styled)  # the adapter applied
    rendered(post(api, key, "z-image-turbo-img2img", {"image": b64(photo(1))}))
    inpaint = {"image": b64(photo(2)), "mask_image": b64(square_mask())}
    rendered(post(api, key, "z-image-turbo-inpaint", inpaint))
    rendered(post(api, key, "z-image-turbo-controlnet", {"control_image": b64(photo(3))}))
    # The model is still bf16 after each task: a plain render gives the same bytes again.
    assert np.array_equal(plain, rendered(post(api, key, "z-image-turbo", {})))


def test_a_batch_of_two_renders_in_bfloat16(api: InProcessServer, key: str) -> None:
    bodies = [{"prompt": "a fox"}, {"prompt": "a lighthouse at dawn, oil painting"}]
    with ThreadPoolExecutor(2) as pool:
        replies = list(pool.map(lambda b: post(api, key, "z-image-turbo", b), bodies))
    for reply in replies:
        rendered(reply)


def test_previews_stream_in_bfloat16(api: InProcessServer, key: str) -> None:
    body = {"prompt": "a fox", "steps": STEPS, "preview_size": 64, "base_64": True}
    with requests.post(
        f"{api.url}/v1/z-image-turbo",
        json=body | {"width": 256, "height": 256},
        headers={"x-api-key": key, "accept": "text/event-stream"},
        stream=True,
        timeout=120,
    ) as reply:
        assert reply.status_code == 200
        text = reply.text
    assert text.count("event: step") == STEPS and '"preview"' in text
    assert "event: completed" in text
