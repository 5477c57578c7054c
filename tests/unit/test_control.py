"""ControlNet's pre-processors, the PNG form a v2 job stores its images in, and the price."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from zimage_server.billing import Pricing
from zimage_server.core.errors import InvalidRequest
from zimage_server.images.control import preprocess
from zimage_server.images.inputs import pack_png, unpack_png


def disc(size: int = 64) -> Image.Image:
    """A grey disc on a gradient: one clear outline, smooth elsewhere."""
    y, x = np.mgrid[0:size, 0:size]
    rgb = np.stack([x * 2, y * 2, np.full_like(x, 40)], axis=-1).astype(np.uint8)
    rgb[(x - size / 2) ** 2 + (y - size / 2) ** 2 < (size / 4) ** 2] = 200
    return Image.fromarray(rgb)


def test_canny_makes_white_edges_on_black_where_the_photo_has_them() -> None:
    photo = disc()
    edges = np.asarray(preprocess(photo, "canny"))
    assert edges.shape == (64, 64, 3) and set(np.unique(edges)) == {0, 255}
    assert (edges[..., 0] == edges[..., 1]).all() and (edges[..., 1] == edges[..., 2]).all()
    on = edges[..., 0] == 255
    assert 40 < on.sum() < 400  # the disc's outline, not the gentle gradient
    assert not on[28:36, 28:36].any()  # nothing inside the disc
    flat = Image.new("RGB", (64, 64), (90, 90, 90))
    assert not np.asarray(preprocess(flat, "canny")).any()


def test_none_keeps_the_control_image_as_is() -> None:
    photo = disc()
    assert np.array_equal(np.asarray(preprocess(photo, "none")), np.asarray(photo))


def test_stored_images_come_back_exactly_and_only_as_stored() -> None:
    raw = np.asarray(disc(32)).tobytes()
    packed = pack_png(raw, "RGB", (32, 32))
    assert packed is not None and packed.startswith("data:image/png;base64,")
    assert unpack_png(packed, "RGB", (32, 32), "image") == raw
    assert pack_png(b"", "L", (32, 32)) is None and unpack_png(None, "L", (32, 32), "x") == b""
    with pytest.raises(InvalidRequest) as refused:
        unpack_png(packed, "RGB", (48, 32), "control_image")
    assert refused.value.field == "control_image"


def test_controlnet_costs_its_surcharge_on_top_of_size_and_steps() -> None:
    pricing = Pricing(reference=1.0, lora_surcharge=0.25, controlnet_surcharge=0.5)
    base = pricing.price(1024, 1024, 8)
    assert base == 1_000_000
    assert pricing.price(1024, 1024, 8, controlnet=True) == 1_500_000
    assert pricing.price(1024, 1024, 8, loras=True, controlnet=True) == 1_750_000
