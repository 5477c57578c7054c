"""Cropping, encoding, the guidance mapping and the output store."""

from __future__ import annotations

import io
import os
import time
from pathlib import Path

import pytest
from PIL import Image

from zimage_server.core.errors import InsufficientStorage, OutputNotFound
from zimage_server.engine.generator import diffusers_guidance
from zimage_server.images.encode import encode_image, round_up_16
from zimage_server.store import OutputStore


@pytest.mark.parametrize(
    ("pixels", "rounded"), [(256, 256), (257, 272), (1000, 1008), (2048, 2048)]
)
def test_round_up_16(pixels: int, rounded: int) -> None:
    assert round_up_16(pixels) == rounded


def test_encode_centre_crops_to_the_exact_size() -> None:
    # A 32x16 render: left half black, right half white; crop 16x16 from the centre.
    render = Image.new("RGB", (32, 16))
    render.paste((255, 255, 255), (16, 0, 32, 16))
    data = encode_image(render.tobytes(), (32, 16), (16, 16), "png", 90)
    out = Image.open(io.BytesIO(data))
    assert out.size == (16, 16)
    assert out.getpixel((0, 0)) == (0, 0, 0) and out.getpixel((15, 0)) == (255, 255, 255)


@pytest.mark.parametrize(
    ("api", "expected"), [(0, 0.0), (0.5, 0.0), (1, 0.0), (3, 2.0), (15, 14.0)]
)
def test_guidance_mapping(api: float, expected: float) -> None:
    assert diffusers_guidance(api) == expected


def test_output_store_round_trip_and_expiry(tmp_path: Path) -> None:
    store = OutputStore(tmp_path, ttl_s=60)
    output_id = store.save(b"abc", "webp")
    assert store.path(output_id).read_bytes() == b"abc"
    old = time.time() - 120
    os.utime(tmp_path / output_id, (old, old))
    with pytest.raises(OutputNotFound, match="expired"):
        store.path(output_id)
    assert not (tmp_path / output_id).exists()


def test_output_store_sweep(tmp_path: Path) -> None:
    store = OutputStore(tmp_path, ttl_s=60)
    keep, drop = store.save(b"1", "png"), store.save(b"2", "png")
    old = time.time() - 120
    os.utime(tmp_path / drop, (old, old))
    assert store.sweep() == 1
    assert (tmp_path / keep).exists() and not (tmp_path / drop).exists()


@pytest.mark.parametrize("bad", ["../x.webp", "a" * 32 + ".gif", "a" * 31 + ".png", ".hidden"])
def test_output_store_refuses_malformed_ids(tmp_path: Path, bad: str) -> None:
    with pytest.raises(OutputNotFound):
        OutputStore(tmp_path, ttl_s=60).path(bad)


def test_output_store_trusts_a_free_space_reading_briefly(tmp_path: Path) -> None:
    store = OutputStore(tmp_path, ttl_s=60, min_free_bytes=0)
    assert not store.room_recently_seen()
    store.check_space()
    assert store.room_recently_seen()
    full = OutputStore(tmp_path, ttl_s=60, min_free_bytes=10**18)
    with pytest.raises(InsufficientStorage):
        full.check_space()
    assert not full.room_recently_seen()  # a full disk is checked on every request
